"""Keys, roles, rate limits, spending budgets and request limits: units, then the service over HTTP."""


import httpx
import pytest

from router.api.auth import Authenticator, hash_key
from router.config import ApiKeyConfig, AuthConfig, ConfigError
from router.errors import Forbidden, TooManyRequests, Unauthorized
from tests.conftest import backend_table, write_config

CLIENT, OTHER, ADMIN = "client-secret-1", "client-secret-2", "admin-secret"


def _keys_toml(client_extra: str = "", other_extra: str = "") -> str:
    return f"""
[auth]
open_on_loopback = false
[[auth.keys]]
name = "team-a"
role = "client"
key_sha256 = "{hash_key(CLIENT)}"
{client_extra}
[[auth.keys]]
name = "team-b"
role = "client"
key_env = "TEST_ROUTER_TEAM_B_KEY"
{other_extra}
[[auth.keys]]
name = "ops"
role = "admin"
key_sha256 = "{hash_key(ADMIN)}"
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _authenticator(keys: list[ApiKeyConfig], open_on_loopback: bool = False, host: str = "127.0.0.1", clock=None):
    return Authenticator(AuthConfig(open_on_loopback=open_on_loopback, keys=keys), host, {"KEY_ENV": "from-env"}, clock or FakeClock())


def test_keys_resolve_to_roles_and_only_hashes_are_kept():
    auth = _authenticator([
        ApiKeyConfig(name="a", key_sha256=hash_key("k1")),
        ApiKeyConfig(name="ops", role="admin", key_env="KEY_ENV"),
    ])
    assert auth.authenticate("Bearer k1").role == "client"
    admin = auth.authenticate("bearer from-env")
    assert (admin.name, admin.role, admin.tenant) == ("ops", "admin", "ops")
    assert set(auth.keys) == {hash_key("k1"), hash_key("from-env")}
    for header in (None, "", "Bearer", "Basic k1", "Bearer wrong"):
        with pytest.raises(Unauthorized):
            auth.authenticate(header)
    with pytest.raises(Forbidden):
        auth.authenticate("Bearer k1").require("admin")


def test_open_mode_is_for_loopback_only_and_a_keyless_config_refuses_to_start():
    open_auth = _authenticator([ApiKeyConfig(name="a", key_sha256=hash_key("k1"))], open_on_loopback=True)
    assert open_auth.authenticate(None).role == "admin" and open_auth.authenticate(None).tenant is None
    assert open_auth.authenticate("Bearer k1").tenant == "a"  # a known key still names its tenant
    with pytest.raises(ConfigError, match="loopback"):
        _authenticator([], open_on_loopback=True, host="0.0.0.0")
    with pytest.raises(ConfigError, match="no \\[\\[auth.keys\\]\\]"):
        _authenticator([])
    with pytest.raises(ConfigError, match="MISSING_ENV"):
        _authenticator([ApiKeyConfig(name="a", key_env="MISSING_ENV")])
    with pytest.raises(ValueError, match="exactly one"):
        ApiKeyConfig(name="a")


def test_rate_limit_is_a_token_bucket_with_retry_after():
    clock = FakeClock()
    auth = _authenticator([ApiKeyConfig(name="a", key_sha256=hash_key("k"), requests_per_minute=60, burst=2)], clock=clock)
    auth.authenticate("Bearer k")
    auth.authenticate("Bearer k")
    with pytest.raises(TooManyRequests) as refused:
        auth.authenticate("Bearer k")
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    clock.now += 1.0
    auth.authenticate("Bearer k")


# -- over HTTP ---------------------------------------------------------------------------------------


@pytest.fixture
def keyed_router(tmp_path, sqlite_url, vllm_backends, start_router, monkeypatch):
    monkeypatch.setenv("TEST_ROUTER_TEAM_B_KEY", OTHER)
    backends = backend_table("smol-a", vllm_backends["smol-a"], 0.05, 0.10) + backend_table("smol-b", vllm_backends["smol-b"], 0.50, 1.50)
    limits = "\n[limits]\nmax_body_bytes = 4096\nmax_messages = 3\nmax_message_chars = 500\nmax_tokens = 16\n"
    return start_router(write_config(tmp_path / "router.toml", sqlite_url, backends, _keys_toml() + limits))


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _route_body(text: str = "What is 2 + 2?") -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 4}


@pytest.mark.vllm
def test_auth_matrix_every_role_on_every_endpoint(keyed_router):
    url = keyed_router.url
    decision = httpx.post(f"{url}/v1/route", json=_route_body(), headers=_headers(CLIENT), timeout=60).json()["router"]["decision_id"]
    endpoints = {
        "chat": ("POST", "/v1/chat/completions", _route_body()),
        "route": ("POST", "/v1/route", _route_body()),
        "stats": ("GET", "/v1/policies/stats", None),
        "active": ("PUT", "/v1/policies/active", {"policy": "thompson"}),
        "backends": ("GET", "/v1/backends", None),
        "config": ("GET", "/v1/config", None),
        "metrics": ("GET", "/metrics", None),
        "health": ("GET", "/health", None),
        "schema": ("GET", "/schema/openapi.json", None),
    }
    expected = {  # key -> endpoint -> status
        None: {"health": 200, "schema": 200} | dict.fromkeys(["chat", "route", "stats", "active", "backends", "config", "metrics"], 401),
        "wrong-key": {"health": 200, "schema": 200} | dict.fromkeys(["chat", "route", "stats", "active", "backends", "config", "metrics"], 401),
        CLIENT: {"chat": 200, "route": 200, "health": 200, "schema": 200} | dict.fromkeys(["stats", "active", "backends", "config", "metrics"], 403),
        ADMIN: dict.fromkeys(endpoints, 200),
    }
    for key, statuses in expected.items():
        for name, (method, path, body) in endpoints.items():
            response = httpx.request(method, f"{url}{path}", json=body, headers=_headers(key), timeout=120)
            assert response.status_code == statuses[name], (key, name, response.text)
            if response.status_code >= 400:
                assert isinstance(response.json()["error"]["code"], str)
            if response.status_code == 401:
                assert response.headers["WWW-Authenticate"] == "Bearer"
    # Feedback only from the key that made the decision.
    reward = {"decision_id": decision, "reward": 1.0}
    assert httpx.post(f"{url}/v1/rewards", json=reward, timeout=30).status_code == 401
    for key in (OTHER, ADMIN):
        refused = httpx.post(f"{url}/v1/rewards", json=reward, headers=_headers(key), timeout=30)
        assert refused.status_code == 403 and "another key" in refused.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/rewards", json=reward, headers=_headers(CLIENT), timeout=30).status_code == 200
    config = httpx.get(f"{url}/v1/config", headers=_headers(ADMIN), timeout=30).json()
    assert CLIENT not in str(config) and hash_key(CLIENT) not in str(config)


@pytest.mark.vllm
def test_request_limits_give_clear_4xx(keyed_router):
    url, headers = keyed_router.url, _headers(CLIENT)
    cases = [
        ({"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}]}, 413, None),
        ({"model": "auto", "messages": [{"role": "user", "content": "y" * 600}]}, 400, "characters"),
        ({"model": "auto", "messages": [{"role": "user", "content": "hi"}] * 4}, 400, "at most 3"),
        ({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}, 400, "max_tokens"),
        ({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100}, 400, "max_tokens"),
    ]
    for body, status, words in cases:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == status, response.text
        if words:
            assert words in response.json()["error"]["message"]
    # No max_tokens asked: the router's cap goes upstream.
    answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "Tell a long story."}]},
                        headers=headers, timeout=120)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 16


@pytest.mark.vllm
def test_rate_limit_and_spending_budget_over_http(tmp_path, sqlite_url, vllm_backends, start_router, monkeypatch):
    monkeypatch.setenv("TEST_ROUTER_TEAM_B_KEY", OTHER)
    backends = backend_table("smol-a", vllm_backends["smol-a"], 0.05, 0.10) + backend_table("smol-b", vllm_backends["smol-b"], 0.50, 1.50)
    # team-a may spend about three cheap decisions; team-b may make five requests at once.
    cheap = (1 * 0.05 + 4 * 0.10) / 1e6  # "hi" (1 token) with max_tokens 4 on smol-a
    extra = _keys_toml(f'max_spend_usd = {3.5 * cheap}\nbudget_period = "day"', "requests_per_minute = 5")
    router = start_router(write_config(tmp_path / "router.toml", sqlite_url, backends, extra + "\n[limits]\nmax_tokens = 16\n"))

    def route(key: str) -> httpx.Response:
        return httpx.post(f"{router.url}/v1/route", json=_route_body("hi"), headers=_headers(key), timeout=60)

    budgeted = [route(CLIENT) for _ in range(8)]
    statuses = [r.status_code for r in budgeted]
    assert statuses == [200] * 3 + [429] * 5, "a budget for three cheap decisions: exactly three"
    refused = budgeted[-1]
    assert refused.json()["error"]["type"] == "insufficient_quota" and int(refused.headers["Retry-After"]) <= 86400
    stats = httpx.get(f"{router.url}/v1/policies/stats", headers=_headers(ADMIN), timeout=30).json()
    spend = stats["tenant_spend"]["team-a"]
    assert 0 < spend["spent_usd"] <= spend["max_spend_usd"]

    limited = [route(OTHER).status_code for _ in range(6)]
    assert limited == [200] * 5 + [429]
    rate_refusal = route(OTHER)
    assert rate_refusal.json()["error"]["type"] == "rate_limit_exceeded" and int(rate_refusal.headers["Retry-After"]) >= 1
    assert route(ADMIN).status_code == 200  # other keys are unaffected
