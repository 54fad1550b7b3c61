// Gannet dashboard: overview (live counts, charts, deferrals, refusals), the
// message list with search, and a message page with its trace and actions.
// Talks only to the JSON API (/api/..., see /api/openapi.json). Builds the page
// with DOM calls and textContent, never innerHTML: every string from the
// network (addresses, replies) is shown as text.
"use strict";

(function () {
  const REFRESH_MS = 3000;
  const TOKEN_KEY = "gannet-admin-token";
  const view = document.getElementById("view");
  const live = document.getElementById("live");
  let stopCurrent = () => {};

  // -- helpers -----------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }
  const fmt = new Intl.NumberFormat();
  const num = (n) => fmt.format(n || 0);

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "";
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return `${seconds}s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
    return `${Math.floor(seconds / 86400)}d ${Math.floor((seconds % 86400) / 3600)}h`;
  }
  const since = (iso) => (iso ? age((Date.now() - Date.parse(iso)) / 1000) : "");
  function until(iso) {
    if (!iso) return "";
    const s = (Date.parse(iso) - Date.now()) / 1000;
    return s <= 1 ? "now" : `in ${age(s)}`;
  }
  function clock(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    const today = new Date().toDateString() === d.toDateString();
    const time = d.toLocaleTimeString([], { hour12: false });
    return today ? time : `${d.toLocaleDateString()} ${time}`;
  }
  const chip = (state, label) => h("span", { class: `chip st-${state}`, "data-state": state }, label || state);

  function toast(text) {
    const t = document.getElementById("toast");
    t.textContent = text;
    t.classList.add("show");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => t.classList.remove("show"), 2500);
  }

  function setLive(ok, text) {
    live.className = `live ${ok ? "ok" : "bad"}`;
    live.querySelector("span").textContent = text;
  }

  // -- the API -------------------------------------------------------------------------------
  class Unauthorized extends Error {}

  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status === 401) {
      askToken();
      throw new Unauthorized("a token is needed");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  function askToken() {
    const dialog = document.getElementById("token-dialog");
    if (!dialog.open) dialog.showModal();
  }
  document.getElementById("token-form").addEventListener("submit", () => {
    localStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
    route();
  });

  // Runs `refresh` now and every REFRESH_MS until the page changes.
  function every(refresh) {
    let timer = null;
    let stopped = false;
    const tick = async () => {
      try {
        await refresh();
        setLive(true, `live · ${new Date().toLocaleTimeString([], { hour12: false })}`);
      } catch (err) {
        setLive(false, err instanceof Unauthorized ? "token needed" : "unreachable");
        if (!(err instanceof Unauthorized)) console.warn(err);
      }
      if (!stopped) timer = setTimeout(tick, REFRESH_MS);
    };
    tick();
    return () => { stopped = true; clearTimeout(timer); };
  }

  // -- overview ----------------------------------------------------------------------------
  const SERIES = [
    { key: "received", cls: "s-received", label: "received" },
    { key: "delivered", cls: "s-delivered", label: "delivered" },
    { key: "deferred", cls: "s-deferred", label: "deferred" },
    { key: "bounced", cls: "s-bounced", label: "bounced" },
  ];
  const STATES = ["queued", "delivering", "deferred", "held", "quarantined"];

  function card(id, label, cls) {
    const value = h("div", { class: "value", "data-testid": `card-${id}` }, "–");
    const sub = h("div", { class: "sub" });
    return { node: h("div", { class: `card ${cls || ""}` }, h("div", { class: "label" }, label), value, sub), value, sub };
  }

  function chartPanel(title, testid) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("data-testid", testid);
    const legend = h("div", { class: "legend" });
    return { node: h("section", { class: "panel" }, h("h2", {}, title), svg, legend), svg, legend };
  }

  function renderLegend(legend, series, points, index) {
    const at = index === null || index === undefined ? points.length - 1 : index;
    const p = points[at];
    const when = p ? (index === null || index === undefined ? "this minute" : p.at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false })) : "";
    legend.replaceChildren(
      ...series.map((s) => h("span", {}, h("i", { class: s.cls }), `${s.label} `, h("b", {}, p ? num(p.values[s.key] ?? 0) : "–"))),
      h("span", { class: "muted" }, when),
    );
  }

  function overview() {
    const cards = {
      queue: card("queue", "In queue"),
      oldest: card("oldest", "Oldest"),
      received: card("received", "Received", "received"),
      delivered: card("delivered", "Delivered", "delivered"),
      deferred: card("deferred", "Deferred", "deferred"),
      bounced: card("bounced", "Bounced", "bounced"),
      sessions: card("sessions", "Sessions"),
      tls: card("tls", "With TLS"),
    };
    const queueChart = chartPanel("Queue size (recipients waiting)", "chart-queue");
    const flowChart = chartPanel("Throughput per minute", "chart-throughput");
    const deferrals = h("tbody", { "data-testid": "deferrals" });
    const auth = h("tbody", { "data-testid": "auth-failures" });
    const refused = h("tbody", { "data-testid": "refused" });
    const table = (head, body) => h("table", {}, h("thead", {}, h("tr", {}, head.map(([t, c]) => h("th", { class: c || "" }, t)))), body);

    view.replaceChildren(
      h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Overview"), h("div", { class: "muted", id: "started" }))),
      h("div", { class: "cards" }, Object.values(cards).map((c) => c.node)),
      h("div", { class: "grid2" }, queueChart.node, flowChart.node),
      h("section", { class: "panel" },
        h("div", { class: "panel-head" }, h("h2", {}, "Top deferral reasons by destination"),
          h("a", { href: "#/messages?state=deferred" }, "deferred messages →")),
        table([["Destination"], ["Reason"], ["Recipients", "num"], [""], ["Oldest", "num"]], deferrals)),
      h("div", { class: "grid2" },
        h("section", { class: "panel" }, h("h2", {}, "Recent authentication failures"),
          table([["When"], ["Client"], ["User"], ["Listener"]], auth)),
        h("section", { class: "panel" }, h("h2", {}, "Recent refused connections and commands"),
          table([["When"], ["Client"], ["What"]], refused))),
    );

    let series = [];
    const drawCharts = () => {
      const queuePoints = series.map((p) => ({ at: new Date(p.at), values: { queue: p.queue } }));
      const queueSeries = [{ key: "queue", cls: "s-queue", label: "waiting", area: true }];
      GannetCharts.lineChart(queueChart.svg, queuePoints, queueSeries, (i) => renderLegend(queueChart.legend, queueSeries, queuePoints, i));
      renderLegend(queueChart.legend, queueSeries, queuePoints, null);
      const flowPoints = series.map((p) => ({ at: new Date(p.at), values: p }));
      GannetCharts.lineChart(flowChart.svg, flowPoints, SERIES, (i) => renderLegend(flowChart.legend, SERIES, flowPoints, i));
      renderLegend(flowChart.legend, SERIES, flowPoints, null);
    };
    const onResize = () => series.length && drawCharts();
    window.addEventListener("resize", onResize);

    let minutes = 15;  // the charts' window: 15 minutes for a fresh server, growing to an hour
    const stop = every(async () => {
      const [stats, s, d, e] = await Promise.all([
        api("/api/stats"), api(`/api/series?minutes=${minutes}`), api("/api/deferrals?limit=10"), api("/api/events?limit=8"),
      ]);
      document.getElementById("host").textContent = stats.hostname || "";
      document.getElementById("started").textContent = `counts since the server started ${since(stats.started_at)} ago`;
      const states = stats.queue.states;
      const waiting = STATES.reduce((sum, st) => sum + (states[st] ? states[st].recipients : 0), 0);
      cards.queue.value.textContent = num(waiting);
      cards.queue.sub.replaceChildren(h("div", { class: "chips" },
        STATES.filter((st) => states[st]).map((st) => h("a", { href: `#/messages?state=${st}` }, chip(st, `${num(states[st].recipients)} ${st}`)))));
      const oldest = Math.max(-1, ...Object.values(states).map((st) => st.oldest_age_seconds));
      cards.oldest.value.textContent = oldest >= 0 ? age(oldest) : "–";
      cards.oldest.sub.textContent = `${num(stats.queue.messages)} message(s) queued`;
      for (const k of ["received", "delivered", "deferred", "bounced"]) cards[k].value.textContent = num(stats.totals[k]);
      cards.received.sub.textContent = "recipients";
      cards.deferred.sub.textContent = "attempts";
      cards.sessions.value.textContent = num(stats.sessions.open);
      cards.sessions.sub.textContent = `open now; ${num(stats.totals.sessions)} ended`;
      const ended = stats.sessions.ended_with_tls + stats.sessions.ended_without_tls;
      cards.tls.value.textContent = ended ? `${Math.round((100 * stats.sessions.ended_with_tls) / ended)}%` : "–";
      cards.tls.sub.textContent = `${num(stats.totals.auth_failures)} auth failures`;

      series = s.points;
      drawCharts();
      minutes = Math.min(60, Math.max(15, Math.ceil((Date.now() - Date.parse(stats.started_at)) / 60000) + 1));

      deferrals.replaceChildren(...(d.deferrals.length ? (() => {
        const top = Math.max(...d.deferrals.map((r) => r.recipients));
        return d.deferrals.map((r) => {
          const bar = h("div", { class: "bar" });
          bar.style.width = `${Math.max(2, (100 * r.recipients) / top)}%`;
          return h("tr", { class: "link", onclick: () => { location.hash = `#/messages?domain=${encodeURIComponent(r.domain)}&state=deferred`; } },
            h("td", { class: "nowrap" }, h("b", {}, r.domain)), h("td", { class: "reason" }, r.reason),
            h("td", { class: "num" }, num(r.recipients)), h("td", { class: "bar-cell" }, bar),
            h("td", { class: "num nowrap" }, age(r.oldest_age_seconds)));
        });
      })() : [h("tr", {}, h("td", { colspan: 5, class: "empty" }, "Nothing deferred. All destinations are taking mail."))]));

      auth.replaceChildren(...(e.auth_failures.length ? e.auth_failures.map((ev) => h("tr", {},
        h("td", { class: "nowrap", title: ev.at }, clock(ev.at)), h("td", { class: "mono" }, ev.client),
        h("td", {}, ev.detail), h("td", { class: "muted mono" }, ev.listener)))
        : [h("tr", {}, h("td", { colspan: 4, class: "empty" }, "No failed logins since the server started."))]));
      refused.replaceChildren(...(e.refused.length ? e.refused.map((ev) => h("tr", {},
        h("td", { class: "nowrap", title: ev.at }, clock(ev.at)), h("td", { class: "mono" }, ev.client),
        h("td", { class: "reason" }, ev.detail)))
        : [h("tr", {}, h("td", { colspan: 3, class: "empty" }, "Nothing refused since the server started."))]));
    });
    return () => { stop(); window.removeEventListener("resize", onResize); };
  }

  // -- the message list ----------------------------------------------------------------------
  function messages(params) {
    const q = h("input", { type: "search", placeholder: "Search: queue ID, address, Message-ID or domain", value: params.get("q") || "", "data-testid": "search" });
    const state = h("select", { "data-testid": "state-filter" }, h("option", { value: "" }, "any state"),
      STATES.map((st) => h("option", { value: st, selected: params.get("state") === st }, st)));
    const older = h("select", { "data-testid": "age-filter" }, [["", "any age"], ["5m", "older than 5 min"], ["1h", "older than 1 hour"], ["1d", "older than 1 day"]]
      .map(([v, t]) => h("option", { value: v, selected: params.get("older_than") === v }, t)));
    const body = h("tbody", { "data-testid": "messages" });
    const note = h("div", { class: "muted" });
    const retryAll = h("button", { onclick: async () => {
      if (!confirm("Retry every deferred recipient now?")) return;
      const r = await api("/api/queue/retry", { method: "POST" });
      toast(`${r.recipients} recipient(s) due now`);
    } }, "Retry all deferred");
    const apply = () => {
      const p = new URLSearchParams();
      if (q.value.trim()) p.set("q", q.value.trim());
      if (state.value) p.set("state", state.value);
      if (older.value) p.set("older_than", older.value);
      if (params.get("domain")) p.set("domain", params.get("domain"));
      location.hash = `#/messages${p.toString() ? "?" + p : ""}`;
    };
    q.addEventListener("keydown", (ev) => { if (ev.key === "Enter") apply(); });
    state.addEventListener("change", apply);
    older.addEventListener("change", apply);
    const domain = params.get("domain");
    view.replaceChildren(
      h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Messages"), note), h("div", { class: "actions" }, retryAll)),
      h("div", { class: "toolbar" }, q, state, older, h("button", { class: "primary", onclick: apply }, "Search")),
      domain ? h("p", {}, "Recipients at ", h("b", {}, domain), " · ", h("a", { href: "#/messages" }, "show all")) : null,
      h("section", { class: "panel" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Queue ID", "Received", "Sender", "Recipients", "Attempts", "Next attempt", "Last error"].map((t) => h("th", {}, t)))),
        body)),
    );
    const query = new URLSearchParams();
    for (const k of ["q", "state", "older_than", "domain", "sender", "recipient"]) if (params.get(k)) query.set(k, params.get(k));
    query.set("limit", "200");
    return every(async () => {
      const r = await api(`/api/messages?${query}`);
      note.textContent = r.messages.length ? `${r.messages.length}${r.truncated ? "+" : ""} message(s), oldest first` : "";
      body.replaceChildren(...(r.messages.length ? r.messages.map((m) => {
        const attempts = Math.max(0, ...m.recipients.map((x) => x.attempts));
        const next = m.recipients.map((x) => x.next_attempt).filter(Boolean).sort()[0];
        const error = m.recipients.map((x) => x.last_error).find(Boolean) || "";
        return h("tr", { class: "link", "data-id": m.id, onclick: () => { location.hash = `#/message/${m.id}`; } },
          h("td", { class: "mono nowrap" }, h("a", { href: `#/message/${m.id}` }, m.id)),
          h("td", { class: "nowrap", title: m.received_at }, `${since(m.received_at)} ago`),
          h("td", {}, m.sender ? m.sender : h("span", { class: "muted" }, "<> (bounce)")),
          h("td", {}, m.recipients.map((x) => h("div", {}, x.address, " ", chip(x.state)))),
          h("td", { class: "num" }, attempts), h("td", { class: "nowrap" }, until(next)),
          h("td", { class: "reason" }, error));
      }) : [h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No message matches. The queue may simply be empty: mail that was delivered has left it."))]));
    });
  }

  // -- one message ---------------------------------------------------------------------------
  function message(id) {
    const title = h("h1", { class: "mono" }, id);
    const subtitle = h("div", { class: "muted" });
    const facts = h("dl", { class: "facts" });
    const rcpts = h("tbody", { "data-testid": "recipients" });
    const timeline = h("ol", { class: "timeline", "data-testid": "trace" });
    const headers = h("pre", { class: "headers" });
    const act = (label, path, method, cls, confirmText) => h("button", { class: cls || "", "data-action": label.toLowerCase(), onclick: async (ev) => {
      if (confirmText && !confirm(confirmText)) return;
      ev.target.disabled = true;
      try {
        const r = await api(path, { method });
        toast(r.deleted ? `${id} deleted` : label === "Retry" ? `${r.recipients} recipient(s) due now` : `${id}: ${label.toLowerCase()} done`);
        if (r.deleted) { location.hash = "#/messages"; return; }
        await refreshNow();
      } catch (err) { toast(err.message); } finally { ev.target.disabled = false; }
    } }, label);
    const holdButton = act("Hold", `/api/messages/${id}/hold`, "POST");
    const releaseButton = act("Release", `/api/messages/${id}/release`, "POST");
    const actions = h("div", { class: "actions" }, act("Retry", `/api/messages/${id}/retry`, "POST", "primary"), holdButton, releaseButton,
      act("Delete", `/api/messages/${encodeURIComponent(id)}`, "DELETE", "danger", `Delete ${id} without delivering it?`));
    const main = h("div", {},
      h("div", { class: "page-head" }, h("div", {}, h("a", { href: "#/messages" }, "← messages"), title, subtitle), actions),
      h("div", { class: "grid2" },
        h("section", { class: "panel" }, h("h2", {}, "Envelope"), facts),
        h("section", { class: "panel" }, h("h2", {}, "Recipients"), h("table", {},
          h("thead", {}, h("tr", {}, ["Address", "State", "Attempts", "Next attempt"].map((t) => h("th", {}, t)))), rcpts))),
      h("section", { class: "panel" }, h("h2", {}, "Trace"), timeline),
      h("section", { class: "panel" }, h("details", {}, h("summary", {}, "Headers"), headers)));
    view.replaceChildren(main);

    const fact = (k, v) => [h("dt", {}, k), h("dd", {}, v || h("span", { class: "muted" }, "–"))];
    async function load() {
      let m = null;
      try {
        m = await api(`/api/messages/${encodeURIComponent(id)}`);
      } catch (err) {
        if (err instanceof Unauthorized) throw err;
        actions.hidden = true;  // gone from the queue: delivered, bounced or deleted; the trace remains
        subtitle.textContent = "no longer in the queue";
      }
      let trace = { events: [] };
      try { trace = await api(`/api/trace/${encodeURIComponent(id)}`); } catch (err) { if (err instanceof Unauthorized) throw err; }
      if (m) {
        subtitle.textContent = `${m.held ? "held · " : ""}${m.recipients.length} recipient(s) · received ${since(m.received_at)} ago`;
        holdButton.hidden = m.held;
        releaseButton.hidden = !m.held;
        facts.replaceChildren(...fact("From", m.sender || "<> (bounce)"), ...fact("Size", `${num(m.size)} bytes`),
          ...fact("Received", clock(m.received_at)), ...fact("Client", m.client), ...fact("Login", m.auth_user),
          ...fact("Message-ID", m.message_id));
        rcpts.replaceChildren(...m.recipients.map((r) => h("tr", {},
          h("td", {}, r.address, r.last_error ? h("div", { class: "reason" }, r.last_error) : null),
          h("td", {}, chip(r.state)), h("td", { class: "num", "data-testid": "attempts" }, r.attempts),
          h("td", { class: "nowrap", "data-testid": "next-attempt", title: r.next_attempt || "" }, until(r.next_attempt)))));
        headers.textContent = m.headers;
      } else if (!trace.events.length) {
        view.replaceChildren(h("div", { class: "error-box" }, `No message ${id} in the queue or its history.`));
        return;
      }
      timeline.replaceChildren(...trace.events.map((e) => h("li", { "data-event": e.event },
        h("span", { class: "when", title: e.at }, clock(e.at)), h("span", { class: `dot ev-${e.event}` }),
        h("span", {}, h("span", { class: "ev" }, e.event), e.recipient ? h("span", {}, `<${e.recipient}> `) : null,
          h("span", { class: "detail" }, e.detail)))));
    }
    let refreshNow = load;
    return every(load);
  }

  // -- routing ---------------------------------------------------------------------------------
  function route() {
    stopCurrent();
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    const params = new URLSearchParams(query || "");
    const page = path.startsWith("/message/") ? "messages" : path.startsWith("/messages") ? "messages" : "overview";
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === page));
    if (path.startsWith("/message/")) stopCurrent = message(decodeURIComponent(path.slice("/message/".length)));
    else if (path.startsWith("/messages")) stopCurrent = messages(params);
    else stopCurrent = overview();
  }
  window.addEventListener("hashchange", route);
  route();
})();
