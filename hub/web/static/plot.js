// A line plot in SVG: a few series over time, with an optional horizontal limit line (a
// gate's threshold). Enough for "canary against baseline"; no library needed.
import { h, fmtNum } from "./dom.js";

const W = 600, H = 200, L = 48, R = 10, T = 10, B = 26;

export function linePlot({ title, unit, series, limit }) {
  const pts = series.flatMap((s) => s.points);
  if (pts.length === 0) {
    return h("figure", { class: "plot" }, h("figcaption", {}, title),
      h("p", { class: "muted" }, "no samples yet"));
  }
  const ts = pts.map((p) => p[0]);
  const vs = pts.map((p) => p[1]).concat(limit != null ? [limit] : []);
  const t0 = Math.min(...ts), t1 = Math.max(...ts, t0 + 1);
  const v0 = Math.min(0, ...vs), v1 = Math.max(...vs) * 1.1 || 1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - v0) / (v1 - v0)) * (H - T - B);
  const grid = [v0, (v0 + v1) / 2, v1].map((v) => [
    h("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }),
    h("text", { x: L - 4, y: y(v) + 4, class: "axis", "text-anchor": "end" }, fmtNum(v)),
  ]);
  const lines = series.map((s) => {
    if (s.points.length === 0) return null;
    const d = s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    const last = s.points[s.points.length - 1];
    return h("g", { class: `series ${s.cls}` },
      h("polyline", { points: d }),
      h("circle", { cx: x(last[0]), cy: y(last[1]), r: 3 }, h("title", {}, `${s.name}: ${fmtNum(last[1])} ${unit}`)));
  });
  const lim = limit == null ? null : h("g", { class: "limit" },
    h("line", { x1: L, x2: W - R, y1: y(limit), y2: y(limit) }),
    h("text", { x: W - R, y: y(limit) - 4, "text-anchor": "end", class: "axis" }, `limit ${fmtNum(limit)}`));
  const span = Math.round(t1 - t0);
  return h("figure", { class: "plot" },
    h("figcaption", {}, title, " ",
      series.map((s) => h("span", { class: `key ${s.cls}` }, s.name))),
    h("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title },
      grid, lim, lines,
      h("text", { x: L, y: H - 6, class: "axis" }, `${span}s ago`),
      h("text", { x: W - R, y: H - 6, class: "axis", "text-anchor": "end" }, `now (${unit})`)));
}
