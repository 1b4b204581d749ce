"""Why an update round failed, in one word and one line: the failure classes of the update path.

Every failure of a round ends up as an :class:`~edgert.errors.EdgertError` whose
reason class (:class:`FailureReason`) is known by exception class, never by its
message: python-tuf's errors are classified where they are caught
(:mod:`edgert.update.registry`), OS and subprocess errors here, at the
orchestrator's boundary (:func:`converted`). The reason is what
``edgert_update_failures_total{reason=...}`` counts, the first word of
``last_error`` and of the history line, and what the MQTT deploy report carries.
Text is passed through :func:`edgert.log.scrub_urls` so no credential or token in a
URL reaches the state file, a log line or a retained message. Pure: no I/O.
"""

from __future__ import annotations

import errno
import subprocess
from enum import StrEnum

from edgert.errors import (
    ConfigError,
    DeadlineExceededError,
    DownloadCancelledError,
    DownloadError,
    DownloadTooSlowError,
    EdgertError,
    InsufficientStorageError,
    IntegrityError,
    ModelError,
    UpdateError,
)
from edgert.log import scrub_urls


class FailureReason(StrEnum):
    """The bounded label set of ``edgert_update_failures_total``."""

    # the registry and its signed metadata (python-tuf's verdicts)
    UNREACHABLE = "unreachable"  # no connection, or an HTTP error status
    CONNECTION_DROPPED = "connection_dropped"  # the response was cut off or never came
    DEADLINE = "deadline"  # too slow: a silent connection or a download past its deadline
    OVERSIZED = "oversized"  # more bytes than the signed (or python-tuf's default) length
    SIGNATURE = "signature"  # too few valid signatures (wrong key, tampered metadata)
    ROLLBACK = "rollback"  # an older version than the trusted one (replay, mix-and-match)
    EXPIRED = "expired"  # metadata past its expiry (a freeze attack, or a stale registry)
    HASH_LENGTH = "hash_length"  # metadata or model bytes that do not match their signed hash/length
    METADATA = "metadata"  # any other rejection of signed metadata (malformed, inconsistent)
    TARGET_NOT_FOUND = "target_not_found"
    DOWNLOAD = "download"  # a model download failed and resumes next round
    CANCELLED = "cancelled"  # edgert is stopping
    # the device
    DISK_FULL = "disk_full"
    PERMISSION = "permission"
    LOCK = "lock"  # the update lock cannot be opened (e.g. left root-owned by `sudo edgert update apply`)
    STATE = "state"  # the state file is unreadable or too new: updates are off
    TIMEOUT = "timeout"  # a wait inside the device timed out (the model switch, the event loop)
    OS_ERROR = "os_error"
    HOOK = "hook"
    MODEL = "model"  # the release is not a loadable model
    HEALTH_CHECK = "health_check"
    CONFIG = "config"
    UPDATE = "update"  # another update-path failure
    INTERNAL = "internal"  # a bug: an exception edgert did not expect (logged with its traceback)


_BY_CLASS: tuple[tuple[type[EdgertError], FailureReason], ...] = (
    (IntegrityError, FailureReason.HASH_LENGTH),
    (DownloadCancelledError, FailureReason.CANCELLED),
    (DownloadTooSlowError, FailureReason.DEADLINE),
    (DownloadError, FailureReason.DOWNLOAD),
    (InsufficientStorageError, FailureReason.DISK_FULL),
    (DeadlineExceededError, FailureReason.DEADLINE),
    (ModelError, FailureReason.MODEL),
    (ConfigError, FailureReason.CONFIG),
)

_BY_ERRNO: dict[int, FailureReason] = {
    errno.ENOSPC: FailureReason.DISK_FULL,
    errno.EDQUOT: FailureReason.DISK_FULL,
    errno.EACCES: FailureReason.PERMISSION,
    errno.EPERM: FailureReason.PERMISSION,
    errno.EROFS: FailureReason.PERMISSION,
}


def reason_of(exc: BaseException) -> FailureReason:  # noqa: PLR0911 - one return per family of errors
    """The failure class of an exception that ended an update round."""
    if isinstance(exc, UpdateError):
        try:
            return FailureReason(exc.reason)
        except ValueError:
            return FailureReason.UPDATE
    for cls, reason in _BY_CLASS:
        if isinstance(exc, cls):
            return reason
    if isinstance(exc, TimeoutError | subprocess.TimeoutExpired):
        return FailureReason.TIMEOUT
    if isinstance(exc, OSError):
        return _BY_ERRNO.get(exc.errno or 0, FailureReason.OS_ERROR)
    if isinstance(exc, EdgertError):
        return FailureReason.UPDATE
    return FailureReason.INTERNAL


def message_of(exc: BaseException) -> str:
    """One line, URLs without credentials or query: what the error says (its type when it says nothing)."""
    if isinstance(exc, EdgertError):
        text = exc.message
    elif isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{type(exc).__name__}: {exc.strerror}{where}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return scrub_urls(" ".join(text.split()))


def describe(exc: BaseException) -> str:
    """``<reason>: <message>``, the form of ``last_error``, the CLI's error line and the log line."""
    return f"{reason_of(exc)}: {message_of(exc)}"


def converted(exc: BaseException, doing: str) -> BaseException:
    """An OS or subprocess error as an UpdateError naming what the update path was doing; others unchanged.

    A bug (any other exception) is left as it is: the loop logs it with its traceback.
    """
    if isinstance(exc, EdgertError) or not isinstance(exc, OSError | subprocess.SubprocessError):
        return exc
    reason = reason_of(exc)
    what = "timed out" if reason is FailureReason.TIMEOUT and not str(exc) else message_of(exc)
    return UpdateError(f"{doing}: {what}", reason=reason)
