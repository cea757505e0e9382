// The fleet page: asks for a token once, then follows the hub's change stream and fetches what
// changed from the REST API. State lives here; the views (fleet.js, rollout.js, registry.js)
// are functions from state to DOM.
import { h, replace } from "./dom.js";
import * as api from "./api.js";
import { fleetSummary, fleetTable } from "./fleet.js";
import { rolloutList, rolloutDetail, recordHistory, isActive } from "./rollout.js";
import { registryTable } from "./registry.js";

const NODES_MIN_GAP_MS = 2000;     // at most one /v1/nodes fetch per 2 s (a 5,000-node list is MBs)
const NODES_REFRESH_MS = 30000;    // and one every 30 s for fresh health figures
const REGISTRY_REFRESH_MS = 30000;

const state = {
  fleet: null, digest: null, nodes: null, nodesError: null, selector: "",
  rollouts: [], selected: null, pinned: false, detail: null, history: new Map(),
  registry: null, registryError: null, stream: "connecting",
};
const $ = (id) => document.getElementById(id);
let abort = null;
let nodesAt = 0, nodesTimer = null, registryAt = 0, detailBusy = false, detailAgain = false;

function setStream(status, text) {
  state.stream = status;
  const el = $("stream");
  el.className = `badge ${status}`;
  el.textContent = text || status;
}

function renderFleet() { replace($("fleet-summary"), fleetSummary(state.fleet)); }
function renderNodes() { replace($("fleet-nodes"), fleetTable(state.nodes, state.nodesError)); }
function renderRegistry() { replace($("registry-body"), registryTable(state.registry, state.registryError)); }
function renderRollouts() {
  replace($("rollout-list-box"), rolloutList(state.rollouts, state.selected, select));
  const hist = state.detail ? state.history.get(state.detail.id) : [];
  replace($("rollout-detail"), rolloutDetail(state.detail, hist, Date.now() / 1000));
}

function select(id) {
  state.selected = id;
  state.pinned = true;
  state.detail = null;
  renderRollouts();
  loadDetail();
}

async function guarded(fn) {
  try {
    await fn();
  } catch (err) {
    if (err instanceof api.AuthError) return signOut(err.message);
    if (err.name !== "AbortError") throw err;
  }
}

async function loadNodes() {
  clearTimeout(nodesTimer);
  const wait = nodesAt + NODES_MIN_GAP_MS - Date.now();
  if (wait > 0) { nodesTimer = setTimeout(loadNodes, wait); return; }
  nodesAt = Date.now();
  nodesTimer = setTimeout(loadNodes, NODES_REFRESH_MS);
  const q = state.selector ? `?selector=${encodeURIComponent(state.selector)}` : "";
  try {
    state.nodes = (await api.getJSON(`/v1/nodes${q}`, abort.signal)).nodes;
    state.nodesError = null;
  } catch (err) {
    if (err instanceof api.AuthError || err.name === "AbortError") throw err;
    state.nodesError = `cannot list nodes: ${err.message}`;
  }
  renderNodes();
}

async function loadRegistry() {
  registryAt = Date.now();
  try {
    state.registry = (await api.getJSON("/v1/models", abort.signal)).versions;
    state.registryError = null;
  } catch (err) {
    if (err instanceof api.AuthError || err.name === "AbortError") throw err;
    state.registryError = `cannot list the registry: ${err.message}`;
  }
  renderRegistry();
}

async function loadDetail() {
  if (state.selected === null) return;
  if (detailBusy) { detailAgain = true; return; }
  detailBusy = true;
  try {
    do {
      detailAgain = false;
      const id = state.selected;
      const r = (await api.getJSON(`/v1/rollouts/${id}`, abort.signal)).rollout;
      if (state.selected !== id) continue;
      if (!state.history.has(id)) state.history.set(id, []);
      recordHistory(state.history.get(id), r, Date.now() / 1000);
      state.detail = r;
      renderRollouts();
    } while (detailAgain);
  } finally {
    detailBusy = false;
  }
}

function onSnapshot(msg) {
  state.fleet = msg.fleet;
  renderFleet();
  if (msg.fleet.digest !== state.digest) {
    state.digest = msg.fleet.digest;
    guarded(loadNodes);
  }
  const before = new Map(state.rollouts.map((r) => [r.id, r.updated_at]));
  state.rollouts = msg.rollouts;
  // follow the active rollout (or the latest) until the operator picks one
  if (!state.pinned && state.rollouts.length) {
    const active = state.rollouts.find(isActive);
    state.selected = (active || state.rollouts[0]).id;
  }
  const sel = state.rollouts.find((r) => r.id === state.selected);
  if (sel && (isActive(sel) || before.get(sel.id) !== sel.updated_at || !state.detail || state.detail.id !== sel.id)) {
    guarded(loadDetail);
  }
  if (Date.now() - registryAt > REGISTRY_REFRESH_MS) guarded(loadRegistry);
  renderRollouts();
}

async function follow() {
  let backoff = 1000;
  while (abort && !abort.signal.aborted) {
    const signal = abort.signal;
    try {
      setStream("connecting");
      for await (const msg of api.streamLines("/v1/stream", signal)) {
        setStream("live");
        backoff = 1000;
        if (msg.type === "snapshot") onSnapshot(msg);
        else if (msg.type === "bye") break;
      }
    } catch (err) {
      if (err instanceof api.AuthError) return signOut(err.message);
      if (signal.aborted) return;
      setStream("offline", `reconnecting (${err.message})`);
      await new Promise((ok) => setTimeout(ok, backoff));
      backoff = Math.min(backoff * 2, 15000);
    }
  }
}

function signOut(message) {
  if (abort) abort.abort();
  abort = null;
  api.clearToken();
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStream("offline", "signed out");
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  abort = new AbortController();
  guarded(loadRegistry);
  follow();
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  if (!t) return;
  api.setToken(t);
  $("token").value = "";
  start();
});
$("signout").addEventListener("click", () => signOut(""));
$("selector-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.selector = $("selector").value.trim();
  nodesAt = 0;
  state.nodes = null;
  renderNodes();
  guarded(loadNodes);
});
// the bake clock moves between snapshots
setInterval(() => { if (state.detail && state.detail.state === "baking") renderRollouts(); }, 1000);

if (api.token()) start(); else signOut("");
