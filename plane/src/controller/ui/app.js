// Plane's dashboard: signs in (when the controller has tokens), follows
// /ctrl/overview-stream, and renders clusters, drones and backends; #/b/<id> shows one
// backend with its status history. Every value is put on the page as text, never as HTML.
"use strict";

const TOKEN_KEY = "plane-ctrl-token";
const $ = (selector) => document.querySelector(selector);

const state = {
  overview: null,
  // Server time minus local time, so ages are the controller's.
  clockOffset: 0,
  stream: null,
  statusEvents: null,
  backendId: null,
  // Each read of the backend's page gets a number; only the latest one is shown.
  backendReads: 0,
  backendTimer: null,
};

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** A request to the API with the session's token; a 401 sends the user to the sign-in form. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const current = token();
  if (current) headers.set("Authorization", `Bearer ${current}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    showLogin(current ? "That token is no longer accepted." : "");
    throw new Error("unauthorized");
  }
  return response;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/** Builds an element: `el("td", {class: "x"}, "text", child)`. */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function now() {
  return Date.now() + state.clockOffset;
}

function duration(ms) {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${seconds % 60}s`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours}h ${minutes % 60}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

function ago(time) {
  return `${duration(now() - time)} ago`;
}

function clock(time) {
  return new Date(time).toLocaleString();
}

function notice(text) {
  const box = $("#notice");
  box.textContent = text;
  box.hidden = !text;
}

function setConnection(text, className) {
  const pill = $("#connection");
  pill.textContent = text;
  pill.className = `pill ${className}`;
}

/** Asks before doing something that cannot be undone; resolves to true on "Confirm". */
function confirmAction(text, label) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = label;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// --- Signing in -------------------------------------------------------------------------

function showLogin(message) {
  stopStream();
  sessionStorage.removeItem(TOKEN_KEY);
  for (const id of ["#overview", "#backend"]) $(id).hidden = true;
  $("#login").hidden = false;
  $("#logout").hidden = true;
  $("#login-error").textContent = message || "";
  setConnection("signed out", "offline");
  $("#token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const candidate = $("#token").value.trim();
  const response = await fetch("/ctrl/status", {
    headers: { Authorization: `Bearer ${candidate}` },
  });
  if (!response.ok) {
    $("#login-error").textContent =
      response.status === 401 ? "The controller does not accept that token." : await apiError(response);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  $("#token").value = "";
  start();
}

// --- The overview stream ----------------------------------------------------------------

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

/** Follows /ctrl/overview-stream (fetch, not EventSource, so the token goes in a header). */
async function followOverview() {
  stopStream();
  const controller = new AbortController();
  state.stream = controller;
  try {
    const response = await api("/ctrl/overview-stream", { signal: controller.signal });
    if (!response.ok) throw new Error(await apiError(response));
    setConnection("live", "live");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) receive(JSON.parse(data));
      }
    }
  } catch (error) {
    if (controller.signal.aborted || error.message === "unauthorized") return;
  }
  if (state.stream !== controller) return;
  setConnection("reconnecting…", "offline");
  setTimeout(() => {
    if (state.stream === controller) followOverview();
  }, 1000);
}

function receive(overview) {
  state.overview = overview;
  state.clockOffset = overview.time - Date.now();
  render();
}

// --- Rendering ----------------------------------------------------------------------------

function droneState(drone) {
  if (drone.lost) return "lost";
  if (!drone.node.connected) return "disconnected";
  if (drone.draining) return "draining";
  return "ready";
}

function renderClusters(clusters) {
  const box = $("#clusters");
  box.replaceChildren();
  if (clusters.length === 0) {
    box.append(el("p", { class: "muted" }, "No drone or proxy has connected yet."));
  }
  for (const cluster of clusters) {
    const rows = cluster.drones.map((drone) => {
      const name = drone.node.name.Drone;
      const current = droneState(drone);
      const draining = drone.draining;
      const button = el(
        "button",
        {
          type: "button",
          "data-action": draining ? "undrain" : "drain",
          onclick: () => drain(cluster.cluster, name, !draining),
        },
        draining ? "Undrain" : "Drain",
      );
      return el(
        "tr",
        { "data-drone": name },
        el("td", { class: "mono" }, name),
        el("td", {}, drone.pool || "(default)"),
        el("td", { class: "state" }, el("span", { class: `pill state-${current}` }, current)),
        el("td", { class: "load" }, drone.backend_count),
        el("td", {}, `${duration(drone.last_heartbeat_age * 1000)} ago`),
        el("td", {}, drone.node.plane_version),
        el("td", {}, button),
      );
    });
    const proxies = cluster.proxies.filter((proxy) => proxy.connected).length;
    box.append(
      el(
        "div",
        { class: "cluster", "data-cluster": cluster.cluster },
        el("h2", {}, "Cluster ", el("span", { class: "mono" }, cluster.cluster),
          el("span", { class: "muted" }, ` · ${cluster.drones.length} drones · ${proxies} proxies connected`)),
        el(
          "table",
          { class: "drones" },
          el("thead", {}, el("tr", {},
            ["Drone", "Pool", "State", "Backends", "Last heard", "Version", ""].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows),
        ),
      ),
    );
  }
}

function keyLabel(key) {
  if (!key) return el("span", { class: "muted" }, "(no key)");
  return key.namespace ? `${key.namespace}/${key.name}` : key.name;
}

function terminateButton(backend) {
  if (["terminating", "hard-terminating", "terminated"].includes(backend.status)) return null;
  return el(
    "button",
    { type: "button", class: "danger", "data-action": "terminate", onclick: () => terminate(backend) },
    "Terminate",
  );
}

function reason(backend) {
  if (backend.status !== "terminated") return "";
  return [backend.termination_reason, backend.message].filter(Boolean).join(": ");
}

function renderBackends(backends, truncated) {
  const body = $("#backends tbody");
  body.replaceChildren(
    ...backends.map((backend) =>
      el(
        "tr",
        { "data-backend": backend.backend_id },
        el("td", { class: "key" }, keyLabel(backend.key)),
        el("td", { class: "mono" }, el("a", { href: `#/b/${backend.backend_id}` }, backend.backend_id)),
        el("td", { class: "status" }, el("span", { class: `pill status-${backend.status}` }, backend.status)),
        el("td", { class: "mono" }, backend.drone),
        el("td", {}, duration(now() - backend.created_at)),
        el("td", {}, ago(backend.last_active_at)),
        el("td", { class: "reason" }, reason(backend)),
        el("td", {}, terminateButton(backend)),
      ),
    ),
  );
  const live = backends.filter((b) => b.status !== "terminated").length;
  $("#backend-count").textContent = `${live} live, ${backends.length - live} ended${truncated ? " (newest 500 shown)" : ""}`;
  $("#no-backends").hidden = backends.length > 0;
}

function render() {
  const overview = state.overview;
  if (!overview) return;
  renderClusters(overview.clusters);
  renderBackends(overview.backends, overview.backends_truncated);
  if (state.backendId) refreshBackend();
}

/** Reads the backend's page again soon: many reasons to within 100 ms cost one read. */
function refreshBackend() {
  if (state.backendTimer) return;
  state.backendTimer = setTimeout(() => {
    state.backendTimer = null;
    readBackend().catch(() => {}); // signed out, or unreachable: the stream's retry shows it
  }, 100);
}

// --- One backend ---------------------------------------------------------------------------

async function readBackend() {
  const id = state.backendId;
  const read = ++state.backendReads;
  const response = await api(`/ctrl/b/${encodeURIComponent(id)}`);
  // A later read (or another page) has taken over.
  if (state.backendId !== id || read !== state.backendReads) return;
  if (!response.ok) {
    $("#backend-title").textContent = `Backend ${id}`;
    $("#backend-facts").replaceChildren(el("dd", { class: "error" }, await apiError(response)));
    return;
  }
  const details = await response.json();
  if (state.backendId !== id || read !== state.backendReads) return;
  const backend = details.backend;
  $("#backend-title").replaceChildren("Backend ", el("span", { class: "mono" }, backend.backend_id), " ",
    el("span", { class: `pill status-${backend.status}`, id: "backend-status" }, backend.status));
  const facts = [
    ["Key", keyLabel(backend.key)],
    ["Cluster", backend.cluster],
    ["Pool", backend.pool || "(default)"],
    ["Drone", backend.drone],
    ["Started", `${clock(backend.created_at)} (${duration(now() - backend.created_at)} ago)`],
    ["Last activity", ago(backend.last_active_at)],
    ["Ended because", reason(backend) || "—"],
    ["Exit code", backend.exit_code ?? "—"],
  ];
  $("#backend-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  $("#backend-actions").replaceChildren(terminateButton(backend) || "");
  $("#history tbody").replaceChildren(
    ...details.history.map((entry) =>
      el(
        "tr",
        { "data-status": entry.status },
        el("td", {}, clock(entry.time)),
        el("td", {}, el("span", { class: `pill status-${entry.status}` }, entry.status)),
        el("td", {}, [entry.health, entry.termination_kind, entry.termination_reason, entry.message,
          entry.exit_code !== undefined ? `exit code ${entry.exit_code}` : null].filter(Boolean).join(" · ")),
      ),
    ),
  );
}

function showBackend(id) {
  state.backendId = id;
  $("#overview").hidden = true;
  $("#backend").hidden = false;
  $("#history tbody").replaceChildren();
  $("#backend-facts").replaceChildren();
  $("#backend-title").textContent = `Backend ${id}`;
  // The public status stream: each new status re-reads the backend.
  if (state.statusEvents) state.statusEvents.close();
  state.statusEvents = new EventSource(`/pub/b/${encodeURIComponent(id)}/status-stream`);
  state.statusEvents.onmessage = () => refreshBackend();
  refreshBackend();
}

function showOverview() {
  state.backendId = null;
  if (state.statusEvents) state.statusEvents.close();
  state.statusEvents = null;
  $("#backend").hidden = true;
  $("#overview").hidden = false;
}

function route() {
  const match = location.hash.match(/^#\/b\/([a-z0-9-]+)$/);
  if (match) showBackend(match[1]);
  else showOverview();
}

// --- Actions ------------------------------------------------------------------------------

async function terminate(backend) {
  const label = backend.key ? `key ${keyLabel(backend.key)}` : "no key";
  const sure = await confirmAction(
    `Terminate backend ${backend.backend_id} (${label})? Its process gets SIGTERM, then SIGKILL after the drone's grace period. Its users are disconnected.`,
    "Terminate",
  );
  if (!sure) return;
  const response = await api(`/ctrl/b/${encodeURIComponent(backend.backend_id)}/soft-terminate`, { method: "POST" });
  notice(response.ok ? `Terminating ${backend.backend_id}.` : `Could not terminate ${backend.backend_id}: ${await apiError(response)}`);
}

async function drain(cluster, drone, draining) {
  const sure = await confirmAction(
    draining
      ? `Drain drone ${drone}? It gets no new backends; the ones it runs keep serving.`
      : `Undrain drone ${drone}? It may be given new backends again.`,
    draining ? "Drain" : "Undrain",
  );
  if (!sure) return;
  const path = `/ctrl/c/${encodeURIComponent(cluster)}/d/${encodeURIComponent(drone)}/${draining ? "drain" : "undrain"}`;
  const response = await api(path, { method: "POST" });
  notice(response.ok ? `${draining ? "Draining" : "Undrained"} ${drone}.` : `Could not change ${drone}: ${await apiError(response)}`);
}

// --- Start --------------------------------------------------------------------------------

async function start() {
  let response;
  try {
    response = await api("/ctrl/status");
  } catch (error) {
    if (error.message === "unauthorized") return; // the sign-in form is showing
    setConnection("controller unreachable", "offline");
    setTimeout(start, 2000);
    return;
  }
  $("#login").hidden = true;
  $("#logout").hidden = !token();
  route();
  followOverview();
}

$("#login-form").addEventListener("submit", signIn);
$("#logout").addEventListener("click", () => showLogin(""));
window.addEventListener("hashchange", route);
start();
