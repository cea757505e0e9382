"""The fleet page: a live dashboard the hub serves at its root URL, and its change stream.

The page itself is public static files (``static/``: HTML, CSS and plain JavaScript modules,
no build step, nothing loaded from elsewhere); every piece of data it shows comes from the
authenticated REST API with the token the operator types once (kept in the tab's
``sessionStorage``). Live updates come through one more authenticated route, a stream of
newline-delimited JSON change notices read with ``fetch`` (``EventSource`` cannot send an
``Authorization`` header).

- ``pages``: ``GET /`` and ``GET /ui/{name}`` (the static files, with a strict
  Content-Security-Policy), ``setup`` that adds every route of this package.
- ``stream``: ``GET /v1/stream``: one shared watcher polls the control plane and fans a small
  snapshot (fleet counts and digest, rollout summaries) out to at most ``MAX_STREAMS`` readers.
- ``openapi``: this package's paths in the hub's OpenAPI document.

It sits between the server (which composes it) and the API (whose caller checks, errors and
``FleetControl`` port it uses), and reads nothing the REST API does not already show.
"""
