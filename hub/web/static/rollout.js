// One rollout as a timeline: its waves (canary first), the bake clock of the wave in progress,
// every gate's value against its threshold, the cause of a rollback, the event log, and plots
// of the nodes on the new version against the baseline over the time this page has watched.
import { h, badge, fmtNum, fmtTime, fmtDuration } from "./dom.js";
import { linePlot } from "./plot.js";

const TERMINAL = new Set(["succeeded", "aborted", "rolled_back"]);
const GATE_RE = /^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(x?)\s*$/i;
const HISTORY_MAX = 900; // points kept per rollout (15 min at one every second)

export const isActive = (r) => !TERMINAL.has(r.state);

export function rolloutList(rollouts, selected, onSelect) {
  if (!rollouts || rollouts.length === 0) return h("p", { class: "muted" }, "no rollout yet");
  return h("ul", { class: "rollouts", id: "rollout-list" }, rollouts.map((r) => h("li", {},
    h("button", { class: r.id === selected ? "sel" : "", "data-rollout": r.id, onclick: () => onSelect(r.id) },
      `#${r.id} ${r.model} → ${r.version} `, badge(r.state),
      h("span", { class: "muted small" }, ` ${waveLabelShort(r)}`)))));
}

function waveLabelShort(r) {
  return r.waves ? `wave ${Math.min(r.wave + 1, r.waves)}/${r.waves}` : "";
}

function hasCanary(spec) {
  return Boolean(spec && (spec.canary_percent || spec.canary));
}

function waveName(r, i) {
  const canary = hasCanary(r.spec);
  if (canary && i === 0) return "canary";
  const pct = r.spec && r.spec.waves ? r.spec.waves[i - (canary ? 1 : 0)] : null;
  return pct != null ? `${fmtNum(pct, 0)} %` : "";
}

// The nodes on the new version (judged figures) and their mean of one metric.
function canaryNodes(r) {
  return r.nodes.filter((n) => n.status === "active" && n.live && n.live.metrics);
}

function meanOf(nodes, metric) {
  const vals = nodes.map((n) => n.live.metrics[metric]).filter((v) => typeof v === "number");
  return vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : null;
}

function worstOf(nodes, metric, op) {
  const vals = nodes.map((n) => n.live.metrics[metric]).filter((v) => typeof v === "number");
  if (!vals.length) return null;
  return op === "<=" ? Math.max(...vals) : Math.min(...vals);
}

export function gateRows(r) {
  const nodes = canaryNodes(r);
  const cause = r.cause || {};
  return (r.spec.gates || []).map((text) => {
    const m = GATE_RE.exec(text);
    if (!m) return { text, metric: text, status: "?", value: null, limit: null };
    const [, metric, rawOp, num, rel] = m;
    const op = rawOp.length === 1 ? rawOp + "=" : rawOp;
    const base = r.baseline ? r.baseline[metric] : null;
    const limit = rel ? (typeof base === "number" ? Number(num) * base : null) : Number(num);
    let value = rel ? meanOf(nodes, metric) : worstOf(nodes, metric, op);
    let status = "waiting";
    let failed = false;
    if (cause.reason === "gate" && (cause.gate === text || (!cause.gate && cause.metric === metric))) {
      value = cause.value ?? value;
      failed = true;
      status = "failed";
      return { text, metric, op, value, limit: cause.limit ?? limit, baseline: cause.baseline ?? base, status, failed, node: cause.node };
    }
    if (value != null && limit != null) status = (op === "<=" ? value <= limit : value >= limit) ? "pass" : "over";
    return { text, metric, op, value, limit, baseline: base, status, failed,
      samples: nodes.reduce((a, n) => a + (n.live.metrics.samples || 0), 0) };
  });
}

export function recordHistory(history, r, now) {
  const nodes = canaryNodes(r);
  const point = { t: now, p50: meanOf(nodes, "p50_ms"), p99: meanOf(nodes, "p99_ms"),
    det: meanOf(nodes, "detections_per_frame"),
    bp50: r.baseline ? r.baseline.p50_ms ?? null : null,
    bp99: r.baseline ? r.baseline.p99_ms ?? null : null,
    bdet: r.baseline ? r.baseline.detections_per_frame ?? null : null };
  history.push(point);
  if (history.length > HISTORY_MAX) history.splice(0, history.length - HISTORY_MAX);
}

function seriesOf(history, key) {
  return history.filter((p) => typeof p[key] === "number").map((p) => [p.t, p[key]]);
}

function causeBox(r) {
  const c = r.cause;
  if (!c) return null;
  const parts = [h("b", {}, `${r.state === "rolled_back" || r.state === "rolling_back" ? "Rolled back" : "Stopped"}: ${c.reason}`)];
  if (c.gate || c.metric) parts.push(" · gate ", h("code", {}, c.gate || c.metric));
  if (c.value != null) parts.push(" · value ", h("b", { class: "bad", id: "cause-value" }, fmtNum(c.value, 2)));
  if (c.limit != null) parts.push(" against limit ", h("b", { id: "cause-limit" }, fmtNum(c.limit, 2)));
  if (c.baseline != null) parts.push(` (baseline ${fmtNum(c.baseline, 2)})`);
  if (c.node) parts.push(" · node ", h("code", {}, c.node));
  if (c.error) parts.push(h("div", { class: "err" }, c.error));
  if (c.message) parts.push(h("div", {}, c.message));
  if (c.by) parts.push(` · by ${c.by}`);
  return h("div", { class: "cause", id: "cause" }, parts);
}

function waveRow(r, i, now) {
  const names = r.plan[i] || [];
  const byName = new Map(r.nodes.map((n) => [n.node, n]));
  let status = i < r.wave ? "done" : i === r.wave ? r.state : "pending";
  if (TERMINAL.has(r.state) && i === r.wave) status = r.state;
  if (TERMINAL.has(r.state) && i > r.wave) status = "not reached";
  if (r.state === "succeeded") status = "done";
  let clock = null;
  if (i === r.wave && r.state === "baking" && r.phase_started_at) {
    const bake = r.spec.bake_s || 0;
    const elapsed = now - r.phase_started_at;
    const pct = bake > 0 ? Math.min(100, (100 * elapsed) / bake) : 100;
    clock = h("div", { class: "bake" },
      h("progress", { max: 100, value: pct.toFixed(0) }),
      h("span", { class: "small", id: "bake-clock" }, `bake ${fmtDuration(elapsed)} of ${fmtDuration(bake)}, ${fmtDuration(bake - elapsed)} left`));
  }
  return h("li", { class: `wave ${status}`, "data-wave": i + 1, "data-status": status },
    h("div", { class: "wave-head" }, h("b", {}, `wave ${i + 1}/${r.plan.length}`), ` ${waveName(r, i)} `, badge(status)),
    clock,
    h("div", { class: "chips" }, names.map((name) => {
      const n = byName.get(name) || {};
      const live = n.live || {};
      return h("span", { class: `chip ${n.status || ""}`, title: n.error || "" },
        live.online === false ? "⏻ " : "", name, " ", h("small", {}, n.status || ""),
        n.prev_version ? h("small", { class: "muted" }, ` (was ${n.prev_version})`) : null);
    })));
}

export function rolloutDetail(r, history, now) {
  if (!r) return h("p", { class: "muted" }, "pick a rollout");
  const gates = gateRows(r);
  const hist = history || [];
  return h("article", { class: "rollout", id: "rollout", "data-state": r.state, "data-wave": r.wave },
    h("h3", {}, `#${r.id} ${r.model} → ${r.version} `, badge(r.state, r.state)),
    h("p", { class: "muted small" }, `selector "${r.selector || "(all)"}" · started ${fmtTime(r.created_at)} by ${r.created_by || "?"} · `,
      `bake ${fmtDuration(r.spec.bake_s)} · deadline ${fmtDuration(r.spec.deadline_s)}`, r.message ? ` · ${r.message}` : ""),
    causeBox(r),
    h("ol", { class: "timeline", id: "waves" }, r.plan.map((_, i) => waveRow(r, i, now))),
    h("h4", {}, "Gates"),
    gates.length === 0 ? h("p", { class: "muted" }, "no gate: only failures and deadlines roll back") :
      h("table", { class: "rows gates", id: "gates" },
        h("thead", {}, h("tr", {}, ["gate", "value", "limit", "baseline", "status"].map((c) => h("th", {}, c)))),
        h("tbody", {}, gates.map((g) => h("tr", { class: g.failed ? "failed" : "", "data-gate": g.text },
          h("td", { "data-label": "gate" }, h("code", {}, g.text)),
          h("td", { "data-label": "value", class: "gate-value" }, fmtNum(g.value, 2)),
          h("td", { "data-label": "limit" }, fmtNum(g.limit, 2)),
          h("td", { "data-label": "baseline" }, fmtNum(g.baseline, 2)),
          h("td", { "data-label": "status" }, badge(g.status)))))),
    h("div", { class: "plots" },
      linePlot({ title: "latency p99, new version vs baseline", unit: "ms",
        limit: (gates.find((g) => g.metric === "p99_ms") || {}).limit ?? null,
        series: [{ name: `${r.version} (mean of nodes)`, cls: "canary", points: seriesOf(hist, "p99") },
          { name: "baseline", cls: "baseline", points: seriesOf(hist, "bp99") }] }),
      linePlot({ title: "latency p50", unit: "ms", limit: null,
        series: [{ name: r.version, cls: "canary", points: seriesOf(hist, "p50") },
          { name: "baseline", cls: "baseline", points: seriesOf(hist, "bp50") }] }),
      seriesOf(hist, "det").length || seriesOf(hist, "bdet").length ? linePlot({ title: "detections per frame", unit: "/frame", limit: null,
        series: [{ name: r.version, cls: "canary", points: seriesOf(hist, "det") },
          { name: "baseline", cls: "baseline", points: seriesOf(hist, "bdet") }] }) : null),
    h("h4", {}, "Events"),
    h("ol", { class: "events", id: "events", reversed: true }, (r.events || []).slice().reverse().map((e) => {
      const { ts, kind, ...rest } = e;
      const detail = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
      return h("li", { "data-kind": kind }, h("span", { class: "muted" }, fmtTime(ts)), " ", h("b", {}, kind), " ", h("span", { class: "small" }, detail));
    })));
}
