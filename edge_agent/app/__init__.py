"""The agent as one program: composition, task supervision, reload and HTTP.

- ``compose``: the composition root (settings → models → cameras → pipeline → sink → HTTP).
- ``supervisor``: the owner of every long-lived task and of shutdown.
- ``reload``: apply config-file changes to models and cameras without a restart.
- ``http``: probes, metrics, state and one-shot inference over aiohttp.
- ``images``: an upload's size read from its header, refused or decoded (``POST /v1/infer``).
"""
