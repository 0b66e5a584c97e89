"""Fuzzing every endpoint of the real service: whatever a client sends, never a 5xx.

The router runs in a thread of the test process with the real vLLM backends (fuzzed chat completions
really generate, capped by `[limits] max_tokens = 16`) and PostgreSQL. No backend is down here, so
502/503/504 would be bugs too: any status >= 500 fails, and so does an SSE `error` event in a stream.
Each test collects every distinct server error (operation, status, message) with a reproducer instead
of stopping at the first, and ends by checking that the backends are still marked healthy (health
checks are off, so a client's bad input that made the router mark a backend down stays visible).

- `test_schema_fuzzing`: schemathesis reads `/schema/openapi.json`; per operation hypothesis sends
  inputs that fit the schema (positive) and inputs that break it (negative). The schema cannot say
  that `model` must name a backend or that a message needs text, so most of these end in a 4xx at
  validation; the second test gets past it.
- `test_semantic_fuzzing`: hypothesis strategies that mostly pass validation: real backend and policy
  names, text and content parts, OpenAI sampling parameters passed through to vLLM (valid and not),
  streaming, caps, keys of both roles and bad ones, rewards and preferences for real decision ids;
  every edge value of `ODD_TEXT` / `ODD_DECISION_IDS` is also sent once outright, so those do not
  depend on what hypothesis draws.

Found and fixed this way: NUL characters in the query text or a decision id (a 500 on PostgreSQL; now
400), and vLLM's in-stream error events (now relayed as an SSE error and logged as a failed decision).

Why not `@schema.parametrize()` with `schemathesis.pytest.from_fixture`: schemathesis 4.32's lazy
loader sets `request.node._nodeid`, which pytest 9 no longer has (AttributeError at every test). The
operations' hypothesis strategies (`APIOperation.as_strategy`) are the same generators without it.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from policies import registry
from tests.conftest import IN_CI
from tests.router.test_load import ADMIN, CLIENT, headers, router_config

try:  # the `test` extra: schemathesis, which brings hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
except ImportError:
    if IN_CI:
        raise
    pytest.skip("schemathesis not installed: pip install -c constraints.txt -e '.[test]'", allow_module_level=True)

pytestmark = [pytest.mark.vllm, pytest.mark.postgres]

MAX_TOKENS = 16  # the service's cap; a fuzzed request without max_tokens generates at most this many
SCHEMA_EXAMPLES = {"positive": 40, "negative": 30}  # per operation
SEMANTIC_EXAMPLES = {"chat": 150, "route": 150, "rewards": 150, "active": 40}
BUDGET_S = 90.0  # per test: past this, the remaining examples are skipped (a slow machine still ends)
BACKENDS = ("smol-a", "smol-b")


@pytest.fixture
def fuzz_router(tmp_path, pg_url, vllm_backends, start_router):
    config = router_config(tmp_path / "router.toml", pg_url, vllm_backends, max_tokens=MAX_TOKENS, timeout_s=60, health_interval_s=3600)
    return start_router(config)


class _Unhandled(logging.Handler):
    """The exceptions behind the router's 500s (it runs in this process): what tells two bugs apart."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.last = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Findings:
    """Statuses seen, and every distinct server error with a reproducer; a time budget for the test."""

    def __init__(self, url: str) -> None:
        self.unhandled = _Unhandled()
        logging.getLogger("llm_router").addHandler(self.unhandled)
        self.url = url
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.errors: dict[tuple[str, int, str], str] = {}
        self.skipped = 0
        self.stop_at = time.monotonic() + BUDGET_S

    def out_of_time(self) -> bool:
        if time.monotonic() > self.stop_at:
            self.skipped += 1
            return True
        return False

    def record(self, label: str, status: int, text: str, reproducer: Callable[[], str]) -> None:
        self.statuses[(label, status)] += 1
        stream_error = status == 200 and "event: error" in text
        if status < 500 and not stream_error:
            return
        try:
            message = str(json.loads(text)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = text
        if status == 500 and self.unhandled.last:
            message, self.unhandled.last = f"{message} [{self.unhandled.last}]", None
        key = (label, status, ("SSE error event: " if stream_error else "") + message[:200])
        self.errors.setdefault(key, reproducer())

    def check(self) -> None:
        logging.getLogger("llm_router").removeHandler(self.unhandled)
        print("\n".join(f"{label}: {status} x{n}" for (label, status), n in sorted(self.statuses.items())))
        backends = httpx.get(f"{self.url}/v1/backends", headers=headers(ADMIN), timeout=30).json()["backends"]
        assert {b["name"]: b["healthy"] for b in backends} == dict.fromkeys(BACKENDS, True), backends
        total = sum(self.statuses.values())
        assert self.skipped < total, f"time budget of {BUDGET_S:g}s ran out after {total} requests"
        report = "\n".join(f"{op} -> {status}: {message}\n  {repro}" for (op, status, message), repro in sorted(self.errors.items()))
        assert not self.errors, f"{len(self.errors)} distinct server errors:\n{report}"


def _run(strategy: st.SearchStrategy[Any], examples: int, send: Callable[[Any], None]) -> None:
    """`examples` hypothesis cases, no shrinking (server errors are collected, not raised)."""

    @given(strategy)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def fuzz(value: Any) -> None:
        send(value)

    fuzz()


def test_schema_fuzzing(fuzz_router):
    from schemathesis import GenerationMode

    findings = Findings(fuzz_router.url)
    schema = schemathesis.openapi.from_url(f"{fuzz_router.url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "POST /v1/chat/completions", "POST /v1/route", "POST /v1/rewards", "GET /v1/policies/stats", "PUT /v1/policies/active",
    }

    def send(label: str, case) -> None:
        if findings.out_of_time():
            return
        response = case.call(base_url=fuzz_router.url, headers=headers(ADMIN), timeout=120)
        findings.record(label, response.status_code, response.text,
                        lambda: case.as_curl_command(headers=headers(ADMIN), base_url=fuzz_router.url))

    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode, examples in SCHEMA_EXAMPLES.items():
            strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
            try:
                _run(strategy, examples, lambda case, label=f"{label} ({mode})": send(label, case))
            except Unsatisfiable:  # nothing in this operation to break (no body, no parameters)
                assert mode == "negative", f"{label}: no valid input could be generated"
    findings.check()


# -- semantic fuzzing ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a list.", "Prove that 2+2=4."]
ODD_TEXT = ["", " ", "\x00", "a\x00b", "\ud800", "a\udfffb", "\ufeff", "é" * 3000, "x" * 9000, "\u202e\u2028"]
ODD_DECISION_IDS = ["dec_\x00", "\ud800", "dec_" + "f" * 60, " ", "dec_é"]
TEXT = st.sampled_from(PROMPTS) | st.text(max_size=80) | st.sampled_from(ODD_TEXT)
INTS = st.integers(-2, 40) | st.sampled_from([0, MAX_TOKENS, MAX_TOKENS + 1, 2**31, 2**63, 10**30]) | st.none()
NUMBERS = st.floats() | st.integers(-5, 5) | st.sampled_from([0, 1e-300, 1e300]) | st.none()
PART = (
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
    | st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "refusal", "file", "text"])},
                            optional={"text": JSON, "image_url": JSON, "refusal": JSON})
    | st.dictionaries(st.text(max_size=5), JSON, max_size=3)
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]),
     "content": TEXT | st.none() | st.lists(PART, max_size=3)},
    optional={"name": st.text(max_size=10), "tool_call_id": st.text(max_size=10), "tool_calls": JSON},
)
USER = st.fixed_dictionaries({"role": st.just("user"), "content": TEXT})
ROUTER_OPTIONS = st.fixed_dictionaries(
    {}, optional={"policy": st.sampled_from(registry.names()) | st.text(max_size=8) | st.none(), "max_cost_usd": NUMBERS}
) | JSON
MESSY_CHAT = st.fixed_dictionaries(
    {"messages": st.lists(USER, min_size=1, max_size=2) | st.lists(MESSAGE, max_size=4)},
    optional={
        "model": st.sampled_from(["auto", *BACKENDS]) | st.text(max_size=10),
        "stream": st.booleans() | JSON,
        "max_tokens": INTS,
        "max_completion_tokens": INTS,
        "router": ROUTER_OPTIONS,
        "temperature": NUMBERS, "top_p": NUMBERS, "top_k": INTS, "seed": INTS,
        "presence_penalty": NUMBERS, "frequency_penalty": NUMBERS,
        "n": st.integers(-1, 3),
        "stop": st.none() | TEXT | st.lists(st.text(max_size=4), max_size=5),
        "logprobs": st.booleans() | JSON, "top_logprobs": st.integers(-1, 25),
        "logit_bias": st.dictionaries(st.text(max_size=6) | st.integers(-5, 70000).map(str), NUMBERS, max_size=3),
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "nope"])}) | JSON,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JSON}) | JSON,
        "tools": JSON, "tool_choice": st.sampled_from(["none", "auto", "required"]) | JSON,
        "user": st.text(max_size=10),
        "extra_field": JSON,
    },
)
VALID_CHAT = st.fixed_dictionaries(  # what a well-behaved client sends, with its edge values
    {"messages": st.lists(USER | st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant"]), "content": TEXT}), min_size=1, max_size=3)
     .filter(lambda messages: any(m["role"] == "user" for m in messages))},
    optional={
        "model": st.sampled_from(["auto", "auto", *BACKENDS]),
        "stream": st.booleans(),
        "max_tokens": st.integers(1, MAX_TOKENS),
        "router": st.fixed_dictionaries({}, optional={"policy": st.sampled_from(registry.names()),
                                                      "max_cost_usd": st.floats(0, 1) | st.just(0.0)}),
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**31),
        "n": st.integers(1, 2),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
        "logprobs": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    },
)
CHAT = VALID_CHAT | VALID_CHAT | MESSY_CHAT
KEYS = st.sampled_from([ADMIN, CLIENT] * 5 + ["not-a-key", "", "Bearer", "é"])


def _authorization(key: str) -> dict[str, Any]:
    if key in ("", "Bearer"):
        return {"Authorization": key}
    if key == "é":
        return {"Authorization": "Bearer \u00e9".encode()}  # not ASCII: raw UTF-8 bytes on the wire
    return headers(key)


def _post(findings: Findings, client: httpx.Client, label: str, method: str, path: str, body: Any, key: str) -> httpx.Response | None:
    if findings.out_of_time():
        return None
    auth = _authorization(key)
    content = json.dumps(body).encode()  # NaN and Infinity as Python writes them: not JSON, must be a 4xx
    response = client.request(method, path, content=content, headers={**auth, "content-type": "application/json"})

    def reproducer() -> str:
        header_args = " ".join(f"-H {shlex.quote(f'{k}: {v.decode() if isinstance(v, bytes) else v}')}" for k, v in auth.items())
        return f"curl -sS -X {method} {findings.url}{path} {header_args} -H 'content-type: application/json' --data-binary {shlex.quote(content.decode())}"

    findings.record(label, response.status_code, response.text, reproducer)
    return response


def test_semantic_fuzzing(fuzz_router):
    findings = Findings(fuzz_router.url)
    decisions: list[str] = []
    with httpx.Client(base_url=fuzz_router.url, timeout=120, trust_env=False) as client:
        for prompt in PROMPTS:  # real decision ids for the rewards, made by the client key
            answer = client.post("/v1/route", json={"messages": [{"role": "user", "content": prompt}]}, headers=headers(CLIENT))
            assert answer.status_code == 200, answer.text
            decisions.append(answer.json()["router"]["decision_id"])
        for text in ODD_TEXT:  # every edge value once, whatever hypothesis happens to draw below
            _post(findings, client, "POST /v1/route", "POST", "/v1/route", {"messages": [{"role": "user", "content": text}]}, CLIENT)
        for decision_id in ODD_DECISION_IDS:
            _post(findings, client, "POST /v1/rewards", "POST", "/v1/rewards", {"decision_id": decision_id, "reward": 0.5}, CLIENT)

        def decide(label: str, path: str) -> Callable[[tuple[Any, str]], None]:
            def send(value: tuple[Any, str]) -> None:
                body, key = value
                response = _post(findings, client, label, "POST", path, body, key)
                if response is not None and response.status_code == 200 and len(decisions) < 200 and key == CLIENT:
                    decision = response.headers.get("X-Router-Decision-Id")
                    if decision:
                        decisions.append(decision)
            return send

        _run(st.tuples(CHAT, KEYS), SEMANTIC_EXAMPLES["chat"], decide("POST /v1/chat/completions", "/v1/chat/completions"))
        _run(st.tuples(CHAT, KEYS), SEMANTIC_EXAMPLES["route"], decide("POST /v1/route", "/v1/route"))

        decision_ids = st.sampled_from(decisions) | st.text(max_size=70) | st.sampled_from(ODD_DECISION_IDS)
        valid = st.sampled_from(decisions)
        feedback = st.fixed_dictionaries({"decision_id": valid, "reward": st.floats(0, 1)}) | st.fixed_dictionaries(
            {"decision_id": valid, "winner": st.sampled_from(BACKENDS), "loser": st.sampled_from(BACKENDS)}
        )
        _run(st.tuples(feedback, st.sampled_from([CLIENT] * 4 + [ADMIN])), SEMANTIC_EXAMPLES["rewards"] // 2,
             lambda value: _post(findings, client, "POST /v1/rewards", "POST", "/v1/rewards", *value))
        messy = st.fixed_dictionaries(
            {"decision_id": decision_ids},
            optional={"reward": NUMBERS | JSON, "winner": st.sampled_from(BACKENDS) | st.text(max_size=8) | st.none(),
                      "loser": st.sampled_from(BACKENDS) | st.text(max_size=8) | st.none(), "extra": JSON},
        ) | JSON
        _run(st.tuples(messy, KEYS), SEMANTIC_EXAMPLES["rewards"] // 2,
             lambda value: _post(findings, client, "POST /v1/rewards", "POST", "/v1/rewards", *value))

        active = st.fixed_dictionaries({"policy": st.sampled_from(registry.names())}) | st.fixed_dictionaries({"policy": st.text(max_size=70)}) | JSON
        _run(st.tuples(active, KEYS), SEMANTIC_EXAMPLES["active"],
             lambda value: _post(findings, client, "PUT /v1/policies/active", "PUT", "/v1/policies/active", *value))

        for path in ("/v1/policies/stats", "/v1/backends", "/v1/config", "/metrics", "/health"):  # after all that
            for key in (ADMIN, CLIENT, "not-a-key"):
                response = client.get(path, headers=headers(key))
                findings.record(f"GET {path}", response.status_code, response.text, lambda path=path, key=key: f"GET {path} with key {key!r}")
    findings.check()
