"""Post-processing units, one per model task, registered by task name.

A unit turns a batch of raw model outputs into plain-JSON results (``{"classes": [...]}`` or
``{"detections": [...]}``, shaped like ``protocol.ClassScore`` / ``protocol.Detection``). The
task names, their ``postprocess`` parameter schemas and the outputs each reads are the
contract's (``edge_agent.contract.tasks``), checked by the hub at push and by the manifest
parser; a new task is an entry there plus a module here with a ``PostprocessUnit`` subclass
that names the task and its parameter model, ``class Yolo(base.PostprocessUnit[tasks.YoloParams],
task="yolo")``, and decodes one frame in ``decode`` (a task the contract does not know, or
another parameter model, is refused when the class is made).
"""

from __future__ import annotations

import importlib
from typing import Any

from edge_agent.inference.postprocess.base import (
    NonFiniteOutputError,
    PostprocessUnit,
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
    """Names of every task with a unit (the contract's ``tasks.names()``, once all load)."""
    _load_builtin()
    return frozenset(registered())


def get_unit(task: str) -> type[PostprocessUnit[Any]]:
    """The unit class registered for ``task``; ``KeyError`` when there is none."""
    _load_builtin()
    return registered()[task]


__all__ = ["NonFiniteOutputError", "PostprocessUnit", "get_unit", "tasks"]
