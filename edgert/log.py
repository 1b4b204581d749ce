"""Structured logging to stdout: console text in development, JSON lines for journald.

Every record carries the current request id (a context variable set by the
transports), so one request's lines can be followed across the event loop.
Fields passed as ``extra={"fields": {...}}`` become JSON keys. Never log
secrets: settings are logged through :func:`redact`; a URL is shown through
:func:`display_url` and free text that may hold URLs (exception messages, which
urllib3 and httpx fill with the URL they were given) through :func:`scrub_urls`,
so ``https://user:pass@host/?token=...`` never reaches a log, ``last_error`` or a
retained MQTT message.
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
from urllib.parse import urlsplit, urlunsplit

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("edgert_request_id", default="-")

_SECRET_KEY = re.compile(r"(password|passwd|secret|api_?key|private_key|(^|_)token$|credential)", re.IGNORECASE)

# A URL inside free text: a scheme, "://", then everything up to white space or a quote/bracket that
# ends it in a repr or a message ("... url='https://u:p@h/x?q' ...", "(https://h/x)").
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
# A userinfo may hold characters that end _URL_IN_TEXT early ("pa(ss"): it is cut first, up to its last "@".
_USERINFO_IN_TEXT = re.compile(r"(?<=://)[^\s/?#]*@")
# urllib3 names only the path of a failed request: "Max retries exceeded with url: /x.json?sig=... (Caused by"
_URLLIB3_PATH = re.compile(r"(\burl: /[^\s?#]*)[?#]\S*")


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
        # last guard for what we do not word ourselves (httpx's "HTTP Request: GET <url>", a settings dump)
        return scrub_urls(json.dumps(line, default=str))


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} [{getattr(record, 'request_id', '-')}] "
        text = base + record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return scrub_urls(text)  # as in JsonFormatter


def setup(level: str = "info", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_lines else ConsoleFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours (and carries no request id)
    logging.getLogger("uvicorn.access").disabled = True


def display_url(url: str) -> str:
    """``url`` as it may be shown: scheme, host, port and path, without user:password, query or fragment.

    A pre-signed or token-bearing URL carries its secret in the userinfo or the query; neither helps a
    reader find the host or file, so both are dropped (an elided query shows as ``?...``). Text that is not
    an absolute URL (a local path) comes back unchanged.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host: show nothing of it rather than the raw text
        return "<invalid url>"
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    path = parts.path + ("?..." if parts.query else "")
    return urlunsplit((parts.scheme, host, path, "", ""))


def scrub_urls(text: str) -> str:
    """``text`` with every URL in it replaced by its :func:`display_url` form."""
    text = _USERINFO_IN_TEXT.sub("", text)
    text = _URL_IN_TEXT.sub(lambda match: display_url(match.group(0)), text)
    return _URLLIB3_PATH.sub(lambda match: match.group(1) + "?...", text)


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


class LogGate:
    """At most one log line per ``interval_s`` for one kind of event; says how many were held back."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._held = 0

    def allow(self) -> int | None:
        """None: stay quiet; else the number of events not logged since the last line."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self.interval_s
        held, self._held = self._held, 0
        return held


class RateLimitedLog:
    """At most one line per reason per interval on ``logger``, with the count of those held back: a flood
    of hostile or repeated messages must not become a flood of log lines on a device's small disk."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self.interval_s = interval_s
        self._gates: dict[str, LogGate] = {}

    def log(self, level: int, reason: str, message: str, *args: object) -> None:
        held = self._gates.setdefault(reason, LogGate(self.interval_s)).allow()
        if held is None:
            return
        suffix = f" ({held} more like it in the last {self.interval_s:g} s)" if held else ""
        self._logger.log(level, message + suffix, *args)

    def warning(self, reason: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, reason, message, *args)
