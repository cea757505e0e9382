"""Rollouts: canary, waves, bake, gates and automatic rollback, persisted.

- ``model``: a rollout's spec, plan and states.
- ``controller``: the task that steps every active rollout; creation, commands and queries.
- ``machine``: the state machine, how one rollout moves between its states; ``Parts``, what
  it and the controller work with (built once by ``hub/server/control.py``).
- ``shadowing``: the shadow phase that can start each wave (the candidate compared beside the
  active version before the switch).
- ``gates``: gate parsing and judging.
- ``store``: the SQLite state that survives a hub ``kill -9``.
- ``desired``: node labels in, one retained ``desired`` message per node out.
"""
