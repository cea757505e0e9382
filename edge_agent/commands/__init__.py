"""The ``edge-agent`` verbs, one module each with ``register(subparsers)``.

- ``run``: run the agent until SIGTERM.
- ``validate_config``: check a config file without starting anything.
- ``infer``: one model on image files, JSON out.
- ``batch``: a model over a folder or a video, once (the CronJob mode).
"""
