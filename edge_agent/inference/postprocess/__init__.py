"""Post-processing units, one per model task, registered by task name.

A unit turns a batch of raw model outputs into plain-JSON results (``{"classes": [...]}`` or
``{"detections": [...]}``, shaped like ``protocol.ClassScore`` / ``protocol.Detection``). A new
task is a new module with a ``PostprocessUnit`` subclass decorated with ``@register``; the
manifest's ``task`` field picks it, and its ``Params`` model validates the manifest's
``postprocess`` section when the manifest loads.
"""

from __future__ import annotations

import importlib

from edge_agent.inference.postprocess.base import (
    NonFiniteOutputError,
    PostprocessUnit,
    register,
    registered,
)

#: Modules of the built-in units, imported on first use (they register themselves).
_BUILTIN = (
    "edge_agent.inference.postprocess.classification",
    "edge_agent.inference.postprocess.yolo",
    "edge_agent.inference.postprocess.centerface",
)
_loaded = False


def _load_builtin() -> None:
    global _loaded  # noqa: PLW0603 - a one-time import guard
    if not _loaded:
        for mod in _BUILTIN:
            importlib.import_module(mod)
        _loaded = True


def tasks() -> frozenset[str]:
    """Names of every registered task."""
    _load_builtin()
    return frozenset(registered())


def get_unit(task: str) -> type[PostprocessUnit]:
    """The unit class registered for ``task``; ``KeyError`` when there is none."""
    _load_builtin()
    return registered()[task]


__all__ = ["NonFiniteOutputError", "PostprocessUnit", "get_unit", "register", "tasks"]
