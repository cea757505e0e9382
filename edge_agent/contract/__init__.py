"""The one contract between agents, the hub and result subscribers.

Both programs import it; the hub imports nothing else from the agent but ``edge_agent.common``.

- ``protocol``: topics, payload schemas (results, telemetry, state, desired), label keys, name
  patterns.
- ``acl``: the broker's topic rights per identity (a node its own topics, the hub, consumers),
  rendered as the Mosquitto ACL file that K3s, the demo and the tests' broker all run.
- ``results``: the result-message builder (scheduler, batch and HTTP uploads build results here).
- ``manifest``: the model manifest schema (what a ``.json`` beside an ``.onnx`` must say).
- ``tasks``: the task names, each task's ``postprocess`` parameter schema and the outputs it
  reads (the agent's post-processing units take their schemas from here).
- ``graph``: the ONNX graph checks a model must pass against its manifest, run by the agent at
  load and by the hub at push, so the two can never disagree.
- ``rejection``: ``Rejection``, what those checks raise: a stable ``reason`` code and a message
  that the agent's errors and the hub's JSON errors both carry unchanged.
"""
