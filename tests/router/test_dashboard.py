"""The dashboard over real HTTP on loopback: the router with keys, two OpenAI-compatible backends
(tests/fake_backend.py, reporting vLLM's queue and KV-cache metrics), a few routed and rewarded requests.

`GET /v1/dashboard` is checked against the numbers the router already reports (its series end on the
stats' estimates and spend), on SQLite and PostgreSQL; then the page itself runs in Debian's Chromium
driven by Playwright: it asks for the admin key, draws charts with data, loads nothing but from the
router, and a reward posted from it is stored. The screenshot is kept in var/test-artifacts/dashboard.png.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from router.api.auth import hash_key
from tests.conftest import backend_table, unavailable, write_config
from tests.fake_backend import FakeVLLM

ADMIN, CLIENT = "dashboard-admin-key", "dashboard-client-key"
ADMIN_BUDGET_USD = 1.0
PRICES = {"cheap": (100.0, 200.0), "dear": (1000.0, 2000.0)}  # per 1M tokens: answers of 3 + 1 tokens cost $0.0005 and $0.005
ARTIFACT = Path(__file__).resolve().parents[2] / "var" / "test-artifacts" / "dashboard.png"
CHROMIUM = "/usr/bin/chromium"


def _config(path: Path, database_url: str, ports: dict[str, int]) -> Path:
    backends = "".join(backend_table(name, ports[name], *PRICES[name]) for name in PRICES)
    extra = f"""policies = ["thompson", "random", "elo"]
default_policy = "thompson"
[budget]
target_usd_per_query = 0.002
[auth]
open_on_loopback = false
[[auth.keys]]
name = "ops"
role = "admin"
key_sha256 = "{hash_key(ADMIN)}"
max_spend_usd = {ADMIN_BUDGET_USD}
[[auth.keys]]
name = "team"
role = "client"
key_sha256 = "{hash_key(CLIENT)}"
"""
    return write_config(path, database_url, backends, extra)


@pytest.fixture
def fakes():
    servers = {name: FakeVLLM(name) for name in PRICES}
    servers["dear"].kv_cache_usage = 0.6
    yield servers
    for server in servers.values():
        server.close()


def _serve(tmp_path: Path, database_url: str, fakes: dict[str, FakeVLLM], start_router) -> tuple[object, list[str]]:
    """The router with 8 admin decisions (the first 5 rewarded) and one of the client key; returns it and the admin's decision ids."""
    router = start_router(_config(tmp_path / "router.toml", database_url, {name: s.port for name, s in fakes.items()}))
    decisions = []
    with httpx.Client(base_url=router.url, timeout=30) as http:
        for i in range(9):
            key = CLIENT if i == 8 else ADMIN
            body = {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]}
            response = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
            if key == ADMIN:
                decisions.append(response.json()["router"]["decision_id"])
        for i, decision_id in enumerate(decisions[:5]):
            reward = {"decision_id": decision_id, "reward": 0.2 * i}
            assert http.post("/v1/rewards", json=reward, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    return router, decisions


def _last(series: list) -> object:
    return series[-1]


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_dashboard_series_end_on_what_the_router_reports(database, request, tmp_path, fakes, start_router):
    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "pg_url")
    router, decisions = _serve(tmp_path, url, fakes, start_router)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=router.url, timeout=30) as http:
        assert http.get("/v1/dashboard").status_code == 401
        assert http.get("/v1/dashboard", headers={"Authorization": f"Bearer {CLIENT}"}).status_code == 403
        assert http.get("/v1/dashboard", params={"window_s": 1}, headers=admin).status_code == 400
        body = http.get("/v1/dashboard", params={"window_s": 600, "buckets": 20, "decisions": 5}, headers=admin).json()
        stats = http.get("/v1/policies/stats", headers=admin).json()

    assert body["caller"] == "ops" and body["active_policy"] == "thompson"
    assert len(body["t"]) == 20 and body["t"][-1] == pytest.approx(body["end"], abs=1e-3)
    assert body["end"] - body["start"] == pytest.approx(60) and body["bucket_s"] == pytest.approx(3)  # the log is younger than the window
    # The window holds the whole log, so every series ends where the router's running numbers are.
    for name, series in body["policies"].items():
        shadow = stats["policies"][name]["shadow"]
        assert _last(series["ips"]) == pytest.approx(shadow["ips"]) and _last(series["snips"]) == pytest.approx(shadow["snips"])
        own = stats["policies"][name]["decisions"].values()
        rewards = sum(d["rewards"] for d in own)
        assert _last(series["rewards"]) == rewards
        if rewards:
            assert _last(series["mean_reward"]) == pytest.approx(sum(d["mean_reward"] * d["rewards"] for d in own if d["rewards"]) / rewards)
    assert _last(body["policies"]["thompson"]["rewards"]) == 5 and _last(body["policies"]["thompson"]["mean_reward"]) == pytest.approx(0.4)
    spend = body["spend"]
    spent = sum(b["total_cost_usd"] for b in stats["backends"].values())
    assert spent > 0 and _last(spend["spent_usd"]) == pytest.approx(spent)
    assert spend["spent_usd"] == sorted(spend["spent_usd"])  # cumulative
    assert _last(spend["allowance_usd"]) == pytest.approx(0.002 * 9)  # the pacing target times the decisions that spent
    burn = spend["keys"]["ops"]
    assert burn["max_spend_usd"] == ADMIN_BUDGET_USD and burn["period"] == "total"
    assert _last(burn["remaining_usd"]) == pytest.approx(ADMIN_BUDGET_USD - stats["tenant_spend"]["ops"]["spent_usd"])
    assert burn["remaining_usd"][0] == pytest.approx(ADMIN_BUDGET_USD)  # before the first request, all of it
    # The newest decisions first, with their feedback and who made them.
    listed = body["decisions"]
    assert len(listed) == 5 and listed[0]["tenant"] == "team" and [d["decision_id"] for d in listed[1:]] == decisions[::-1][:4]
    assert [d["reward"] for d in listed] == [None, None, None, None, pytest.approx(0.8)]  # decision 4 got 0.2 * 4
    assert all(d["status"] == "ok" and d["query"].startswith("Question") and d["cost_usd"] > 0 for d in listed)


def test_the_page_draws_the_router_and_posts_feedback_from_chromium(tmp_path, sqlite_url, fakes, start_router):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        unavailable("playwright not installed: pip install -c constraints.txt -e '.[test]'")
    if not Path(CHROMIUM).exists():
        unavailable(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)")
    router, decisions = _serve(tmp_path, sqlite_url, fakes, start_router)
    unrated = decisions[-1]
    requested: list[str] = []
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requested.append(r.url))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            # The 401s before the key is given are logged by Chromium itself; anything else is the page's error.
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" and "status of 401" not in m.text else None)
            response = page.goto(f"{router.url}/dashboard")  # the page holds no data: served without a key
            assert response is not None and response.ok and "default-src 'self'" in response.headers["content-security-policy"]

            expect(page.locator("#key-form")).to_be_visible()  # no key yet: the page asks for one
            page.fill("#admin-key", ADMIN)
            page.click("#key-form button[type=submit]")
            expect(page.locator("#key-form")).to_be_hidden()
            expect(page.locator("#active-policy")).to_have_text("active policy: thompson")

            # Charts with data: the rewards and estimates of the rewarded decisions, the spend, the backends' live metrics.
            page.wait_for_function("() => window.dashboard.live.t.length >= 2", timeout=20_000)
            charts = page.evaluate("""() => Object.fromEntries(Object.entries(window.dashboard.charts).map(([id, chart]) =>
                [id, {series: chart.series.slice(1).map(s => s.label),
                      values: chart.data.slice(1).map(line => line.filter(v => v !== null && v !== undefined).length)}]))""")
            assert set(charts) == {"chart-reward", "chart-offpolicy", "chart-spend", "chart-budget", "chart-queue", "chart-kv"}
            assert charts["chart-reward"]["series"] == ["thompson", "random", "elo"]
            assert all(charts[c]["values"][0] > 0 for c in ("chart-reward", "chart-offpolicy"))  # thompson decided every request
            assert charts["chart-spend"]["series"] == ["spent", "pacing allowance"] and all(charts["chart-spend"]["values"])
            assert charts["chart-budget"]["series"] == ["ops: $1 in total"] and all(charts["chart-budget"]["values"])
            assert charts["chart-queue"]["series"] == ["cheap", "dear"] and all(charts["chart-queue"]["values"])
            assert all(charts["chart-kv"]["values"])
            assert page.evaluate("() => window.dashboard.live.kv.dear.at(-1)") == 0.6
            expect(page.locator("#backends tbody tr")).to_have_count(2)
            expect(page.locator("#backends tr[data-backend=dear] td").nth(6)).to_have_text("60.0%")

            # Feedback from the page: only on the admin key's own unrated decisions; it reaches /v1/rewards and is stored.
            expect(page.locator("#decisions tbody tr")).to_have_count(9)
            expect(page.locator("#decisions tbody tr").first.locator("td").last).to_have_text("key team only")
            expect(page.locator(f"tr[data-decision='{decisions[0]}'] td").last).to_have_text("reward 0")
            row = page.locator(f"tr[data-decision='{unrated}']")
            row.locator("input.reward").fill("0.8")
            row.locator("button.send").click()
            expect(page.locator(f"tr[data-decision='{unrated}'] td").last).to_have_text("reward 0.8")
            page.evaluate("() => window.scrollTo(0, 0)")
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACT), full_page=True)
        finally:
            browser.close()

    stored = {d.decision_id: d.reward for d in router.service.store.recent_decisions(20)}
    assert stored[unrated] == pytest.approx(0.8)
    assert router.service.engine.stats()["shadow"]["thompson"]["rewards"] == 6  # and every policy learned from it
    assert requested and all(url.startswith(router.url + "/") for url in requested), [u for u in requested if not u.startswith(router.url)]
    assert not problems, problems
