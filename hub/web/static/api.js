// The hub's REST API as the page uses it: every request carries the bearer token the operator
// typed once (kept in this tab's sessionStorage, gone when the tab closes).

const KEY = "edge-hub-token";

export const token = () => sessionStorage.getItem(KEY);
export const setToken = (t) => sessionStorage.setItem(KEY, t);
export const clearToken = () => sessionStorage.removeItem(KEY);

export class AuthError extends Error {}

async function failure(resp) {
  let message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    if (body && body.error) message = body.error.message || body.error.code;
  } catch (_) { /* not JSON: keep the status */ }
  return resp.status === 401 ? new AuthError(message) : new Error(message);
}

function headers() {
  return { Authorization: `Bearer ${token()}`, Accept: "application/json" };
}

export async function getJSON(path, signal) {
  const resp = await fetch(path, { headers: headers(), cache: "no-store", signal });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// The change stream (GET /v1/stream): one JSON object a line. EventSource cannot send the
// Authorization header, so this reads fetch's body as it arrives.
export async function* streamLines(path, signal) {
  const resp = await fetch(path, { headers: headers(), cache: "no-store", signal });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.trim()) yield JSON.parse(line);
    }
    if (buf.length > 8 * 1024 * 1024) throw new Error("stream line longer than 8 MiB");
  }
}
