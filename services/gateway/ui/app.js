// The Capstan dashboard: one page, plain DOM, the gateway's /v1/ API.
// Every text from the API goes in with textContent, never as HTML.
"use strict";

const state = { who: null, csrf: "", streams: [], timers: [] };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    // Through the CSSOM: the page's CSP allows no style attributes.
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function toast(text, bad) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.className = bad ? "bad" : "";
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 4000);
}

class Problem extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || "HTTP " + status);
    this.status = status;
    this.body = body || {};
  }
}

async function api(method, path, body, contentType) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = state.csrf;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = contentType || "application/json";
    payload = typeof body === "string" ? body : JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
  if (response.status === 401 && path !== "/ui/session") {
    state.who = null;
    location.hash = "#/login";
    throw new Problem(401, data);
  }
  if (!response.ok) throw new Problem(response.status, data);
  return data;
}

function isAdmin() { return state.who && state.who.role === "admin"; }
function canWrite() { return state.who && (state.who.role === "admin" || state.who.role === "deployer"); }

function time(ms) {
  if (!ms) return "";
  const date = new Date(Number(ms));
  return date.toLocaleString();
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - Number(ms)) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.round(s / 60) + "m ago";
  if (s < 86400) return Math.round(s / 3600) + "h ago";
  return Math.round(s / 86400) + "d ago";
}

function shortState(value) {
  return String(value || "").replace(/^[A-Z]+_STATE_|^NODE_STATUS_/, "").toLowerCase();
}

function healthPill(app) {
  const desired = app.spec ? app.spec.replicas : 0;
  const healthy = app.healthy || 0;
  const cls = app.deleting ? "warn" : desired === 0 ? "" : healthy >= desired ? "ok" : healthy > 0 ? "warn" : "bad";
  const text = app.deleting ? "deleting" : healthy + "/" + desired + " healthy";
  return el("span", { class: "pill " + cls, "data-health": healthy + "/" + desired }, text);
}

function stopLive() {
  state.streams.forEach((s) => s.close());
  state.timers.forEach((t) => clearInterval(t));
  state.streams = [];
  state.timers = [];
}

function render(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function problemList(problem) {
  const errors = (problem.body && problem.body.errors) || [];
  return el("div", { id: "problem" },
    el("p", { class: "errors" }, problem.message),
    errors.length ? el("ul", { class: "errors", id: "field-errors" },
      errors.map((e) => el("li", { "data-field": e.field }, el("code", {}, e.field), " ", e.reason))) : null);
}

// ---- pages ----

function loginPage() {
  const input = el("input", { id: "api-key", type: "password", placeholder: "cap_…", autocomplete: "off" });
  const out = el("div");
  const submit = async (event) => {
    event.preventDefault();
    out.replaceChildren();
    try {
      const who = await api("POST", "/ui/session", { api_key: input.value });
      signedIn(who);
      location.hash = "#/apps";
    } catch (problem) {
      out.replaceChildren(problemList(problem));
    }
  };
  render(el("form", { class: "panel login", onsubmit: submit },
    el("h1", {}, "Sign in"),
    el("p", { class: "muted" }, "Paste an API key. `capstan dev` writes the admin's to <data-dir>/admin.key; an admin makes others with `capstan key create`."),
    input,
    el("button", { class: "primary", id: "sign-in", type: "submit" }, "Sign in"),
    out));
  input.focus();
}

async function appsPage() {
  const { apps } = await api("GET", "/v1/apps");
  const deploy = canWrite() ? el("a", { class: "button primary", href: "#/deploy", id: "new-app" }, "Deploy an app") : null;
  if (!apps.length) {
    render(el("div", { class: "panel empty" },
      el("h2", {}, "No apps yet"),
      el("p", {}, "An app is a spec: what to run, how many, how to check it and where to route it."),
      deploy || el("p", {}, "Ask a deployer of your project to deploy one.")));
    return;
  }
  render(
    el("div", { class: "head" }, el("h1", {}, "Apps"), deploy),
    el("div", { class: "panel scroll" }, el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", { class: "opt" }, "Project"), el("th", {}, "Health"),
        el("th", { class: "opt" }, "Rollout"), el("th", { class: "opt" }, "Hosts"), el("th", { class: "opt" }, "Updated"))),
      el("tbody", {}, apps.map((app) => el("tr", { "data-app": app.spec.name },
        el("td", {}, el("a", { href: "#/apps/" + encodeURIComponent(app.spec.name) }, app.spec.name)),
        el("td", { class: "opt" }, app.spec.project),
        el("td", {}, healthPill(app)),
        el("td", { class: "opt" }, shortState(app.rollout && app.rollout.state)),
        el("td", { class: "opt mono" }, (app.spec.route ? app.spec.route.hosts : []).join(", ")),
        el("td", { class: "opt muted" }, ago(app.updated_at_ms))))))));
}

function deployPage() {
  const spec = el("textarea", { id: "spec", spellcheck: "false", placeholder: 'name = "hello"\nreplicas = 2\n\n[run]\ncommand = ["python3", "-m", "http.server", "${PORT}"]\n\n[route]\nhosts = ["hello.localhost"]' });
  const file = el("input", { id: "spec-file", type: "file", accept: ".toml" });
  file.addEventListener("change", async () => { if (file.files[0]) spec.value = await file.files[0].text(); });
  const out = el("div");
  const button = el("button", { class: "primary", id: "deploy" }, "Deploy");
  button.addEventListener("click", async () => {
    out.replaceChildren();
    button.disabled = true;
    try {
      const reply = await api("POST", "/v1/apps", spec.value, "application/toml");
      toast((reply.created ? "Created " : "Updated ") + reply.app.spec.name);
      location.hash = "#/apps/" + encodeURIComponent(reply.app.spec.name);
    } catch (problem) {
      out.replaceChildren(problemList(problem));
    } finally {
      button.disabled = false;
    }
  });
  render(
    el("div", { class: "head" }, el("h1", {}, "Deploy an app"), el("a", { href: "#/apps" }, "Back to apps")),
    el("div", { class: "panel" },
      el("p", { class: "muted" }, "Paste a spec (TOML, as `capstan app deploy` takes) or upload one. Deploying an existing name updates it with a rolling update."),
      el("div", { class: "row" }, file), el("p"), spec, el("p"), button, out));
}

function chart(points) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  if (points.length > 1) {
    const max = Math.max(...points.map((p) => p.value), 1e-9);
    const first = Number(points[0].at_ms), span = Math.max(1, Number(points[points.length - 1].at_ms) - first);
    const d = points.map((p, i) => (i ? "L" : "M") + ((Number(p.at_ms) - first) / span * 300).toFixed(1) + "," + (98 - p.value / max * 94).toFixed(1)).join(" ");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

async function appPage(name) {
  const app = await api("GET", "/v1/apps/" + encodeURIComponent(name));
  const header = el("div", { class: "head" });
  const summary = el("div", { class: "grid" });
  const instances = el("div", { class: "panel scroll" });
  const events = el("ul", { class: "events", id: "events" });
  const logs = el("pre", { class: "logs", id: "logs" }, "…");
  const cpu = el("div", { id: "chart" });
  const actions = el("div", { class: "row" });
  const update = (app) => {
    const desired = app.spec.replicas, rollout = app.rollout || {};
    const done = rollout.desired ? Math.min(100, Math.round((rollout.updated || 0) / rollout.desired * 100)) : 100;
    header.replaceChildren(
      el("div", {}, el("h1", {}, app.spec.name), el("span", { class: "muted" }, "project " + app.spec.project + " · template " + app.spec_hash)),
      healthPill(app));
    summary.replaceChildren(
      el("div", { class: "panel" }, el("h2", {}, "Health"), el("div", { class: "stat", id: "app-health" }, app.healthy + "/" + desired), el("div", { class: "muted" }, "instances healthy")),
      el("div", { class: "panel", id: "rollout" }, el("h2", {}, "Rollout"),
        el("div", { class: "row" }, el("span", { class: "pill" }, shortState(rollout.state)), el("span", { class: "muted" }, rollout.message || "")),
        el("p"), el("div", { class: "bar" }, el("span", { style: "width:" + done + "%" }))),
      el("div", { class: "panel" }, el("h2", {}, "CPU % (15 min)"), cpu));
    instances.replaceChildren(el("h2", {}, "Instances"), app.instances.length ? el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "Instance"), el("th", {}, "State"), el("th", { class: "opt" }, "Node"), el("th", { class: "opt" }, "Address"), el("th", { class: "opt" }, "Template"))),
      el("tbody", {}, app.instances.map((i) => el("tr", { "data-instance": i.id },
        el("td", { class: "mono" }, i.id), el("td", {}, el("span", { class: "pill " + (shortState(i.state) === "healthy" ? "ok" : "warn") }, shortState(i.state))),
        el("td", { class: "opt mono" }, i.node_id), el("td", { class: "opt mono" }, i.address), el("td", { class: "opt mono" }, i.spec_hash))))) :
      el("p", { class: "muted" }, desired ? "Placing instances…" : "Scaled to zero."));
  };
  update(app);
  if (canWrite()) {
    const replicas = el("input", { id: "replicas", type: "number", min: "0", max: "1000", value: String(app.spec.replicas), style: "width:90px" });
    const act = (label, id, run, cls) => el("button", { id, class: cls, onclick: async () => {
      try { update(await run()); toast(label + ": done"); } catch (p) { toast(p.message, true); }
    } }, label);
    actions.append(
      el("label", {}, "Replicas "), replicas,
      act("Scale", "scale", () => api("POST", "/v1/apps/" + encodeURIComponent(name) + "/scale", { replicas: Number(replicas.value) })),
      act("Restart", "restart", () => api("POST", "/v1/apps/" + encodeURIComponent(name) + "/restart", {})),
      act("Roll back", "rollback", () => api("POST", "/v1/apps/" + encodeURIComponent(name) + "/rollback", {})),
      el("button", { class: "danger", id: "delete", onclick: async () => {
        if (!confirm("Delete " + name + "? Its instances are taken out of rotation, then stopped.")) return;
        try { await api("DELETE", "/v1/apps/" + encodeURIComponent(name)); toast("Deleting " + name); location.hash = "#/apps"; } catch (p) { toast(p.message, true); }
      } }, "Delete"));
  }
  render(header, canWrite() ? el("div", { class: "panel" }, actions) : null, summary, instances,
    el("div", { class: "grid" },
      el("div", { class: "panel" }, el("h2", {}, "Events"), events),
      el("div", { class: "panel" }, el("div", { class: "row", style: "justify-content:space-between" }, el("h2", {}, "Logs"), el("a", { href: "#/apps/" + encodeURIComponent(name), id: "logs-refresh", onclick: (e) => { e.preventDefault(); loadLogs(); } }, "Refresh")), logs)));
  const addEvent = (e) => events.prepend(el("li", {}, el("span", { class: "muted" }, ago(e.time_ms) + " "), el("strong", {}, e.kind), " ", e.message || "", e.instance_id ? el("span", { class: "muted mono" }, " " + e.instance_id) : null));
  const loadLogs = async () => {
    try {
      const lines = await api("GET", "/v1/apps/" + encodeURIComponent(name) + "/logs?tail=200");
      logs.textContent = lines.length ? lines.map((l) => (l.instance_id + " | " + l.text)).join("\n") : "No output yet.";
    } catch (p) { logs.textContent = p.message; }
  };
  const loadChart = async () => {
    try {
      const q = "/v1/apps/" + encodeURIComponent(name) + "/metrics?metric=cpu_percent&aggregate=avg&since_ms=" + (Date.now() - 15 * 60 * 1000);
      const reply = await api("GET", q);
      const points = reply.series && reply.series[0] ? reply.series[0].points : [];
      cpu.replaceChildren(points.length > 1 ? chart(points) : el("p", { class: "muted" }, "No samples yet."));
    } catch (p) { cpu.replaceChildren(el("p", { class: "muted" }, p.message)); }
  };
  let pending = false;
  const refresh = async () => {
    if (pending) return;
    pending = true;
    try { update(await api("GET", "/v1/apps/" + encodeURIComponent(name))); } catch (_) { /* shown on the next try */ }
    pending = false;
  };
  const stream = new EventSource("/v1/events/stream?app=" + encodeURIComponent(name) + "&history=30");
  stream.onmessage = (m) => { try { addEvent(JSON.parse(m.data)); } catch (_) { /* keep-alive */ } refresh(); };
  state.streams.push(stream);
  state.timers.push(setInterval(refresh, 2000), setInterval(loadLogs, 5000), setInterval(loadChart, 15000));
  loadLogs();
  loadChart();
}

async function nodesPage() {
  const { nodes } = await api("GET", "/v1/nodes");
  if (!nodes.length) {
    render(el("div", { class: "panel empty" }, el("h2", {}, "No nodes"), el("p", {}, "Start an agent: capstan-agent joins with a node key (`capstan key create --role node`).")));
    return;
  }
  const bar = (used, total) => {
    const pct = total ? Math.min(100, Math.round(used / total * 100)) : 0;
    return el("div", {}, el("div", { class: "bar" + (pct > 85 ? " hot" : "") }, el("span", { style: "width:" + pct + "%" })), el("span", { class: "muted" }, used + " / " + total));
  };
  render(el("div", { class: "head" }, el("h1", {}, "Nodes")), el("div", { class: "panel scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, el("th", {}, "Node"), el("th", {}, "Status"), el("th", {}, "CPU (millicores)"), el("th", { class: "opt" }, "Memory (MB)"), el("th", { class: "opt" }, "Instances"), el("th", {}))),
    el("tbody", {}, nodes.map((n) => el("tr", { "data-node": n.id },
      el("td", { class: "mono" }, n.id),
      el("td", {}, el("span", { class: "pill " + (n.draining ? "warn" : shortState(n.status) === "ready" ? "ok" : "bad") }, n.draining ? "draining" : shortState(n.status))),
      el("td", {}, bar(n.allocated ? n.allocated.cpu_millis : 0, n.capacity ? n.capacity.cpu_millis : 0)),
      el("td", { class: "opt" }, bar(n.allocated ? n.allocated.memory_mb : 0, n.capacity ? n.capacity.memory_mb : 0)),
      el("td", { class: "opt" }, n.instances),
      el("td", {}, isAdmin() && !n.draining ? el("button", { class: "drain", "data-node": n.id, onclick: async () => {
        if (!confirm("Drain " + n.id + "? Its instances move to other nodes, health-gated.")) return;
        try { await api("POST", "/v1/nodes/" + encodeURIComponent(n.id) + "/drain", {}); toast("Draining " + n.id); nodesPage(); } catch (p) { toast(p.message, true); }
      } }, "Drain") : null)))))));
}

async function eventsPage() {
  const { events } = await api("GET", "/v1/events?limit=200");
  render(el("div", { class: "head" }, el("h1", {}, "Events")), el("div", { class: "panel scroll" }, events.length ? el("table", {},
    el("thead", {}, el("tr", {}, el("th", {}, "When"), el("th", {}, "Kind"), el("th", {}, "App"), el("th", { class: "opt" }, "Message"), el("th", { class: "opt" }, "By"))),
    el("tbody", {}, events.slice().reverse().map((e) => el("tr", {},
      el("td", { class: "muted" }, ago(e.time_ms)), el("td", {}, e.kind),
      el("td", {}, e.app ? el("a", { href: "#/apps/" + encodeURIComponent(e.app) }, e.app) : ""),
      el("td", { class: "opt" }, e.message), el("td", { class: "opt muted" }, e.actor ? e.actor + " (" + e.actor_role + ")" : ""))))) :
    el("div", { class: "empty" }, el("h2", {}, "Nothing has happened yet"), el("p", {}, "Deploys, rollouts, health changes and drains show up here."))));
}

async function keysPage() {
  const { keys } = await api("GET", "/v1/keys");
  const name = el("input", { id: "key-name", placeholder: "name (ci, alice@example.com)" });
  const role = el("select", { id: "key-role" }, ["viewer", "deployer", "admin"].map((r) => el("option", { value: r }, r)));
  const project = el("input", { id: "key-project", placeholder: "project (default)" });
  const out = el("div", { id: "new-key" });
  const create = async (event) => {
    event.preventDefault();
    try {
      const reply = await api("POST", "/v1/keys", { name: name.value, role: role.value, project: role.value === "admin" ? "" : project.value });
      out.replaceChildren(el("p", {}, "The new key, shown once:"), el("pre", { class: "mono" }, reply.api_key));
      keysPage().then(() => document.getElementById("new-key").replaceWith(out));
    } catch (p) { out.replaceChildren(problemList(p)); }
  };
  render(el("div", { class: "head" }, el("h1", {}, "API keys")),
    el("form", { class: "panel row", onsubmit: create }, name, role, project, el("button", { class: "primary", id: "create-key", type: "submit" }, "Create key")),
    out,
    el("div", { class: "panel scroll" }, el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Role"), el("th", {}, "Project"), el("th", { class: "opt" }, "Created"), el("th", {}))),
      el("tbody", {}, keys.map((k) => el("tr", { "data-key": k.name },
        el("td", { class: "mono" }, k.name), el("td", {}, k.role), el("td", {}, k.project || "every project"),
        el("td", { class: "opt muted" }, time(k.created_ms)),
        el("td", {}, k.role === "service" ? null : el("button", { class: "danger revoke", "data-key": k.name, onclick: async () => {
          if (!confirm("Revoke " + k.name + "? It and its live tokens stop working at once.")) return;
          try { await api("DELETE", "/v1/keys/" + encodeURIComponent(k.name)); toast("Revoked " + k.name); keysPage(); } catch (p) { toast(p.message, true); }
        } }, "Revoke"))))))));
}

async function auditPage() {
  const [{ records }, verdict] = await Promise.all([api("GET", "/v1/audit?limit=300"), api("GET", "/v1/audit/verify")]);
  render(el("div", { class: "head" }, el("h1", {}, "Audit log"),
    el("span", { class: "pill " + (verdict.intact ? "ok" : "bad"), id: "audit-verdict" }, verdict.intact ? "chain intact: " + verdict.records + " records" : "tampered: " + verdict.problem)),
    el("div", { class: "panel scroll" }, records.length ? el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "When"), el("th", {}, "Who"), el("th", {}, "What"), el("th", { class: "opt" }, "Project"), el("th", {}, "Result"))),
      el("tbody", {}, records.slice().reverse().map((r) => el("tr", {},
        el("td", { class: "muted" }, r.seq), el("td", { class: "muted" }, ago(r.at_ms)),
        el("td", {}, r.actor + (r.role ? " (" + r.role + ")" : "")),
        el("td", {}, el("span", { class: "mono" }, r.method), " ", r.target, r.summary ? el("div", { class: "muted" }, r.summary) : null),
        el("td", { class: "opt" }, r.project),
        el("td", {}, el("span", { class: "pill " + (r.result === "ok" ? "ok" : r.result.startsWith("denied") ? "bad" : "warn") }, r.result.split(":")[0])))))) :
      el("div", { class: "empty" }, el("h2", {}, "No changes recorded yet"))));
}

// ---- routing ----

function signedIn(who) {
  state.who = who;
  state.csrf = who.csrf;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  document.getElementById("who-name").textContent = who.name + " · " + who.role + (who.project ? " · " + who.project : "");
  document.querySelectorAll("[data-admin]").forEach((a) => (a.hidden = !isAdmin()));
}

async function route() {
  stopLive();
  const [, page, arg] = (location.hash || "#/apps").split("/");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  if (page === "login" || !state.who) {
    if (!state.who) {
      try { signedIn(await api("GET", "/ui/session")); } catch (_) { loginPage(); return; }
      if (page === "login") { location.hash = "#/apps"; return; }
    } else { loginPage(); return; }
  }
  try {
    if (page === "apps" && arg) await appPage(decodeURIComponent(arg));
    else if (page === "deploy") deployPage();
    else if (page === "nodes") await nodesPage();
    else if (page === "events") await eventsPage();
    else if (page === "keys") await keysPage();
    else if (page === "audit") await auditPage();
    else await appsPage();
  } catch (problem) {
    if (problem.status !== 401) render(el("div", { class: "panel" }, el("h2", {}, "Could not load this page"), problemList(problem)));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", async () => {
    try { await api("DELETE", "/ui/session"); } catch (_) { /* signed out either way */ }
    state.who = null;
    document.getElementById("nav").hidden = true;
    document.getElementById("who").hidden = true;
    location.hash = "#/login";
    loginPage();
  });
  route();
});
