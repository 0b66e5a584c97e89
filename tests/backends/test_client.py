"""The OpenAI-protocol client against real vLLM servers and a real closed port."""

import httpx
import pytest

from backends.client import BackendClient, BackendError, BackendSpec, parse_prometheus
from tests.conftest import free_port


def _spec(name: str, port: int, timeout_s: float = 60.0) -> BackendSpec:
    return BackendSpec(name, f"http://127.0.0.1:{port}", name, 0.5, 1.5, max_concurrent_requests=2, timeout_s=timeout_s)


def test_cost_from_usage_tokens_and_prices():
    spec = _spec("x", 1)
    assert spec.cost_usd(1_000_000, 0) == pytest.approx(0.5)
    assert spec.cost_usd(2000, 1000) == pytest.approx((2000 * 0.5 + 1000 * 1.5) / 1e6)


def test_prometheus_samples_are_summed_over_label_sets():
    text = (
        "# HELP vllm:num_requests_running Number of requests running.\n"
        '# TYPE vllm:num_requests_running gauge\n'
        'vllm:num_requests_running{engine="0",model_name="a"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="a"} 1.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="a"} 4.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.125\n'
        'vllm:num_requests_running_total 9\n'
    )
    assert parse_prometheus(text) == {
        "vllm:num_requests_running": 3.0,
        "vllm:num_requests_waiting": 4.0,
        "vllm:kv_cache_usage_perc": 0.125,
    }


@pytest.mark.vllm
async def test_chat_health_and_queue_metrics_on_real_vllm(vllm_backends):
    async with httpx.AsyncClient() as http:
        client = BackendClient(_spec("smol-a", vllm_backends["smol-a"]), http)
        result = await client.chat({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5})
        assert result.completion_tokens > 0 and result.prompt_tokens > 0
        assert result.cost_usd == pytest.approx(client.spec.cost_usd(result.prompt_tokens, result.completion_tokens))
        report = await client.health(timeout_s=5)
        assert report.healthy and "smol-a" in report.models
        assert set(report.queue) == {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
        wrong_model = BackendClient(BackendSpec("x", client.spec.base_url, "not-served", 0, 0), http)
        assert not (await wrong_model.health(timeout_s=5)).healthy


@pytest.mark.vllm
async def test_client_errors_are_not_retryable(vllm_backends):
    async with httpx.AsyncClient() as http:
        client = BackendClient(_spec("smol-a", vllm_backends["smol-a"]), http)
        with pytest.raises(BackendError) as caught:
            await client.chat({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 100_000})
        assert caught.value.status == 400 and not caught.value.retryable


@pytest.mark.vllm
async def test_stream_yields_events_then_done_with_usage(vllm_backends):
    async with httpx.AsyncClient() as http:
        client = BackendClient(_spec("smol-b", vllm_backends["smol-b"]), http)
        events, usage = await client.open_stream({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 6})
        received = [event async for event in events]
        assert received[-1] is None and usage.completed
        assert usage.completion_tokens > 0 and usage.cost_usd > 0
        assert client.in_flight == 0


async def test_unreachable_backend_is_a_retryable_502():
    async with httpx.AsyncClient() as http:
        client = BackendClient(_spec("gone", free_port()), http)
        with pytest.raises(BackendError) as caught:
            await client.chat({"messages": [{"role": "user", "content": "Hi"}]})
        assert caught.value.status == 502 and caught.value.retryable
        with pytest.raises(BackendError):
            await client.open_stream({"messages": [{"role": "user", "content": "Hi"}]})
        assert client.in_flight == 0
        report = await client.health(timeout_s=1)
        assert not report.healthy and "ConnectError" in report.error
