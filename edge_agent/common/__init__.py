"""Plumbing both programs need, written once: the agent and the hub import it.

- ``logs``: structlog configured once at the entry point.
"""
