"""Streaming: cameras' frames onto the inference workers and results out to a sink.

- ``slots``: ``ModelSlot``, which loaded model serves a name right now (hot swap between frames).
- ``scheduler``: the worker pool, batching across cameras, calibration of its layout at start.
- ``pipeline``: cameras → scheduler → results relayed on the event loop → ``ResultSink``.
- ``sinks``: the ``ResultSink`` interface and the JSON-lines file sink.
- ``metrics``: Prometheus metrics of the frame path (per-stage latency, cameras, drops).
"""
