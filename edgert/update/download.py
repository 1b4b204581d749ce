"""Fetch one signed target into ``<file>.part``: resumable, capped, hash-verified.

The signed length and hashes come from verified TUF metadata, so this module
trusts nothing the server says:

* never more bytes than the signed length — a larger ``Content-Length`` or
  ``Content-Range`` is refused before the body, and a body that keeps coming
  (no length, or a lying one) is cut at the signed length ("endless data");
* an HTTP ``Range`` request resumes an earlier ``.part``; a server that ignores it
  (200 instead of 206) restarts from zero, truncating the file;
* SHA-256 (and SHA-512 when signed) while streaming, over every byte including
  the resumed prefix, then fsync; the caller renames the verified ``.part`` into place;
* free space is checked against the signed length before the first byte;
* an overall deadline (:class:`Pace`: slack + remaining signed bytes / a minimum
  throughput) cuts a registry that trickles bytes just fast enough to dodge the per-read
  timeout (1 KiB every 0.5 s once held the update lock for good): "too slow", ``.part`` kept;
* a ``stop`` event, checked between reads, ends a download when the daemon stops
  (DownloadCancelledError, ``.part`` kept for the next start).

How it keeps up with the network (measured in ``benchmarks/update_download.py``):
:func:`client`'s connections take up to ``READ_BYTES`` per socket read (httpcore asks
for 64 KiB), each buffer is written at once, unbuffered, and handed to a second thread
that hashes it (hashlib releases the GIL for large buffers, so hashing overlaps the next
read and write). After a ``kill -9`` the resume fetches again what was in flight: the
client's part (its kernel receive queue, one unwritten read) measured 0.1 to 0.5 MiB with
the kernel's receive-buffer autotuning; the rest sat in the server's send buffer. Capping
``SO_RCVBUF`` (``receive_buffer_bytes``) did not shrink that, and caps throughput at about
buffer / RTT, so it is off by default.

A connection that drops keeps the ``.part`` (DownloadError: run again to resume);
bytes that can never become the signed file (IntegrityError) are deleted.
Only this module sees httpx exceptions.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import httpcore
import httpx

from edgert.errors import (
    DownloadCancelledError,
    DownloadError,
    DownloadTooSlowError,
    InsufficientStorageError,
    IntegrityError,
)

CHUNK_BYTES: Final = 1 << 20
#: Most bytes taken from the socket per read by :func:`client`'s connections.
READ_BYTES: Final = 1 << 20
#: Buffers waiting for the hashing thread before the network loop waits for it
#: (memory: at most this many reads of up to READ_BYTES).
HASH_QUEUE_BUFFERS: Final = 16
#: Hash algorithms checked when the metadata lists them; sha256 is required upstream.
SUPPORTED_HASHES: Final = ("sha256", "sha512")
_CONTENT_RANGE: Final = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


#: Called with (bytes of the file on disk so far, signed length).
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Fetch:
    url: str
    part: Path
    length: int
    hashes: Mapping[str, str]


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


def client(
    timeout: httpx.Timeout | float, *, follow_redirects: bool = True, receive_buffer_bytes: int | None = None
) -> httpx.Client:
    """An HTTP client for :func:`fetch` with large reads; ``receive_buffer_bytes`` sets ``SO_RCVBUF``
    (None: the kernel's autotuning; a cap also limits throughput to about twice the cap per RTT)."""
    transport = _Transport(receive_buffer_bytes)
    return httpx.Client(timeout=timeout, follow_redirects=follow_redirects, transport=transport)


class _Transport(httpx.HTTPTransport):
    """httpx's transport over a network backend that reads up to ``READ_BYTES`` per call.

    httpcore asks its stream for 64 KiB at a time; taking what the socket holds, up to
    ``READ_BYTES``, cuts the per-buffer Python work (parse, write, queue) by up to 16x on
    fast links. httpx does not take a network backend, so the pool is rebuilt with one
    (same settings as httpx's defaults). Over TLS a read usually returns one record (16 KiB) at most.
    """

    def __init__(self, receive_buffer_bytes: int | None) -> None:
        options = [] if receive_buffer_bytes is None else [(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)]
        super().__init__(socket_options=options)
        # Fails loudly (tests) if httpx stops keeping its pool here, instead of silently losing the reads.
        assert isinstance(self._pool, httpcore.ConnectionPool), "httpx.HTTPTransport._pool moved"
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=httpx.Limits().max_connections,
            socket_options=options,
            network_backend=_LargeReads(httpcore.SyncBackend()),
        )


class _LargeReads(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _LargeReadStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.NetworkStream:
        return _LargeReadStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _LargeReadStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max(max_bytes, READ_BYTES), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _LargeReadStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


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
    check_free_space(job.part.parent, job.length - have, reserve_bytes)
    digests = _digests(job)
    _hash_prefix(job.part, have, digests)
    received = 0
    start = have
    if have < job.length:
        try:
            start, received = _transfer(client, job, have, digests, _Limits(progress, pace, stop))
        except IntegrityError:
            job.part.unlink(missing_ok=True)  # these bytes can never become the signed file
            raise
    _verify(job, digests)
    return Fetched(resumed_from=start, received=received)


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
    if size > job.length:  # cannot be a prefix of the signed file
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
                f"download of {job.url} stopped at byte {done} of {job.length} because edgert is stopping; "
                "the next attempt resumes"
            )
        if self.deadline is not None and self.pace is not None and time.monotonic() > self.deadline:
            elapsed = time.monotonic() - self.started
            raise DownloadTooSlowError(
                f"download of {job.url} too slow: {done - start} bytes in {elapsed:.0f} s, short of the "
                f"{job.length - start} needed at update.download_min_bytes_per_s={self.pace.min_bytes_per_s} "
                f"(+{self.pace.slack_s:g} s slack); {done} of {job.length} bytes kept, the next attempt resumes"
            )


def _transfer(
    client: httpx.Client, job: Fetch, have: int, digests: dict[str, _Hash], limits: _Limits
) -> tuple[int, int]:
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    limits.check(job, have, have)
    timeout = client.timeout
    limits.started = time.monotonic()
    if limits.pace is not None:
        budget = limits.pace.budget_s(job.length - have)
        limits.deadline = limits.started + budget
        # A silent server is cut by the deadline too, not only after the per-read timeout.
        read = budget if timeout.read is None else min(timeout.read, budget)
        timeout = httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)
    try:
        with client.stream("GET", job.url, headers=headers, timeout=timeout) as response:
            start = _start_of(response, have, job)
            _check_announced(response, start, job)
            if start == 0 and have:  # a 200 after a Range request: the kept bytes go
                digests.update(_digests(job))
                limits.restart(job.length)
            with job.part.open("r+b" if start else "wb", buffering=0) as fh:
                fh.seek(start)
                fh.truncate()
                received = _copy(response, fh, start, job, digests, limits)
                os.fsync(fh.fileno())
    except httpx.TimeoutException as exc:
        if limits.deadline is not None and time.monotonic() >= limits.deadline:
            limits.check(job, have, max(limits.done, have))  # a silent server past it: "too slow" like a trickle
        raise DownloadError(f"download of {job.url} interrupted ({exc}); the next attempt resumes") from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"download of {job.url} interrupted ({exc}); the next attempt resumes") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # someone else filled the volume after our free-space check
            raise InsufficientStorageError(f"{job.part.parent} is full ({exc.strerror})") from None
        raise
    done = start + received
    if done < job.length:
        raise DownloadError(f"{job.url}: the connection ended at byte {done} of {job.length}; the next attempt resumes")
    return start, received


def _start_of(response: httpx.Response, have: int, job: Fetch) -> int:
    if response.status_code == 200:
        return 0
    if response.status_code == 206 and have:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == have:
            return have
        raise DownloadError(f"{job.url}: bad Content-Range {response.headers.get('Content-Range')!r}")
    if response.status_code == 416:
        # Our .part is no prefix of what the server has: drop it, the next attempt starts over.
        job.part.unlink(missing_ok=True)
    raise DownloadError(f"{job.url}: HTTP {response.status_code}")


def _check_announced(response: httpx.Response, start: int, job: Fetch) -> None:
    """Refuse before reading the body when the server announces a size other than the signed one."""
    total: int | None = None
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match and match.group(3) != "*":
        total = int(match.group(3))
    elif "Content-Length" in response.headers and "Content-Range" not in response.headers:
        total = start + int(response.headers["Content-Length"])
    if total is not None and total != job.length:
        raise IntegrityError(f"{job.url}: the server offers {total} bytes, the signed length is {job.length}")


def _copy(
    response: httpx.Response,
    fh: BinaryIO,
    start: int,
    job: Fetch,
    digests: dict[str, _Hash],
    limits: _Limits,
) -> int:
    done = start
    hasher = _Hasher(digests)
    try:
        # iter_raw: the transport's own buffers as they arrive, no re-chunking copy (we asked for
        # identity encoding; a server that compresses anyway fails the hash check).
        for chunk in response.iter_raw():
            if done + len(chunk) > job.length:
                # Endless data: write nothing past the signed length, and stop reading.
                _write_all(fh, chunk[: job.length - done])
                raise IntegrityError(f"{job.url}: the server sent more than the signed {job.length} bytes")
            _write_all(fh, chunk)
            hasher.update(chunk)
            done += len(chunk)
            if limits.progress is not None:
                limits.progress(done, job.length)
            limits.check(job, start, done)
    finally:
        hasher.close()
    return done - start


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
        raise IntegrityError(f"{job.url}: no sha256 in the signed metadata")
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
    """Length and every supported signed hash, computed while streaming; delete the file when wrong."""
    size = job.part.stat().st_size
    bad = [name for name, digest in digests.items() if digest.hexdigest() != job.hashes[name]]
    if size != job.length or bad:
        job.part.unlink(missing_ok=True)
        what = f"{size} bytes (signed {job.length})" if size != job.length else f"{', '.join(bad)} mismatch"
        raise IntegrityError(f"{job.url}: downloaded file does not match the signed metadata: {what}")


def _mib(n: int) -> int:
    return -(-n // 2**20)
