"""Capture: the threads that keep each camera's newest frame.

- ``sources``: open a parsed source URL (file, RTSP/HTTP, USB, test pattern); the URL grammar
  itself is ``edge_agent.camera_urls`` (run by the config), which also says what of a URL may
  be shown (``redact_url``).
- ``camera``: ``Camera``, one thread per camera, reconnect with backoff, latest frame wins.
- ``motion``: motion gating, a cheap frame-difference check that keeps still frames (and
  their inference) out of the pipeline, with a keep-alive.
"""
