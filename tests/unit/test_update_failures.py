"""Failure classes of the update path (edgert.update.failures): by exception class, one line, no secrets."""

from __future__ import annotations

import errno
import subprocess

import pytest

from edgert.errors import (
    DownloadError,
    DownloadTooSlowError,
    HookVetoError,
    IntegrityError,
    RegistryUnavailableError,
    UntrustedMetadataError,
    UpdateError,
)
from edgert.update.failures import FailureReason, converted, describe, reason_of


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (IntegrityError("sha256 mismatch"), FailureReason.HASH_LENGTH),
        (DownloadTooSlowError("too slow"), FailureReason.DEADLINE),
        (DownloadError("interrupted"), FailureReason.DOWNLOAD),
        (RegistryUnavailableError("refused"), FailureReason.UNREACHABLE),
        (UntrustedMetadataError("bad", reason="signature"), FailureReason.SIGNATURE),
        (HookVetoError("exited 1"), FailureReason.HOOK),
        (OSError(errno.ENOSPC, "No space left on device"), FailureReason.DISK_FULL),
        (PermissionError(errno.EACCES, "Permission denied"), FailureReason.PERMISSION),
        (TimeoutError(), FailureReason.TIMEOUT),
        (subprocess.TimeoutExpired("hook", 5), FailureReason.TIMEOUT),
        (OSError(errno.ENOEXEC, "Exec format error"), FailureReason.OS_ERROR),
        (KeyError("bug"), FailureReason.INTERNAL),
    ],
)
def test_reason_by_exception_class(error: BaseException, reason: FailureReason) -> None:
    assert reason_of(error) is reason


def test_os_errors_become_update_errors_naming_the_step_and_bugs_stay_as_they_are() -> None:
    error = converted(OSError(errno.ENOSPC, "No space left on device", "/var/lib/edgert/update/state.json"), "applying")
    assert isinstance(error, UpdateError) and error.reason == "disk_full"
    assert describe(error) == "disk_full: applying: OSError: No space left on device: /var/lib/edgert/update/state.json"
    assert describe(converted(TimeoutError(), "applying")) == "timeout: applying: timed out"
    bug = KeyError("x")
    assert converted(bug, "applying") is bug


def test_description_is_one_line_without_url_credentials_or_query() -> None:
    error = RegistryUnavailableError(
        "registry unreachable:\n  DownloadError: Failed to download https://edgert:s3cret@reg.example/metadata/"
        "timestamp.json?token=t0ken"
    )
    line = describe(error)
    assert "\n" not in line and "reg.example/metadata/timestamp.json" in line
    assert "s3cret" not in line and "t0ken" not in line
