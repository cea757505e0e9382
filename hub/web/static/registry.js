// The registry: every model version, whether it is signed, who pushed it and the notes.
import { h, badge, fmtNum } from "./dom.js";

export function registryTable(versions, error) {
  if (error) return h("p", { class: "err" }, error);
  if (versions === null) return h("p", { class: "muted" }, "loading…");
  if (versions.length === 0) return h("p", { class: "muted" }, "no version pushed yet");
  return h("table", { class: "rows", id: "registry" },
    h("thead", {}, h("tr", {}, ["model", "version", "task", "size", "signature", "pushed", "notes"].map((c) => h("th", {}, c)))),
    h("tbody", {}, versions.map((v) => h("tr", {},
      h("td", { "data-label": "model" }, v.name),
      h("td", { "data-label": "version" }, h("b", {}, v.version)),
      h("td", { "data-label": "task" }, v.task || "–"),
      h("td", { "data-label": "size" }, `${fmtNum(v.size / 1048576, 2)} MiB`),
      h("td", { "data-label": "signature" }, v.signed ? badge("signed", "ok") : badge("unsigned", "warn")),
      h("td", { "data-label": "pushed" }, `${v.created_at || "–"} ${v.pushed_by ? "by " + v.pushed_by : ""}`),
      h("td", { "data-label": "notes" }, v.notes || "")))));
}
