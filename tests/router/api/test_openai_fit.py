"""What an OpenAI user meets first, over real HTTP on loopback with the official `openai` client: context-aware
output limits, readiness, clear errors, 415s, no server-specific fields in answers, `GET /v1/models`, and
docs that load nothing from a CDN. The backends are real HTTP servers (tests/fake_backend.py) that report
a context length as vLLM does; tests/router/api/test_context.py does the same against real vLLM."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import openai
import pytest

from backends.client import CONTEXT_MARGIN_TOKENS, FIT_MAX_TOKENS
from tests.conftest import backend_table, free_port, write_config
from tests.fake_backend import FakeVLLM

CONTEXTS = {"small": 2048, "large": 8192}


@pytest.fixture
def fakes():
    servers = {name: FakeVLLM(name) for name in CONTEXTS}
    for name, server in servers.items():
        server.max_model_len = CONTEXTS[name]
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture
def router(tmp_path, sqlite_url, fakes, start_router):
    backends = backend_table("small", fakes["small"].port, 0.1, 0.2) + backend_table("large", fakes["large"].port, 1.0, 2.0)
    extra = "[limits]\nmax_tokens = 4096\nmax_body_bytes = 200000\nmax_message_chars = 150000\n"
    return start_router(write_config(tmp_path / "router.toml", sqlite_url, backends, extra))


def _client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)


def _messages(text: str = "Say hello.") -> list[dict]:
    return [{"role": "user", "content": text}]


def test_no_max_tokens_gets_what_fits_each_backends_context(router, fakes):
    client = _client(router)
    text = "Say hello." * 100  # 1000 characters: about 250 tokens
    for name in ("small", "large"):
        completion = client.chat.completions.create(model=name, messages=_messages(text))  # no max_tokens: the demo call
        assert completion.choices[0].message.content == "hi"
        sent = fakes[name].requests[-1]
        assert FIT_MAX_TOKENS not in sent
        fits = CONTEXTS[name] - (len(text) // 4 + CONTEXT_MARGIN_TOKENS)
        assert sent["max_tokens"] == min(4096, fits)
    assert fakes["small"].requests[-1]["max_tokens"] < 2048 and fakes["large"].requests[-1]["max_tokens"] == 4096
    # The client's own limit is the client's: sent as it is.
    client.chat.completions.create(model="small", messages=_messages(), max_tokens=7)
    assert fakes["small"].requests[-1]["max_tokens"] == 7
    # Streaming too.
    chunks = list(client.chat.completions.create(model="small", messages=_messages(text), stream=True))
    assert chunks and fakes["small"].requests[-1]["max_tokens"] == 2048 - (len(text) // 4 + CONTEXT_MARGIN_TOKENS)


def test_routing_skips_backends_whose_context_the_prompt_does_not_fit(router, fakes):
    client = _client(router)
    text = "word " * 2400  # 12,000 characters: about 3,000 tokens, above small's 2,048
    for _ in range(6):
        completion = client.chat.completions.create(model="auto", messages=_messages(text), extra_body={"router": {"policy": "random"}})
        assert completion.model_extra["router"]["backend"] == "large"
    assert fakes["small"].chats == 0
    backends = httpx.get(f"{router.url}/v1/backends").json()["backends"]
    assert {b["name"]: b["max_model_len"] for b in backends} == CONTEXTS
    with pytest.raises(openai.BadRequestError) as pinned:
        client.chat.completions.create(model="small", messages=_messages(text))
    error = pinned.value.body
    assert error["code"] == "context_length_exceeded" and "backend small's context is 2048 tokens" in error["message"]
    assert fakes["small"].chats == 0


def test_a_prompt_too_long_for_every_backend_is_a_400_before_any_call(router, fakes):
    text = "word " * 8000  # about 10,000 tokens
    for path in ("/v1/chat/completions", "/v1/route"):
        response = httpx.post(f"{router.url}{path}", json={"model": "auto", "messages": _messages(text)}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "about 10000 tokens" in error["message"] and "largest context of this router's backends is 8192" in error["message"]
    assert fakes["small"].chats == fakes["large"].chats == 0


def test_models_list_in_openai_shape(router):
    models = _client(router).models.list()
    assert [m.id for m in models.data] == ["auto", "small", "large"]
    assert all(m.object == "model" and m.owned_by == "llm-router" and m.created > 0 for m in models.data)
    raw = httpx.get(f"{router.url}/v1/models").json()
    assert raw["object"] == "list" and set(raw["data"][0]) == {"id", "object", "created", "owned_by"}


def test_server_specific_fields_do_not_reach_the_client(router, fakes):
    for server in fakes.values():
        server.extra_fields = {"prompt_token_ids": [1, 2, 3], "kv_transfer_params": None, "prompt_logprobs": None,
                               "system_fingerprint": "fp_1"}
    body = {"model": "small", "messages": _messages(), "max_tokens": 4}
    answer = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=30).json()
    assert "prompt_token_ids" not in answer and "kv_transfer_params" not in answer and "prompt_logprobs" not in answer
    assert answer["system_fingerprint"] == "fp_1" and answer["router"]["backend"] == "small"
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert events and not any("prompt_token_ids" in e or "kv_transfer_params" in e for e in events)
    assert "router" in events[0] and events[-1]["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code", "says"),
    [
        (b"", "application/json", 400, "empty_body", "request body is empty"),
        (b"null", "application/json", 400, "invalid_body", "must be a JSON object"),
        (b"{not json", "application/json", 400, "invalid_json", "invalid JSON"),
        (json.dumps({"messages": _messages()}).encode(), "text/plain", 415, "unsupported_media_type", "text/plain"),
        (b"model=auto&messages=hi", "application/x-www-form-urlencoded", 415, "unsupported_media_type", "application/json"),
        (json.dumps({"messages": _messages("x" * 210_000)}).encode(), "application/json", 413, "request_too_large", "at most 200000 bytes"),
        (json.dumps({"messages": _messages(), "stream": True}).encode(), "application/json", 400, "stream_not_supported", "/v1/route"),
    ],
)
def test_bad_requests_get_clear_messages_and_string_codes(router, fakes, content, content_type, status, code, says):
    path = "/v1/route" if code == "stream_not_supported" else "/v1/chat/completions"
    response = httpx.post(f"{router.url}{path}", content=content, headers={"content-type": content_type}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"], error
    assert isinstance(error["type"], str) and "'data'" not in error["message"]
    assert fakes["small"].chats == fakes["large"].chats == 0


def test_upstream_validation_errors_pass_through_as_the_upstreams_message(router, fakes):
    fakes["small"].chat_status = 400
    fakes["small"].error_body = {"detail": [{"loc": ["body", "temperature"], "msg": "Input should be a valid number", "type": "float_parsing"}]}
    with pytest.raises(openai.BadRequestError) as caught:
        _client(router).chat.completions.create(model="small", messages=_messages(), max_tokens=4, temperature=0.5)
    error = caught.value.body
    assert "temperature: Input should be a valid number" in error["message"] and "{" not in error["message"]
    assert isinstance(error["code"], str)
    # The backend answered: the request's fault, not the backend's (its breaker stays closed, no failure counted).
    small = next(b for b in httpx.get(f"{router.url}/v1/backends").json()["backends"] if b["name"] == "small")
    assert small["failures"] == 0 and small["breaker"]["state"] == "closed" and small["down_reason"] is None


def test_a_clients_4xx_is_not_a_backend_error_in_metrics_or_stats(router, fakes):
    fakes["small"].chat_status = 400
    httpx.post(f"{router.url}/v1/chat/completions", json={"model": "small", "messages": _messages(), "max_tokens": 4}, timeout=30)
    metrics = httpx.get(f"{router.url}/metrics").text
    assert not re.search(r'llm_router_backend_requests_total\{backend="small",outcome="error"\} [1-9]', metrics), metrics
    stats = httpx.get(f"{router.url}/v1/policies/stats").json()
    assert stats["backends"]["small"]["errors"] == 0


def test_health_is_liveness_ready_is_503_while_no_backend_can_serve(tmp_path, sqlite_url, fakes, start_router, caplog):
    gone = free_port()
    backends = (backend_table("small", fakes["small"].port, 0.1, 0.2) + backend_table("large", fakes["large"].port, 1.0, 2.0)
                + backend_table("gone", gone, 0.1, 0.2))
    with caplog.at_level(logging.WARNING, logger="llm_router"):
        router = start_router(write_config(tmp_path / "router.toml", sqlite_url, backends))
    assert any("backend gone" in r.getMessage() and f":{gone}" in r.getMessage() and "down at start" in r.getMessage()
               for r in caplog.records)
    health = httpx.get(f"{router.url}/health").json()
    assert health["status"] == "degraded" and health["backends_up"] == ["small", "large"]
    assert [d["name"] for d in health["backends_down"]] == ["gone"] and health["backends_down"][0]["reason"]
    ready = httpx.get(f"{router.url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    for server in fakes.values():
        server.health_status = 503
    deadline = time.monotonic() + 15
    while httpx.get(f"{router.url}/ready").status_code != 503:
        assert time.monotonic() < deadline, "never became unready"
        time.sleep(0.2)
    body = httpx.get(f"{router.url}/ready").json()
    assert body["status"] == "unavailable" and body["backends_up"] == []
    assert {d["name"] for d in body["backends_down"]} == {"small", "large", "gone"}
    assert all("503" in d["reason"] or "unreachable" in d["reason"] or "Error" in d["reason"] for d in body["backends_down"])
    live = httpx.get(f"{router.url}/health")
    assert live.status_code == 200 and live.json()["status"] == "degraded"


def test_schema_page_loads_nothing_from_elsewhere(router):
    page = httpx.get(f"{router.url}/schema")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "/schema/openapi.json" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text), "the page loads an asset from another host"
    schema = httpx.get(f"{router.url}/schema/openapi.json").json()
    assert {"/v1/models", "/ready", "/health", "/v1/chat/completions"} <= set(schema["paths"])
