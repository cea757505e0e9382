"""The hub's REST API (aiohttp handlers) and its OpenAPI document.

- ``registry``: push, list, show, delete model versions; artifact and manifest downloads.
- ``fleet``: nodes, rollouts and their commands, ``/metrics``.
- ``pki``: the certificate bootstrap of agent pods (``POST /v1/pki/bootstrap``).
- ``ports``: what the API asks of the control plane (an interface the server implements).
- ``openapi``, ``fleet_openapi``: the OpenAPI 3.0 document served at ``/v1/openapi.json``.
- ``httputil``: JSON errors, bearer auth, ETag and Range.
"""
