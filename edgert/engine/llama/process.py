"""Process-wide llama.cpp state: backend initialisation and the log hook that load errors quote.

llama.cpp reports the real reason for a failed load only through its log, so a
log callback keeps the recent lines and :func:`log_reason` quotes them. Also what
the CLI asks of llama.cpp before any model is loaded: ``--verbose`` and ``edgert doctor``.
"""

from __future__ import annotations

import collections
import ctypes
import threading
from typing import Any

import llama_cpp

from edgert.engine.base import BackendCapabilities

_GGML_LOG_WARN = 3
_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5


class _LlamaLog:
    """Keeps llama.cpp's recent log lines; prints nothing unless asked."""

    def __init__(self) -> None:
        self.lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=200)
        self.echo = False
        self._level = 0
        self._lock = threading.Lock()
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user_data: Any) -> None:
        if level != _GGML_LOG_CONT:
            self._level = level
        message = text.decode("utf-8", errors="replace")
        with self._lock:
            self.lines.append((self._level, message))
        if self.echo:
            print(message, end="", flush=True)

    def mark(self) -> int:
        with self._lock:
            self.lines.clear()
            return 0

    def errors_since_mark(self) -> str:
        with self._lock:
            interesting = [msg.strip() for level, msg in self.lines if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR)]
        return "; ".join(line for line in interesting if line)[-600:]


_log: _LlamaLog | None = None
_init_lock = threading.Lock()


def ensure_initialised() -> _LlamaLog:
    global _log  # noqa: PLW0603 - llama.cpp's backend and log hook are process-wide by nature
    with _init_lock:
        if _log is None:
            _log = _LlamaLog()
            llama_cpp.llama_log_set(_log.callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
        return _log


def set_verbose(verbose: bool) -> None:
    """Mirror llama.cpp's log to stdout (``--verbose``)."""
    ensure_initialised().echo = verbose


def capabilities() -> BackendCapabilities:
    ensure_initialised()
    return BackendCapabilities(
        name="llama.cpp",
        version=llama_cpp.__version__,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        system_info=llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip(),
    )


def log_reason() -> str:
    """llama.cpp's warnings and errors since the last :meth:`_LlamaLog.mark`, for a load error."""
    assert _log is not None
    return _log.errors_since_mark() or "no reason given in llama.cpp's log"
