"""Capture: camera URLs and the threads that keep each camera's newest frame.

- ``sources``: parse and open a source URL (file, RTSP/HTTP, USB, test pattern).
- ``camera``: ``Camera``, one thread per camera, reconnect with backoff, latest frame wins.
"""
