// The llm-router dashboard: polls the router's admin endpoints and draws them with uPlot (served by the
// router beside this file). The admin key, when the router needs one, is asked for once and kept in this
// tab's sessionStorage; it is sent only to this router, as `Authorization: Bearer`.
"use strict";

(() => {
  const KEY_STORE = "llm-router.admin-key";
  const REFRESH_MS = 5000;
  const BUCKETS = 60;
  const SAMPLES = 120; // live samples kept per backend: ten minutes at one per refresh
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"];

  // Everything the page holds, on `window` so it can be inspected (the browser test reads the charts' data).
  const state = { charts: {}, timeline: null, live: { t: [], queue: {}, kv: {} }, decisionsShown: null, timer: null };
  window.dashboard = state;

  const $ = (id) => document.getElementById(id);

  class NeedsKey extends Error {}

  async function call(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    const body = await response.json().catch(() => null);
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    return { ok: response.ok, status: response.status, body, message };
  }

  async function admin(path) {
    const result = await call(path);
    if (result.status === 401 || result.status === 403) throw new NeedsKey(result.message);
    if (!result.ok) throw new Error(`${path}: ${result.message}`);
    return result.body;
  }

  // -- formatting ------------------------------------------------------------------------------------

  const usd = (v) => (v === null || v === undefined ? "–" : `$${Number(v.toPrecision(3))}`);
  const num = (v, digits = 3) => (v === null || v === undefined ? "–" : Number(v.toFixed(digits)).toString());
  const ms = (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`);
  const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`);
  const when = (iso) => new Date(iso).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  // -- charts ----------------------------------------------------------------------------------------

  // `fromZero`: the y axis starts at 0 and reaches at least 1 (rewards and their estimates live in [0, 1]; IPS may pass 1).
  function draw(id, names, xs, ys, format, emptyText, fromZero = false) {
    const el = $(id);
    const signature = names.join("\u0000");
    let chart = state.charts[id];
    if (!chart || chart.signature !== signature) {
      if (chart) chart.destroy();
      el.textContent = "";
      chart = new uPlot({
        width: Math.max(el.clientWidth, 300),
        height: 220,
        series: [{}, ...names.map((name, i) => ({ label: name, stroke: PALETTE[i % PALETTE.length], width: 2, value: (_, v) => format(v) }))],
        axes: [{}, { values: (_, ticks) => ticks.map(format), size: 70 }],
        scales: fromZero ? { y: { range: (_, min, max) => [0, Math.max(1, max ?? 1)] } } : {},
      }, [xs, ...ys], el);
      chart.signature = signature;
      state.charts[id] = chart;
    } else {
      chart.setData([xs, ...ys]);
    }
    const empty = !ys.some((line) => line.some((v) => v !== null && v !== undefined));
    let note = el.querySelector(".empty");
    if (empty && !note) {
      note = document.createElement("div");
      note.className = "empty";
      el.appendChild(note);
    }
    if (note) {
      note.textContent = empty ? emptyText : "";
      note.hidden = !empty;
    }
  }

  function drawTimeline() {
    const timeline = state.timeline;
    if (!timeline) return;
    const names = Object.keys(timeline.policies);
    const estimator = $("estimator").value;
    draw("chart-reward", names, timeline.t, names.map((n) => timeline.policies[n].mean_reward), (v) => num(v, 2),
      "no rewards in this window yet", true);
    draw("chart-offpolicy", names, timeline.t, names.map((n) => timeline.policies[n][estimator]), (v) => num(v, 2),
      "no rewards in this window yet", true);
    const spend = timeline.spend;
    const paced = spend.allowance_usd !== null;
    draw("chart-spend", paced ? ["spent", "pacing allowance"] : ["spent"], timeline.t,
      paced ? [spend.spent_usd, spend.allowance_usd] : [spend.spent_usd], usd, "no spend in this window");
    const keys = Object.entries(spend.keys);
    draw("chart-budget", keys.map(([key, burn]) => `${key}: ${usd(burn.max_spend_usd)} ${burn.period === "total" ? "in total" : `per ${burn.period}`}`),
      timeline.t, keys.map(([, burn]) => burn.remaining_usd), usd, "no key has a spending budget");
  }

  function drawLive() {
    const live = state.live;
    const names = Object.keys(live.queue);
    draw("chart-queue", names, live.t, names.map((n) => live.queue[n]), (v) => num(v, 1), "no queue metrics (not vLLM?)");
    draw("chart-kv", names, live.t, names.map((n) => live.kv[n]), pct, "no KV-cache metrics (not vLLM?)");
  }

  // -- tables ----------------------------------------------------------------------------------------

  function renderBackends(backends) {
    const now = Date.now() / 1000;
    const live = state.live;
    live.t.push(now);
    for (const b of backends) {
      for (const series of [live.queue, live.kv]) {
        if (!series[b.name]) series[b.name] = live.t.slice(1).map(() => null);
      }
      const q = b.queue || {};
      const depth = q.num_requests_running === null && q.num_requests_waiting === null ? null : (q.num_requests_running || 0) + (q.num_requests_waiting || 0);
      live.queue[b.name].push(depth);
      live.kv[b.name].push(q.kv_cache_usage_perc ?? null);
    }
    for (const series of [live.queue, live.kv]) {
      for (const [name, values] of Object.entries(series)) {
        while (values.length < live.t.length) values.push(null);
        if (values.length > SAMPLES) series[name] = values.slice(-SAMPLES);
      }
    }
    if (live.t.length > SAMPLES) live.t = live.t.slice(-SAMPLES);
    drawLive();

    const body = $("backends").tBodies[0];
    body.textContent = "";
    for (const b of backends) {
      const row = body.insertRow();
      row.dataset.backend = b.name;
      cell(row, b.name);
      const health = cell(row, b.down_reason ? `down: ${b.down_reason}` : "up", b.down_reason ? "down" : "up");
      if (b.last_error) health.title = `last error: ${b.last_error}`;
      cell(row, b.breaker ? b.breaker.state : "–");
      cell(row, String(b.in_flight), "num");
      cell(row, num(b.queue.num_requests_running, 0), "num");
      cell(row, num(b.queue.num_requests_waiting, 0), "num");
      cell(row, pct(b.queue.kv_cache_usage_perc), "num");
      cell(row, b.max_model_len ? `${b.max_model_len} tokens` : "–", "num");
      cell(row, `${b.price_per_1m_input_tokens_usd} · ${b.price_per_1m_output_tokens_usd}`, "num");
    }
  }

  function renderPolicies(stats) {
    $("active-policy").textContent = `active policy: ${stats.active_policy}`;
    const body = $("policies").tBodies[0];
    body.textContent = "";
    for (const [name, policy] of Object.entries(stats.policies)) {
      const decisions = Object.values(policy.decisions || {});
      const made = decisions.reduce((n, d) => n + d.decisions, 0);
      const rewards = decisions.reduce((n, d) => n + d.rewards, 0);
      const rewardSum = decisions.reduce((s, d) => s + (d.mean_reward === null ? 0 : d.mean_reward * d.rewards), 0);
      const row = body.insertRow();
      row.dataset.policy = name;
      cell(row, name === stats.active_policy ? `${name} (active)` : name);
      cell(row, String(made), "num");
      cell(row, String(rewards), "num");
      cell(row, rewards ? num(rewardSum / rewards) : "–", "num");
      cell(row, num(policy.shadow.ips), "num");
      cell(row, num(policy.shadow.snips), "num");
    }
  }

  function renderDecisions(timeline) {
    // Rebuilt only when something changed, so a reward being typed in is not wiped by the next refresh.
    const shown = JSON.stringify([timeline.caller, timeline.decisions.map((d) => [d.decision_id, d.status, d.reward, d.preference])]);
    if (shown === state.decisionsShown) return;
    state.decisionsShown = shown;
    const body = $("decisions").tBodies[0];
    body.textContent = "";
    for (const d of timeline.decisions) {
      const row = body.insertRow();
      row.dataset.decision = d.decision_id;
      cell(row, when(d.created_at)).title = d.decision_id;
      cell(row, d.query, "query").title = d.query;
      cell(row, d.policy);
      cell(row, d.backend);
      cell(row, d.status, `status-${d.status}`).title = d.error || "";
      cell(row, usd(d.cost_usd ?? d.predicted_cost_usd), "num");
      cell(row, ms(d.latency_ms), "num");
      feedbackCell(row.insertCell(), d, timeline.caller);
    }
  }

  function feedbackCell(td, d, caller) {
    if (d.reward !== null) {
      td.textContent = `reward ${num(d.reward, 2)}`;
      td.className = "given";
      return;
    }
    if (d.preference) {
      td.textContent = `${d.preference[0]} preferred over ${d.preference[1]}`;
      return;
    }
    if (d.status === "error" || d.status === "rejected") {
      td.textContent = "no answer";
      return;
    }
    if (d.tenant !== caller) {
      td.textContent = `key ${d.tenant ?? "(open)"} only`;
      td.title = "Only the key that made a decision may give feedback on it.";
      return;
    }
    const box = document.createElement("div");
    box.className = "feedback";
    const input = Object.assign(document.createElement("input"), { type: "number", min: "0", max: "1", step: "0.1", value: "1", className: "reward" });
    input.setAttribute("aria-label", `reward for ${d.decision_id}`);
    const button = Object.assign(document.createElement("button"), { type: "button", textContent: "Send", className: "send" });
    const status = Object.assign(document.createElement("span"), { className: "feedback-status" });
    button.addEventListener("click", () => sendReward(d.decision_id, input, button, status));
    box.append(input, button, status);
    td.appendChild(box);
  }

  async function sendReward(decisionId, input, button, status) {
    const reward = Number(input.value);
    status.classList.remove("failed");
    if (input.value === "" || !(reward >= 0 && reward <= 1)) {
      status.textContent = "a reward is a number in [0, 1]";
      status.classList.add("failed");
      return;
    }
    button.disabled = true;
    status.textContent = "sending…";
    try {
      const result = await call("/v1/rewards", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ decision_id: decisionId, reward }),
      });
      if (!result.ok) throw new Error(result.message);
      status.textContent = result.body.duplicate ? "already recorded" : "recorded";
      await refresh();
    } catch (error) {
      status.textContent = error.message;
      status.classList.add("failed");
      button.disabled = false;
    }
  }

  // -- the loop --------------------------------------------------------------------------------------

  function showError(message) {
    $("error").textContent = message || "";
    $("error").hidden = !message;
  }

  function askForKey(reason) {
    $("key-reason").textContent = sessionStorage.getItem(KEY_STORE)
      ? `The key was refused (${reason}): enter an admin API key.`
      : "This page shows admin data: enter an admin API key.";
    $("key-form").hidden = false;
    $("admin-key").focus();
  }

  async function refresh() {
    clearTimeout(state.timer);
    try {
      const windowS = Number($("window").value);
      const [timeline, backends, stats] = await Promise.all([
        admin(`/v1/dashboard?window_s=${windowS}&buckets=${BUCKETS}&decisions=50`),
        admin("/v1/backends"),
        admin("/v1/policies/stats"),
      ]);
      $("key-form").hidden = true;
      $("forget-key").hidden = !sessionStorage.getItem(KEY_STORE);
      showError("");
      state.timeline = timeline;
      drawTimeline();
      renderBackends(backends.backends);
      renderPolicies(stats);
      renderDecisions(timeline);
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      if (error instanceof NeedsKey) {
        askForKey(error.message);
        return; // polling resumes once a key is given
      }
      showError(error.message);
    }
    state.timer = setTimeout(refresh, REFRESH_MS);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("admin-key").value.trim());
    $("admin-key").value = "";
    state.decisionsShown = null;
    refresh();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    location.reload();
  });
  $("window").addEventListener("change", refresh);
  $("estimator").addEventListener("change", drawTimeline);
  window.addEventListener("resize", () => {
    for (const [id, chart] of Object.entries(state.charts)) chart.setSize({ width: Math.max($(id).clientWidth, 300), height: 220 });
  });
  refresh();
})();
