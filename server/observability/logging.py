"""Process-wide log set-up: structlog in front of stdlib logging.

Library code only does ``logging.getLogger(__name__)``; the composition root
(``server/app.py``) calls `configure_logging` once. Every record, whether it
comes from stdlib logging or from a structlog logger, is rendered by one
handler on stderr:

- ``json``: one JSON object per line with ``time`` (ISO 8601, UTC),
  ``level``, ``logger``, ``message``, any bound context variables
  (``trace_id``, ``span_id``, ``task_id``, ``workflow_id``, ``agent_id``, ...),
  ``extra=`` fields and, for errors, ``exception``. This is what promtail in
  ``deploy/observability`` parses.
- ``console``: a human-readable, coloured line for development.

Context is bound with `bind_context` (contextvars, so it is safe across
asyncio tasks) and merged into every record logged inside the block.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Final, Literal, TextIO

import structlog
from opentelemetry import trace as otel_trace
from structlog.typing import EventDict, Processor

__all__ = ["LogFormat", "add_trace_ids", "bind_context", "configure_logging"]

LogFormat = Literal["json", "console"]
"""The output formats `configure_logging` accepts."""

_HANDLER_NAME: Final = "agentmesh"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler that writes to whatever `sys.stderr` is at emit time.

    Looking the stream up on every record keeps output correct when stderr is
    replaced after configuration (pytest's capture, daemonisation).
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        return


def add_trace_ids(_logger: object, _method: str, event: EventDict) -> EventDict:
    """Add ``trace_id``/``span_id`` of the current OpenTelemetry span, if any.

    Values bound explicitly win. With tracing off the current span is the
    invalid one and nothing is added.
    """
    if "span_id" not in event:
        ctx = otel_trace.get_current_span().get_span_context()
        if ctx.is_valid:
            event.setdefault("trace_id", format(ctx.trace_id, "032x"))
            event["span_id"] = format(ctx.span_id, "016x")
    return event


def _shared_processors() -> list[Processor]:
    """Processors applied to stdlib and structlog records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.StackInfoRenderer(),
    ]


def _parse_level(level: str) -> int:
    value = logging.getLevelNamesMapping().get(level.upper())
    if value is None:
        msg = f"unknown log level {level!r}"
        raise ValueError(msg)
    return value


def configure_logging(
    fmt: LogFormat,
    level: str = "INFO",
    *,
    stream: TextIO | None = None,
) -> None:
    """Route stdlib logging and structlog through one stderr handler.

    ``fmt`` picks JSON lines or console output; ``level`` is a level name
    (``"DEBUG"``, ``"info"``, ...). ``stream`` overrides the destination (by
    default the current `sys.stderr`). Calling this again replaces the
    handler it installed before, so it is safe to repeat.
    """
    if fmt not in ("json", "console"):
        msg = f"unknown log format {fmt!r}; expected 'json' or 'console'"
        raise ValueError(msg)
    numeric_level = _parse_level(level)
    shared = _shared_processors()

    renderer: list[Processor]
    if fmt == "json":
        renderer = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        renderer = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(
                colors=stream is None and sys.stderr.isatty(), timestamp_key="time"
            ),
        ]

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=renderer,
    )
    handler: logging.Handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


@contextlib.contextmanager
def bind_context(**kv: object) -> Iterator[None]:
    """Bind ``kv`` into every log record emitted inside the ``with`` block.

    Wraps `structlog.contextvars.bound_contextvars`: values are restored on
    exit, and each asyncio task sees its own bindings. Typical keys:
    ``trace_id``, ``span_id``, ``task_id``, ``workflow_id``, ``agent_id``.
    """
    with structlog.contextvars.bound_contextvars(**kv):
        yield
