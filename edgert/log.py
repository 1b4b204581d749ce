"""Structured logging to stdout: console text in development, JSON lines for journald.

Every record carries the current request id (a context variable set by the
transports), so one request's lines can be followed across the event loop.
Fields passed as ``extra={"fields": {...}}`` become JSON keys. Never log
secrets: settings are logged through :func:`redact`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("edgert_request_id", default="-")

_SECRET_KEY = re.compile(r"(password|passwd|secret|api_?key|private_key|(^|_)token$|credential)", re.IGNORECASE)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} [{getattr(record, 'request_id', '-')}] "
        text = base + record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(level: str = "info", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_lines else ConsoleFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours (and carries no request id)
    logging.getLogger("uvicorn.access").disabled = True


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested settings dump with secret-looking values replaced."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            clean[key] = redact(value)
        elif _SECRET_KEY.search(key) and value not in (None, ""):
            clean[key] = "***"
        else:
            clean[key] = value
    return clean
