// Tiny DOM helpers. Text always goes in as text nodes (never innerHTML), so a node name or a
// label value that looks like HTML stays text; the page's CSP forbids inline script anyway.

export function h(tag, attrs, ...children) {
  const el = document.createElementNS(
    SVG_TAGS.has(tag) ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG_TAGS = new Set(["svg", "g", "line", "polyline", "text", "rect", "circle", "title"]);

export function replace(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

export function fmtNum(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) < 0.1 && v !== 0) return v.toPrecision(2);
  return v.toFixed(digits);
}

export function fmtTime(unix) {
  if (!unix) return "–";
  return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
}

export function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function badge(text, kind) {
  return h("span", { class: `badge ${kind || text}` }, text);
}
