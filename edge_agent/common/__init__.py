"""Plumbing both programs need, written once: the agent and the hub import it.

It imports nothing from the rest of the agent or from the hub (an import-linter contract).

- ``logs``: structlog configured once at the entry point.
- ``cli``: the command-line scaffold (verb modules, ``--version``, errors to exit codes).
- ``settings``: settings loading (file, environment, field errors, secrets from files that
  no other user can read).
- ``httpserver``: what both HTTP servers add to aiohttp: header, body and idle timeouts, a
  connection cap, JSON bodies for aiohttp's own errors, a ``Server`` header without versions.
- ``backoff``: the one backoff with jitter of every retry loop.
- ``mqtt``: the paho-mqtt client base (credentials, TLS, reconnect, MQTT 5 properties).
"""
