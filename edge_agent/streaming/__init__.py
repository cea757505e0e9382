"""Streaming: cameras' frames onto the inference workers and results out to a sink.

- ``slots``: ``ServingModel`` (what the frame path needs from a loaded model) and ``ModelSlot``,
  which loaded model serves a name right now (hot swap between frames).
- ``scheduler``: the worker pool, batching across cameras, one ``Tally`` of counts per worker.
- ``shadow``: a candidate run on a sample of the active version's frames within a CPU budget,
  its answers scored for agreement, never published.
- ``calibration``: how many workers and how large a batch: measured at a first start, stored
  on the agent's volume, reused by a restart and measured again in the background.
- ``stoprule``: candidates timed in interleaved rounds until the leader is out of the noise.
- ``retune``: the layout re-evaluated while serving (throughput drop, backlog with idle CPU,
  periodic), by live trials switched between frames.
- ``pipeline``: cameras → scheduler → results relayed on the event loop → ``ResultSink``.
- ``outputs``: each model version's telemetry window (latency sketch, output statistics).
- ``sinks``: the ``ResultSink`` interface and the JSON-lines file sink.
- ``metrics``: Prometheus metrics of the frame path (per-stage latency, cameras, drops).
"""
