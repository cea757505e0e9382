"""The one contract between agents, the hub and result subscribers.

Both programs import it; the hub imports nothing else from the agent but ``edge_agent.common``.

- ``protocol``: topics, payload schemas (results, telemetry, state, desired), label keys, name
  patterns, the result-message builder.
- ``manifest``: the model manifest schema (what a ``.json`` beside an ``.onnx`` must say).
- ``graph``: the ONNX graph checks a model must pass against its manifest, run by the agent at
  load and by the hub at push, so the two can never disagree.
"""
