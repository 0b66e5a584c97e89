"""A fake OpenAI-compatible backend on loopback, for the failures real vLLM cannot be made to show."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeVLLM:
    """A tiny OpenAI-compatible server: /health, /v1/models, /metrics, /v1/chat/completions.

    `health_status` and `chat_status` say what it answers; `chat_delay_s` holds chat answers back (a hung
    backend); `cut_streams` makes a streamed answer stop after its first event, as when a server dies;
    `stream_gap_s` is the pause between the events of a whole streamed answer; `answer` is what it says;
    `requests` holds every chat request body it received, `received_headers` every request's path and headers;
    with `api_key` set, `/v1/*` answers 401 unless sent `Authorization: Bearer <api_key>` (a hosted API).
    A stand-in only for failures a real vLLM cannot be made to show on demand.
    """

    def __init__(self, model: str, port: int = 0) -> None:
        self.model = model
        self.health_status = 200
        self.chat_status = 200
        self.chat_delay_s = 0.0
        self.cut_streams = False
        self.stream_gap_s = 0.0
        self.answer = "hi"
        self.kv_cache_usage = 0.25  # reported in /metrics as vllm:kv_cache_usage_perc
        self.max_model_len: int | None = None  # reported in /v1/models as vLLM does, when set
        self.extra_fields: dict[str, Any] = {}  # server-specific fields added to every completion and chunk
        self.error_body: Any = None  # the body of a non-200 chat answer (default: OpenAI's error shape)
        self.requests: list[dict[str, Any]] = []
        self.received_headers: list[tuple[str, dict[str, str]]] = []
        self.api_key: str | None = None
        self.chats = 0
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refused(self) -> bool:
                """Record the request's headers; True (and a 401 sent) when the API key is required and wrong."""
                server.received_headers.append((self.path, dict(self.headers.items())))
                if server.api_key is None or not self.path.startswith("/v1/"):
                    return False
                if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return False
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})
                return True

            def do_GET(self) -> None:
                if self._refused():
                    return
                if self.path == "/health":
                    self._send(server.health_status, {})
                elif self.path == "/v1/models":
                    card = {"id": server.model, "object": "model"}
                    if server.max_model_len is not None:
                        card["max_model_len"] = server.max_model_len
                    self._send(200, {"object": "list", "data": [card]})
                elif self.path == "/metrics":
                    metrics = f"vllm:num_requests_running 1.0\nvllm:num_requests_waiting 0.0\nvllm:kv_cache_usage_perc {server.kv_cache_usage}\n"
                    self._send(200, metrics, "text/plain")
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self._refused():
                    return
                server.chats += 1
                server.requests.append(request)
                if request.get("stream") and server.cut_streams:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Once"}}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if server.chat_delay_s:
                    server._stop.wait(server.chat_delay_s)
                if server.chat_status != 200:
                    error = server.error_body if server.error_body is not None else {"error": {"message": f"status {server.chat_status}"}}
                    self._send(server.chat_status, error)
                    return
                if request.get("stream"):
                    self._stream()
                    return
                self._send(
                    200,
                    {
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": server.answer}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                        **server.extra_fields,
                    },
                )

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                chunks = [
                    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": server.answer}, "finish_reason": None}]},
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
                ]
                for chunk in chunks:
                    chunk.update(server.extra_fields)
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    server._stop.wait(server.stream_gap_s)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._http.shutdown()
        self._http.server_close()
