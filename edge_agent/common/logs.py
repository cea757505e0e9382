"""structlog configured once, at the entry point.

JSON lines when stdout is not a TTY (a pod), a console renderer on a TTY. Stdlib loggers of
third-party libraries (paho, aiohttp, kubernetes) are routed through the same processors so that
every line has the same shape. Context (node, camera, model version) is bound with
``structlog.contextvars.bind_contextvars``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger; call once in ``main()``.

    ``json=None`` picks JSON lines unless stdout is a TTY.
    """
    if json is None:
        json = not sys.stdout.isatty()
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # third-party libraries are chatty at INFO; keep them at WARNING unless we debug
    root.setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
