"""The plain OpenAI call on real vLLM (context 2048, the router's output cap 4096): no max_tokens gets an
answer, a prompt longer than every context is refused before any call, vLLM's own validation errors
reach the client as its message, and vLLM-only fields stay out of the answer."""

from __future__ import annotations

import httpx
import openai
import pytest

from router.api.responses import CHOICE_FIELDS, COMPLETION_FIELDS, MESSAGE_FIELDS
from tests.conftest import backend_table, write_config

pytestmark = pytest.mark.vllm


@pytest.fixture
def router(tmp_path, sqlite_url, vllm_backends, start_router):
    backends = backend_table("smol-a", vllm_backends["smol-a"], 0.05, 0.10) + backend_table("smol-b", vllm_backends["smol-b"], 0.50, 1.50)
    return start_router(write_config(tmp_path / "router.toml", sqlite_url, backends, "[limits]\nmax_tokens = 4096\n"))


def test_the_plain_call_without_max_tokens_answers(router):
    backends = httpx.get(f"{router.url}/v1/backends").json()["backends"]
    assert {b["max_model_len"] for b in backends} == {2048}  # learned from vLLM's /v1/models
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Answer with one word: what colour is the sky?"}]
    )
    assert completion.choices[0].message.content.strip()
    assert completion.usage.prompt_tokens + completion.usage.completion_tokens <= 2048


def test_a_prompt_longer_than_every_context_is_refused_before_any_call(router):
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Summarise: " + "lorem ipsum " * 900}])
    assert caught.value.body["code"] == "context_length_exceeded" and "2048 tokens" in caught.value.body["message"]
    stats = httpx.get(f"{router.url}/v1/policies/stats").json()
    assert sum(b["decisions"] for b in stats["backends"].values()) == 0


def test_vllm_validation_errors_reach_the_client_as_its_message(router):
    body = {"model": "smol-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "top_p": 5}
    response = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "top_p" in error["message"] and "{'" not in error["message"] and isinstance(error["code"], str)


def test_vllm_only_fields_do_not_reach_the_client(router):
    body = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    answer = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=120).json()
    assert set(answer) <= COMPLETION_FIELDS | {"router"}, set(answer) - COMPLETION_FIELDS
    assert set(answer["choices"][0]) <= CHOICE_FIELDS and set(answer["choices"][0]["message"]) <= MESSAGE_FIELDS
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert lines and all("prompt_token_ids" not in line and "token_ids" not in line and "stop_reason" not in line for line in lines)
