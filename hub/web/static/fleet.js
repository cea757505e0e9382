// The fleet: counts, versions per model, and a table of nodes (the first MAX_ROWS of those the
// label selector picks; the counts are always of all of them).
import { h, badge, fmtNum, fmtTime } from "./dom.js";

const MAX_ROWS = 200;

export function fleetSummary(fleet) {
  if (!fleet) return h("p", { class: "muted" }, "waiting for the hub…");
  const versions = Object.entries(fleet.versions).map(([model, per]) =>
    h("div", { class: "card" }, h("div", { class: "label" }, model),
      Object.entries(per).sort().map(([v, n]) => h("div", { class: "ver", "data-model": model, "data-version": v },
        h("b", {}, v), ` ${n} node${n === 1 ? "" : "s"}`))));
  return h("div", { class: "cards" },
    h("div", { class: "card" }, h("div", { class: "label" }, "nodes"), h("div", { class: "big", id: "count-nodes" }, fleet.nodes)),
    h("div", { class: "card" }, h("div", { class: "label" }, "online"),
      h("div", { class: "big", id: "count-online" }, `${fleet.online}`)),
    h("div", { class: "card" }, h("div", { class: "label" }, "failed models"),
      h("div", { class: `big ${fleet.failed_models ? "bad" : ""}` }, fleet.failed_models)),
    versions);
}

function health(node, model, version) {
  const m = (node.metrics || {})[`${model}@${version}`];
  if (!m) return "";
  return `p99 ${fmtNum(m.p99_ms)} ms · ${fmtNum(m.fps)} fps · err ${fmtNum(m.error_rate, 3)}`;
}

function modelCell(node) {
  const out = [];
  const names = new Set([...Object.keys(node.models || {}), ...Object.keys(node.assigned || {})]);
  for (const model of [...names].sort()) {
    const st = (node.models || {})[model] || {};
    const want = (node.assigned || {})[model];
    const ver = st.version || "–";
    out.push(h("div", { class: "model" },
      h("span", { class: "mv" }, `${model} `, h("b", {}, ver)),
      st.status ? badge(st.status) : null,
      want && want !== st.version ? h("span", { class: "muted" }, ` → ${want}`) : null,
      st.error ? h("div", { class: "err" }, st.error) : null,
      h("div", { class: "muted small" }, health(node, model, st.version))));
  }
  return out.length ? out : h("span", { class: "muted" }, "no model");
}

// Each camera as of the node's last telemetry: whether it delivers frames, its rate and drops,
// and for cameras that track objects the tracks open now and the events per second.
function cameraCell(node) {
  const cams = node.cameras || [];
  if (!cams.length) return h("span", { class: "muted" }, node.online ? "no camera" : "–");
  return cams.map((c) => {
    const parts = [`${fmtNum(c.fps)} fps`];
    if (c.drops) parts.push(`${c.drops} dropped`);
    if (c.active_tracks !== null && c.active_tracks !== undefined) {
      parts.push(`${c.active_tracks} track${c.active_tracks === 1 ? "" : "s"}`);
      parts.push(`${fmtNum(c.events_per_s)} ev/s`);
    }
    return h("div", { class: "camera", "data-camera": c.camera },
      h("span", { class: "mv" }, `${c.camera} `),
      badge(c.connected ? "connected" : "disconnected", c.connected ? "online" : "offline"),
      h("div", { class: "muted small" }, parts.join(" · ")));
  });
}

export function fleetTable(nodes, error) {
  if (error) return h("p", { class: "err", id: "nodes-error" }, error);
  if (nodes === null) return h("p", { class: "muted" }, "loading nodes…");
  if (nodes.length === 0) return h("p", { class: "muted" }, "no node matches");
  const rows = nodes.slice(0, MAX_ROWS).map((n) => h("tr", { "data-node": n.name },
    h("td", { "data-label": "node" }, h("b", {}, n.name)),
    h("td", { "data-label": "online" }, n.online ? badge("online") : badge("offline")),
    h("td", { "data-label": "models" }, modelCell(n)),
    h("td", { "data-label": "cameras" }, cameraCell(n)),
    h("td", { "data-label": "agent" }, n.agent_version || "–"),
    h("td", { "data-label": "seen" }, fmtTime(n.last_seen)),
    h("td", { "data-label": "labels", class: "labels" },
      Object.entries(n.labels || {}).map(([k, v]) => h("code", {}, `${k}=${v}`)))));
  return [
    nodes.length > MAX_ROWS ? h("p", { class: "muted" },
      `showing ${MAX_ROWS} of ${nodes.length} nodes: narrow with a selector`) : null,
    h("table", { class: "rows", id: "nodes" },
      h("thead", {}, h("tr", {}, ["node", "online", "models", "cameras", "agent", "seen", "labels"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows)),
  ];
}
