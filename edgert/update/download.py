"""Fetch one file into ``<file>.part``: resumable, capped, hash-verified. The one downloader.

Both the updater (a signed target: exact length and hashes from verified TUF metadata)
and ``edgert models pull`` (a catalog model: an exact pinned length, or only a maximum,
and a sha256 when one is pinned) download through :func:`fetch`. It trusts nothing the
server says:

* never more bytes than the exact length (or the maximum) — a larger ``Content-Length`` or
  ``Content-Range`` is refused before the body, and a body that keeps coming (no length,
  or a lying one) is cut there ("endless data");
* an HTTP ``Range`` request resumes an earlier ``.part``; a server that ignores it
  (200 instead of 206) restarts from zero, truncating the file; a 416 for a file of
  unknown length (its ``.part`` may already hold all of it) starts over once;
* SHA-256 (and SHA-512 when given) while streaming, over every byte including the
  resumed prefix, then fsync; the caller renames the verified ``.part`` into place.
  sha256 is required unless the caller says the file has no pin (``require_sha256``; pull
  allows that only for https-only downloads or catalog entries without a hash, finding 13);
  ``https_only`` refuses a redirect off https;
* free space is checked against the exact length before the first byte;
* an overall deadline (:class:`Pace`: slack + remaining bytes / a minimum throughput)
  cuts a registry that trickles bytes just fast enough to dodge the per-read timeout
  (1 KiB every 0.5 s once held the update lock for good): "too slow", ``.part`` kept;
* a ``stop`` event, checked between reads, ends a download when the daemon stops
  (DownloadCancelledError, ``.part`` kept for the next start).

How it keeps up with the network (measured in ``benchmarks/update_download.py``):
:func:`client`'s connections take up to ``READ_BYTES`` per socket read (httpcore asks
for 64 KiB; :mod:`edgert.update.download_http` does this through httpcore's public
network-backend API), each buffer is written at once, unbuffered, and handed to a second
thread that hashes it (hashlib releases the GIL for large buffers, so hashing overlaps
the next read and write). After a ``kill -9`` the resume fetches again what was in
flight: the client's part (its kernel receive queue, one unwritten read) measured 0.1 to
0.5 MiB with the kernel's receive-buffer autotuning; the rest sat in the server's send
buffer. Capping ``SO_RCVBUF`` (``receive_buffer_bytes``) did not shrink that, and caps
throughput at about buffer / RTT, so it is off by default.

A connection that drops keeps the ``.part`` (DownloadError: run again to resume);
bytes that can never become the expected file (IntegrityError) are deleted.
Only this module and :mod:`edgert.update.download_http` see httpx exceptions.
Over 400 lines on purpose: every rule a downloaded byte passes is here, in the order it applies. URLs appear
in messages without user:password or query (:func:`edgert.log.display_url`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Protocol

import httpx

from edgert.errors import (
    DownloadCancelledError,
    DownloadError,
    DownloadTooSlowError,
    InsufficientStorageError,
    IntegrityError,
)
from edgert.log import display_url, scrub_urls
from edgert.update.download_http import READ_BYTES, client

__all__ = [
    "CHUNK_BYTES",
    "HASH_QUEUE_BUFFERS",
    "READ_BYTES",
    "SUPPORTED_HASHES",
    "Fetch",
    "Fetched",
    "Pace",
    "Progress",
    "check_free_space",
    "client",
    "fetch",
]

CHUNK_BYTES: Final = 1 << 20
#: Buffers waiting for the hashing thread before the network loop waits for it
#: (memory: at most this many reads of up to READ_BYTES).
HASH_QUEUE_BUFFERS: Final = 16
#: Hash algorithms checked when the metadata lists them; sha256 is always computed.
SUPPORTED_HASHES: Final = ("sha256", "sha512")
_CONTENT_RANGE: Final = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


#: Called with (bytes of the file on disk so far, expected total: the exact length, else what the
#: server announced, else the maximum).
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Fetch:
    url: str
    part: Path
    #: The file's exact length (signed, or pinned); None when only ``max_length`` bounds it.
    length: int | None
    #: Digests the file must have, by algorithm (lower-case hex).
    hashes: Mapping[str, str]
    #: Most bytes accepted when ``length`` is None.
    max_length: int | None = None
    #: Extra request headers (a Hub token).
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Refuse a response reached over anything but https (redirects included): for a file with no
    #: pinned hash, the transport is its only integrity check.
    https_only: bool = False
    #: False only for a file nobody pinned a sha256 for (then the computed one is returned).
    require_sha256: bool = True
    #: Whose word the length and hashes are, as an adjective for messages ("the signed length").
    pin: str = "signed"

    def __post_init__(self) -> None:
        if self.length is None and self.max_length is None:
            raise ValueError("a download needs an exact length or a maximum")

    @property
    def cap(self) -> int:
        """Never more bytes than this."""
        cap = self.length if self.length is not None else self.max_length
        assert cap is not None  # __post_init__
        return cap


@dataclass(frozen=True, slots=True)
class Pace:
    """The slowest download accepted: it must end ``slack_s + remaining bytes / min_bytes_per_s`` after it starts.

    Derived from the signed length, so a server cannot stretch it by announcing anything.
    """

    min_bytes_per_s: int
    slack_s: float

    def budget_s(self, remaining: int) -> float:
        return self.slack_s + remaining / self.min_bytes_per_s


@dataclass(frozen=True, slots=True)
class Fetched:
    #: Bytes of an earlier attempt that were kept.
    resumed_from: int
    #: Bytes received over the network by this call.
    received: int
    #: SHA-256 of the verified file (hex).
    sha256: str = ""


def fetch(
    client: httpx.Client,
    job: Fetch,
    *,
    reserve_bytes: int = 0,
    progress: Progress | None = None,
    pace: Pace | None = None,
    stop: threading.Event | None = None,
) -> Fetched:
    """Complete ``job.part`` and verify it; raise without touching anything else on any failure.

    ``pace`` bounds the whole transfer (DownloadError "too slow"); ``stop``, checked between
    reads, ends it (DownloadCancelledError). Both keep the ``.part`` for a later resume.
    """
    have = _usable(job)
    if job.length is not None:  # of a file of unknown length the caller checks with its own estimate
        check_free_space(job.part.parent, job.length - have, reserve_bytes)
    digests = _digests(job)
    _hash_prefix(job.part, have, digests)
    received = 0
    start = have
    if job.length is None or have < job.length:
        try:
            start, received = _transfer_or_restart(client, job, have, digests, _Limits(progress, pace, stop))
        except IntegrityError:
            job.part.unlink(missing_ok=True)  # these bytes can never become the expected file
            raise
    _verify(job, digests)
    return Fetched(resumed_from=start, received=received, sha256=digests["sha256"].hexdigest())


def check_free_space(directory: Path, needed: int, reserve_bytes: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + reserve_bytes:
        raise InsufficientStorageError(
            f"the update needs {_mib(needed)} MiB (+{_mib(reserve_bytes)} MiB reserve) free in {directory}; "
            f"only {_mib(free)} MiB is free"
        )


def _usable(job: Fetch) -> int:
    try:
        size = job.part.stat().st_size
    except FileNotFoundError:
        return 0
    if size > job.cap:  # cannot be a prefix of the expected file
        job.part.unlink()
        return 0
    return size


@dataclass(slots=True)
class _Limits:
    """What one transfer reports to and is bounded by."""

    progress: Progress | None
    pace: Pace | None
    stop: threading.Event | None
    #: time.monotonic() by which the transfer must be done (set when it starts).
    deadline: float | None = None
    started: float = 0.0
    #: Bytes of the file on disk at the last check.
    done: int = 0

    def restart(self, remaining: int) -> None:
        """The server ignored our Range request: the deadline is for the whole file."""
        if self.pace is not None:
            self.deadline = self.started + self.pace.budget_s(remaining)

    def check(self, job: Fetch, start: int, done: int) -> None:
        """Between reads: raise when asked to stop, or past the deadline."""
        self.done = done
        if self.stop is not None and self.stop.is_set():
            raise DownloadCancelledError(
                f"download of {display_url(job.url)} stopped at byte {done} of {job.cap} because edgert is stopping; "
                "the next attempt resumes"
            )
        if self.deadline is not None and self.pace is not None and time.monotonic() > self.deadline:
            elapsed = time.monotonic() - self.started
            raise DownloadTooSlowError(
                f"download of {display_url(job.url)} too slow: {done - start} bytes in {elapsed:.0f} s, short of the "
                f"{job.cap - start} needed at update.download_min_bytes_per_s={self.pace.min_bytes_per_s} "
                f"(+{self.pace.slack_s:g} s slack); {done} of {job.cap} bytes kept, the next attempt resumes"
            )


class _RangeNotSatisfiableError(Exception):
    """HTTP 416 to our Range request for a file of unknown length."""


def _transfer_or_restart(
    client: httpx.Client, job: Fetch, have: int, digests: dict[str, _Hash], limits: _Limits
) -> tuple[int, int]:
    try:
        return _transfer(client, job, have, digests, limits)
    except _RangeNotSatisfiableError:
        # Without an exact length a .part holding the whole file looks unfinished: start over, once.
        job.part.unlink(missing_ok=True)
        digests.update(_digests(job))
        return _transfer(client, job, 0, digests, limits)


def _transfer(
    client: httpx.Client, job: Fetch, have: int, digests: dict[str, _Hash], limits: _Limits
) -> tuple[int, int]:
    headers = {**job.headers, "Accept-Encoding": "identity"}  # a compressed body would defeat Range
    if have:
        headers["Range"] = f"bytes={have}-"
    limits.check(job, have, have)
    timeout = client.timeout
    limits.started = time.monotonic()
    if limits.pace is not None:
        budget = limits.pace.budget_s(job.cap - have)
        limits.deadline = limits.started + budget
        # A silent server is cut by the deadline too, not only after the per-read timeout.
        read = budget if timeout.read is None else min(timeout.read, budget)
        timeout = httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)
    url = display_url(job.url)
    try:
        with client.stream("GET", job.url, headers=headers, timeout=timeout) as response:
            _check_scheme(response, job)
            start = _start_of(response, have, job)
            total = _check_announced(response, start, job)
            if start == 0 and have:  # a 200 after a Range request: the kept bytes go
                digests.update(_digests(job))
                limits.restart(job.cap)
            with job.part.open("r+b" if start else "wb", buffering=0) as fh:
                fh.seek(start)
                fh.truncate()
                received = _copy(response, fh, start, job, digests, limits, total)
                os.fsync(fh.fileno())
    except httpx.TimeoutException as exc:
        if limits.deadline is not None and time.monotonic() >= limits.deadline:
            limits.check(job, have, max(limits.done, have))  # a silent server past it: "too slow" like a trickle
        raise DownloadError(f"download of {url} interrupted ({_text(exc)}); the next attempt resumes") from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"download of {url} interrupted ({_text(exc)}); the next attempt resumes") from None
    except httpx.InvalidURL as exc:
        raise DownloadError(f"cannot download {url}: {_text(exc)}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # someone else filled the volume after our free-space check
            raise InsufficientStorageError(f"{job.part.parent} is full ({exc.strerror})") from None
        raise
    done = start + received
    if job.length is not None and done < job.length:
        raise DownloadError(f"{url}: the connection ended at byte {done} of {job.length}; the next attempt resumes")
    return start, received


def _text(exc: Exception) -> str:
    return scrub_urls(str(exc)) or type(exc).__name__


def _check_scheme(response: httpx.Response, job: Fetch) -> None:
    if job.https_only and response.url.scheme != "https":
        raise IntegrityError(
            f"{display_url(job.url)} redirected to {display_url(str(response.url))}: a download without a "
            "pinned sha256 must stay on https"
        )


def _start_of(response: httpx.Response, have: int, job: Fetch) -> int:
    url = display_url(job.url)
    if response.status_code == 200:
        return 0
    if response.status_code == 206 and have:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == have:
            return have
        raise DownloadError(f"{url}: bad Content-Range {response.headers.get('Content-Range')!r}")
    if response.status_code == 416 and have:
        if job.length is None:
            raise _RangeNotSatisfiableError
        # Our .part is no prefix of what the server has: drop it, the next attempt starts over.
        job.part.unlink(missing_ok=True)
    raise DownloadError(f"{url}: the server answered HTTP {response.status_code}")


def _check_announced(response: httpx.Response, start: int, job: Fetch) -> int | None:
    """Refuse before reading the body when the server announces a size other than expected; return it."""
    total: int | None = None
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match and match.group(3) != "*":
        total = int(match.group(3))
    elif "Content-Length" in response.headers and "Content-Range" not in response.headers:
        total = start + int(response.headers["Content-Length"])
    if total is not None and job.length is not None and total != job.length:
        raise IntegrityError(
            f"{display_url(job.url)}: the server offers {total} bytes, the {job.pin} length is {job.length}"
        )
    if total is not None and total > job.cap:
        raise IntegrityError(
            f"{display_url(job.url)}: the server offers {total} bytes, more than the {job.cap} allowed"
        )
    return total


def _copy(
    response: httpx.Response,
    fh: BinaryIO,
    start: int,
    job: Fetch,
    digests: dict[str, _Hash],
    limits: _Limits,
    announced: int | None,
) -> int:
    done = start
    cap = job.cap
    total = job.length or announced or cap  # what the progress callback is told
    hasher = _Hasher(digests)
    try:
        # iter_raw: the transport's own buffers as they arrive, no re-chunking copy (we asked for
        # identity encoding; a server that compresses anyway fails the hash check).
        for chunk in response.iter_raw():
            if done + len(chunk) > cap:
                # Endless data: write nothing past the cap, and stop reading.
                _write_all(fh, chunk[: cap - done])
                raise IntegrityError(f"{display_url(job.url)}: the server sent more than the {_cap_text(job)} bytes")
            _write_all(fh, chunk)
            hasher.update(chunk)
            done += len(chunk)
            if limits.progress is not None:
                limits.progress(done, total)
            limits.check(job, start, done)
    finally:
        hasher.close()
    return done - start


def _cap_text(job: Fetch) -> str:
    return f"{job.pin} {job.length}" if job.length is not None else f"{job.cap} allowed"


def _write_all(fh: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = fh.write(view)
        view = view[written:]


class _Hasher:
    """Update the digests on a second thread, in order, from a bounded queue of immutable buffers."""

    def __init__(self, digests: dict[str, _Hash]) -> None:
        self._digests = list(digests.values())
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_QUEUE_BUFFERS)
        self._thread = threading.Thread(target=self._run, name="edgert-hash", daemon=True)
        self._thread.start()

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait until every queued buffer is hashed (also on an error: the digests are then unused)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            for digest in self._digests:
                digest.update(chunk)


def _digests(job: Fetch) -> dict[str, _Hash]:
    wanted = [name for name in job.hashes if name in SUPPORTED_HASHES]
    if "sha256" not in wanted:
        if job.require_sha256:
            raise IntegrityError(f"{display_url(job.url)}: no sha256 in the {job.pin} metadata")
        wanted.append("sha256")  # computed for the caller, checked against nothing
    return {name: hashlib.new(name) for name in wanted}


def _hash_prefix(part: Path, length: int, digests: dict[str, _Hash]) -> None:
    """Hash the kept bytes of an earlier attempt (after a crash they may not have been hashed)."""
    if not length:
        return
    with part.open("rb") as fh:
        while chunk := fh.read(min(CHUNK_BYTES, length - fh.tell())):
            for digest in digests.values():
                digest.update(chunk)


def _verify(job: Fetch, digests: dict[str, _Hash]) -> None:
    """Length and every given hash, computed while streaming; delete the file when wrong."""
    size = job.part.stat().st_size
    problems = (
        [] if job.length is None or size == job.length else [f"{size} bytes, the {job.pin} length is {job.length}"]
    )
    for name, expected in job.hashes.items():
        actual = digests[name].hexdigest() if name in digests else None
        if actual is not None and actual != expected:
            problems.append(f"{name} mismatch: expected {expected}, actual {actual}")
    if problems:
        job.part.unlink(missing_ok=True)
        raise IntegrityError(
            f"{display_url(job.url)}: downloaded file does not match the {job.pin} metadata: {'; '.join(problems)}"
        )


def _mib(n: int) -> int:
    return -(-n // 2**20)
