"""The hub: model registry, rollouts by node label selector, telemetry, REST API and CLI."""

__version__ = "0.1.0"
