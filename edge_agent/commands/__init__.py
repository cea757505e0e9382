"""The ``edge-agent`` verbs, one module each: its docstring is the verb's help, ``arguments``
adds its options and ``run`` runs it (the scaffold, ``edge_agent.common.cli``, does the rest).

- ``run``: run the agent until SIGTERM.
- ``validate_config``: check a config file without starting anything.
- ``infer``: one model on image files, JSON out.
- ``batch``: a model over a folder or a video, once (the CronJob mode).
"""
