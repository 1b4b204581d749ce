"""The one owner of loaded models, in the spirit of ollama's ``server/sched.go``.

A :class:`ModelHost` holds the serving runtime and who it is (:class:`ServedModel`), the
candidate a model switch is loading, and retired runtimes with their in-flight request
counts: a retired runtime closes when its last request finishes (or at once when it has
none), never by polling the engine. Transports, the update switch, metrics, the watchdog
and readiness ask it; nobody else keeps a runtime reference.

Threads: requests take and drop their hold on the event loop; the update switch retires
and closes from its worker thread. The bookkeeping is under one lock; closing a runtime
(joining its engine thread) runs outside the lock and off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from edgert.engine.base import MediaItem, SamplingParams
from edgert.errors import EdgertError, HealthCheckError
from edgert.identity import ReleaseIdentity
from edgert.media.parts import MEDIA_MARKER
from edgert.serving.release_counters import ReleaseCounters
from edgert.serving.request import Finished
from edgert.serving.runtime import Runtime
from edgert.serving.scheduler import SchedulerStats, TokenStream

log = logging.getLogger("edgert.serving.host")

#: tokens the readiness probe must generate: enough to run decode steps, not only the prefill
PROBE_TOKENS: Final = 4
#: the probe image's side in pixels (Gemma 4 raises it to its 70-token minimum either way)
PROBE_IMAGE_SIDE: Final = 96
_GREEDY: Final = SamplingParams(temperature=0.0)


async def probe(runtime: Runtime, prompt: str, timeout_s: float) -> Finished:
    """The one readiness probe (daemon start and the update health check): a short greedy generation.

    A model served with a projector that reads images gets a small synthetic image before the
    prompt, so a projector that loads but cannot encode fails the probe (and an update rolls back)
    instead of failing the first photo a user sends. Raises HealthCheckError when it fails, produces
    nothing, or takes longer than ``timeout_s``; returns the finished generation.
    """
    media = [_probe_image()] if "image" in runtime.backend.info.modalities else []
    content = f"{MEDIA_MARKER}\n{prompt}" if media else prompt
    try:
        tokens, spans = runtime.chat_prompt_with_media([{"role": "user", "content": content}], media=media)
    except EdgertError as exc:
        raise HealthCheckError(f"the probe's image could not be prepared: {exc.message}") from None
    request = runtime.request(
        tokens,
        sampling=_GREEDY,
        max_tokens=PROBE_TOKENS,
        ignore_eos=True,  # a model that ends at once still proves nothing about decoding
    )
    stream = runtime.scheduler.submit(replace(request, media=spans))
    try:
        _, result = await asyncio.wait_for(stream.collect(), timeout_s)
    except TimeoutError:
        stream.cancel()
        raise HealthCheckError(f"the probe generation took longer than {timeout_s:g} s") from None
    if result.error is not None or result.completion_tokens == 0:
        raise HealthCheckError(f"the probe generation failed ({result.reason}: {result.error})")
    if media and result.image_tokens == 0:
        raise HealthCheckError("the probe's image was not evaluated")
    return result


def _probe_image() -> MediaItem:
    """A 96x96 RGB gradient: square (a too-thin image aborts libmtmd), a few encoder tokens on any Gemma 4."""
    side = PROBE_IMAGE_SIDE
    data = bytes(channel for y in range(side) for x in range(side) for channel in (x * 2, y * 2, 128))
    return MediaItem("image", data, side, side, hashlib.sha256(data).hexdigest(), "probe")


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The served model's identity: what ``/v1/models``, ``/metrics`` and the MQTT status report."""

    id: str
    #: the registry release's version; None for a model not installed by the update path
    version: str | None
    digest: str | None
    modalities: tuple[str, ...]
    #: the file (or folder) served, e.g. ``<models>/versions/tiny@2.0.0.gguf``
    path: Path
    architecture: str
    quant: str | None
    backend: str

    @property
    def file(self) -> str:
        return self.path.name

    @property
    def release(self) -> str:
        """``<id>@<version>`` of a registry release, else ``<id>``: what per-release counters are keyed by."""
        return f"{self.id}@{self.version}" if self.version is not None else self.id

    def labels(self) -> dict[str, str]:
        """For the ``edgert_model_info`` metric (absent values as empty strings, Prometheus-style)."""
        return {
            "id": self.id,
            "version": self.version or "",
            "digest": self.digest or "",
            "modalities": ",".join(self.modalities),
            "path": str(self.path),
            "architecture": self.architecture,
            "quant": self.quant or "",
            "backend": self.backend,
        }

    @classmethod
    def of(cls, runtime: Runtime, release: ReleaseIdentity | None = None) -> ServedModel:
        return cls(
            id=release.model_id if release is not None else runtime.model_id,
            version=release.version if release is not None else None,
            digest=release.digest if release is not None else None,
            # the backend knows what it loaded: "text", plus "image"/"audio" from its projector
            modalities=runtime.backend.info.modalities,
            path=runtime.path,
            architecture=runtime.architecture,
            quant=runtime.quant,
            backend=runtime.backend_name,
        )


@dataclass(frozen=True, slots=True)
class SwitchStep:
    """A step of a model switch during which no engine serves, for the daemon's watchdog.

    Liveness then comes from the switch: a step bounded by its own timeout counts as alive until
    ``deadline``; a step that waits with a candidate engine loaded counts as alive while that
    engine's thread shows progress.
    """

    what: str
    deadline: float | None = None
    engine: Runtime | None = None

    def stall(self, now: float, interval_s: float) -> str | None:
        """Why this step looks stuck; None while it is alive."""
        if self.engine is not None:
            return engine_stall(self.engine, now, interval_s, f"{self.what}: the candidate engine")
        assert self.deadline is not None
        return None if now < self.deadline else f"{self.what}: overran its time limit by {now - self.deadline:.1f} s"


def engine_stall(runtime: Runtime, now: float, interval_s: float, what: str) -> str | None:
    stalled = now - runtime.scheduler.stats.last_progress
    return None if stalled < interval_s else f"{what} made no progress for {stalled:.1f} s"


class _Held:
    """A loaded runtime and the requests running on it (keyed by identity: Runtime compares by value)."""

    __slots__ = ("closed", "release", "requests", "retired", "runtime")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        #: the release it serves as (set when it starts serving): its requests count for that release
        self.release = runtime.model_id
        self.requests = 0
        self.retired = False
        #: set once the runtime is closed (a drain waits on it, bounded by its own timeout)
        self.closed = threading.Event()


class ModelHost:
    """Serving runtime + identity, candidate, retired runtimes with in-flight counts; readiness."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, _Held] = {}
        self.serving: Runtime | None = None
        self.served: ServedModel | None = None
        self.candidate: Runtime | None = None
        self.candidate_release: ReleaseIdentity | None = None
        #: the serving model answered its probe and no switch has drained it
        self.ready = False
        #: while a model switch has drained and unloaded the serving model: what it does, and how long it may take
        self.switch_step: SwitchStep | None = None
        self._listeners: list[Callable[[ServedModel], None]] = []
        #: finished requests per served release (event loop only; see :mod:`.release_counters`)
        self.releases = ReleaseCounters()

    @classmethod
    def serving_runtime(cls, runtime: Runtime, release: ReleaseIdentity | None = None) -> ModelHost:
        """A host already serving ``runtime`` (not ready until its probe passed)."""
        host = cls()
        host.serve(runtime, release)
        return host

    def on_serve(self, listener: Callable[[ServedModel], None]) -> None:
        """Call ``listener`` with each model that starts serving (e.g. MQTT republishes its retained status)."""
        self._listeners.append(listener)

    # ---------------------------------------------------------------- residency
    def serve(self, runtime: Runtime, release: ReleaseIdentity | None = None) -> Runtime | None:
        """Make ``runtime`` the serving one; returns the one it replaces, still loaded (retire it)."""
        with self._lock:
            held = self._held.setdefault(id(runtime), _Held(runtime))
            previous, self.serving = self.serving, runtime
            self.served = ServedModel.of(runtime, release)
            held.release = self.served.release
            if self.candidate is runtime:
                self.candidate = self.candidate_release = None
        self.switch_step = None
        served = self.served
        log.info("now serving %s%s", served.id, f" {served.version}" if served.version else "")
        for listener in self._listeners:
            listener(served)
        return previous if previous is not runtime else None

    def withdraw(self) -> Runtime | None:
        """Take the serving runtime out of service (a drain): no request reaches it any more; retire it."""
        with self._lock:
            runtime, self.serving, self.ready = self.serving, None, False
        return runtime

    def add_candidate(self, runtime: Runtime, release: ReleaseIdentity | None) -> None:
        with self._lock:
            self._held.setdefault(id(runtime), _Held(runtime))
            self.candidate, self.candidate_release = runtime, release

    def retire(self, runtime: Runtime) -> threading.Event:
        """Close ``runtime`` when its last request finishes (now, on this thread, if it has none).

        Returns an event set once it is closed, for a drain that must wait for the memory.
        """
        with self._lock:
            held = self._held.get(id(runtime))
            if held is None:  # never held here (or closed already)
                done = threading.Event()
                done.set()
                return done
            if self.candidate is runtime:
                self.candidate = self.candidate_release = None
            held.retired = True
            close_now = held.requests == 0
        if close_now:
            self._close(held)
        return held.closed

    def close_now(self, runtime: Runtime) -> None:
        """Close ``runtime`` whatever still runs on it (a drain past its timeout: those requests are cut)."""
        with self._lock:
            held = self._held.get(id(runtime))
        if held is not None:
            self._close(held)

    def close_all(self) -> None:
        """The daemon (or a CLI command) ends: free every runtime, serving one included."""
        with self._lock:
            everything = list(self._held.values())
            self.serving = self.candidate = None
            self.ready = False
        for held in everything:
            self._close(held)

    def _close(self, held: _Held) -> None:
        with self._lock:
            if self._held.pop(id(held.runtime), None) is None:
                return  # closed by someone else meanwhile
        held.runtime.close()
        held.closed.set()
        log.info("unloaded %s", held.runtime.model_id)

    # ---------------------------------------------------------------- requests
    def hold(self, runtime: Runtime, stream: TokenStream) -> None:
        """Count ``stream`` as running on ``runtime`` until its end reaches the event loop, and its end
        against the release ``runtime`` serves as (a swap meanwhile does not move it to the new release)."""
        with self._lock:
            held = self._held.get(id(runtime))
            if held is None:
                return  # a runtime this host does not own (a test's): nothing to count
            held.requests += 1
        release = held.release

        def finished(result: Finished) -> None:
            self.releases.record(release, result)
            with self._lock:
                held.requests -= 1
                close = held.retired and held.requests == 0
            if close:
                # the last request of a retired model: close it off the event loop (joins its engine thread)
                asyncio.get_running_loop().run_in_executor(None, self._close, held)

        stream.on_finished = finished

    def in_flight(self, runtime: Runtime) -> int:
        with self._lock:
            held = self._held.get(id(runtime))
            return held.requests if held is not None else 0

    # ---------------------------------------------------------------- questions
    def stats(self) -> tuple[SchedulerStats, int]:
        runtime = self.serving
        return (runtime.scheduler.stats, runtime.scheduler.kv_cells) if runtime is not None else (SchedulerStats(), 1)

    def stall(self, now: float, interval_s: float) -> str | None:
        """Why systemd's watchdog should not be pinged now; None while serving (or a model switch) progresses.

        While a switch has unloaded the serving model, its engine thread is gone: liveness then comes
        from the switch's own step (see :class:`SwitchStep`), never from the closed engine.
        """
        step = self.switch_step
        if step is not None:
            return step.stall(now, interval_s)
        runtime = self.serving
        if runtime is None:
            return None  # still loading: the load has its own timeout
        return engine_stall(runtime, now, interval_s, "the engine")

    def step(self, what: str, limit_s: float) -> None:
        """A switch step with no engine serving, bounded by ``limit_s`` (a plain store, read on the loop)."""
        self.switch_step = SwitchStep(what, deadline=time.monotonic() + limit_s)
