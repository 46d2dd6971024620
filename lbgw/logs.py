"""Structured logs: one line per event, JSON (default) or ``key=value`` text.

Call sites log an event name and fields::

    log.info("listening", extra=fields(address="127.0.0.1:50051"))

and get ``{"ts": "...", "level": "info", "event": "listening", "address": ...}``.
The level and format come from config or the command line (``cli.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Final

__all__ = ["configure", "fields", "logger"]

_FIELDS: Final = "lbgw_fields"

logger = logging.getLogger("lbgw")


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """The ``extra=`` argument that attaches ``values`` to a log record."""
    return {_FIELDS: values}


def _event(record: logging.LogRecord) -> dict[str, Any]:
    event: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "event": record.getMessage(),
        "pid": os.getpid(),
    }
    event.update(getattr(record, _FIELDS, {}))
    if record.exc_info:
        event["error"] = logging.Formatter().formatException(record.exc_info)
    return event


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_event(record), default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = _event(record)
        head = f"{event.pop('ts')} {event.pop('level'):<7} {event.pop('event')}"
        rest = " ".join(
            f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in event.items()
        )
        return f"{head} {rest}"


def configure(level: str = "info", fmt: str = "json") -> None:
    """Send lbgw's (and gRPC's Python) logs to stderr, one structured line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
