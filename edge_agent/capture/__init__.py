"""Capture: the threads that keep each camera's newest frame.

- ``sources``: open a parsed source URL (file, RTSP/HTTP, USB, test pattern); the URL grammar
  itself is the config's (``edge_agent.config.parse_source``).
- ``camera``: ``Camera``, one thread per camera, reconnect with backoff, latest frame wins.
"""
