"""The one-command local demo (``bash scripts/demo.sh``): see ``demo/run.py`` and docs/demo.md.

It is not part of the installed packages: it drives the agent and the hub only through their
command lines, HTTP and MQTT, as a user on one machine would.
"""
