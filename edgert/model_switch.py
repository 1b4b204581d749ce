"""A :class:`~edgert.update.switch.ModelSwitch` on the real engine, for processes without a daemon.

``edgert update apply`` (and the integration tests) activate a new model with
this: the candidate is loaded through :func:`edgert.runtime.open_runtime` exactly
as ``edgert serve`` would load it, and must answer one short greedy generation
in time. It lives outside :mod:`edgert.update` so the update path never imports
the engine; the daemon wires its scheduler-backed switch the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import psutil

from edgert.engine.base import SamplingParams
from edgert.errors import EdgertError, HealthCheckError
from edgert.runtime import Runtime, open_runtime
from edgert.serving.service import InferenceService, SwitchStep
from edgert.settings import Settings

log = logging.getLogger("edgert.model_switch")

PROBE_PROMPT: Final = "Say OK."
PROBE_TOKENS: Final = 8
_GREEDY: Final = SamplingParams(temperature=0.0)


class RuntimeModelSwitch:
    """Holds at most two runtimes: the serving one (may be None in a CLI) and a candidate."""

    def __init__(self, settings: Settings, serving: Runtime | None = None) -> None:
        self.settings = settings
        self.serving = serving
        self.candidate: Runtime | None = None
        self._retired: Runtime | None = None

    def load_beside(self, path: Path) -> None:
        if self.candidate is not None:
            raise HealthCheckError("a candidate model is already loaded")
        try:
            self.candidate = open_runtime(self.settings, str(path))
        except EdgertError as exc:
            raise HealthCheckError(f"loading {path.name} failed: {exc}") from None

    def probe(self, timeout_s: float) -> None:
        runtime = self.candidate
        if runtime is None:
            raise HealthCheckError("no candidate model is loaded")
        prompt = runtime.chat_prompt([{"role": "user", "content": PROBE_PROMPT}])
        request = runtime.request(prompt, sampling=_GREEDY, max_tokens=PROBE_TOKENS, ignore_eos=True)

        async def generate() -> None:
            stream = runtime.scheduler.submit(request)
            try:
                _, result = await asyncio.wait_for(stream.collect(), timeout_s)
            except TimeoutError:
                stream.cancel()
                raise HealthCheckError(f"the probe generation took longer than {timeout_s:g} s") from None
            if result.error is not None or result.completion_tokens == 0:
                raise HealthCheckError(f"the probe generation failed ({result.reason}: {result.error})")

        try:
            asyncio.run(generate())
        except HealthCheckError:
            raise
        except EdgertError as exc:
            raise HealthCheckError(f"the probe generation failed: {exc}") from None

    def swap(self) -> None:
        if self.candidate is None:
            raise HealthCheckError("no candidate model to swap in")
        self._retired, self.serving, self.candidate = self.serving, self.candidate, None

    def release(self) -> None:
        doomed: Runtime | None
        if self.candidate is not None:
            doomed, self.candidate = self.candidate, None
        else:
            doomed, self._retired = self._retired, None
        if doomed is not None:
            doomed.close()

    def close(self) -> None:
        """Free everything, the serving model included (end of a CLI command)."""
        for runtime in (self.candidate, self._retired, self.serving):
            if runtime is not None:
                runtime.close()
        self.candidate = self._retired = self.serving = None


class ServingModelSwitch(RuntimeModelSwitch):
    """Swaps the model under the daemon's live :class:`InferenceService`.

    When memory allows, the candidate loads beside the serving model, which keeps
    answering; ``swap`` repoints the service on the event loop (so a request is
    never tokenized by one model and run by another), in-flight requests finish on
    the old model, and ``release`` frees it once it is idle. When the candidate
    does not fit beside it, the old model is drained first (new requests get 503 +
    Retry-After meanwhile), unloaded, and loaded back if the candidate fails
    (``serve.model_swap = "drain"`` always takes this path).

    While no engine serves, each step tells the service what it does and how long it
    may take (:class:`~edgert.serving.service.SwitchStep`), so the daemon's watchdog
    follows the switch instead of the closed engine: a 60 s load on a memory-tight
    device is alive, a load stuck past ``engine.load_timeout_s`` is not.
    """

    def __init__(
        self, settings: Settings, service: InferenceService, loop: asyncio.AbstractEventLoop, drain_timeout_s: float
    ) -> None:
        super().__init__(settings, serving=service.runtime)
        self.service = service
        self.loop = loop
        self.drain_timeout_s = drain_timeout_s
        self._unloaded: Path | None = None  # the drained-and-freed model, while a candidate is tried

    def load_beside(self, path: Path) -> None:
        serving = self.serving
        drain = self.settings.serve.model_swap == "drain"
        if serving is not None and (drain or not fits_beside(path)):
            why = "serve.model_swap = drain" if drain else f"{path.name} does not fit beside {serving.path.name}"
            log.warning("%s: draining and swapping", why)
            # the drain and the unload are bounded: the wait by drain_timeout_s, the engine stop by its join
            self._step(f"draining {serving.model_id}", self.drain_timeout_s + _UNLOAD_S)
            self._on_loop(self._pause)
            wait_idle(serving, self.drain_timeout_s)
            self._unloaded, self.serving = serving.path, None
            serving.close()
        if self._unloaded is not None:
            self._step(f"loading {path.name}", self.settings.engine.load_timeout_s)
        super().load_beside(path)

    def probe(self, timeout_s: float) -> None:
        if self._unloaded is not None:
            self._step("probing the candidate", timeout_s + _UNLOAD_S)
        super().probe(timeout_s)
        if self._unloaded is not None and self.candidate is not None:
            # until the swap (health-check hooks run meanwhile) the loaded candidate's engine speaks for it
            self.service.switch_step = SwitchStep("waiting to swap", engine=self.candidate)

    def swap(self) -> None:
        super().swap()
        assert self.serving is not None
        self._on_loop(self._point_service_at, self.serving)
        self._unloaded = None

    def release(self) -> None:
        if self._unloaded is not None:
            self._step("unloading the failed candidate", _UNLOAD_S)
            super().release()  # the failed candidate, if it loaded at all
            self._step(f"loading {self._unloaded.name} back", self.settings.engine.load_timeout_s)
            self.serving = open_runtime(self.settings, str(self._unloaded))
            self._unloaded = None
            self._on_loop(self._point_service_at, self.serving)
            return
        retired = self._retired
        if retired is not None:
            wait_idle(retired, self.drain_timeout_s)
        super().release()

    # -------------------------------------------------------------- event loop side
    def _on_loop(self, action: Callable[..., None], *args: object) -> None:
        """Run ``action`` on the daemon's event loop (we are on the updater's worker thread)."""

        async def run() -> None:
            action(*args)

        asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def _pause(self) -> None:
        self.service.ready = False

    def _point_service_at(self, runtime: Runtime) -> None:
        self.service.runtime = runtime
        self.service.switch_step = None
        self.service.ready = True
        log.info("now serving %s", runtime.model_id)

    def _step(self, what: str, limit_s: float) -> None:
        """Tell the watchdog what the switch does now and for how long at most (a plain store, read on the loop)."""
        self.service.switch_step = SwitchStep(what, deadline=time.monotonic() + limit_s)


#: stopping an engine thread (joined for at most 10 s) and freeing its model
_UNLOAD_S: Final = 30.0


def fits_beside(path: Path) -> bool:
    """Room for a second model? Resident memory is ~1.35x the GGUF file (weights + CPU repack + KV + compute;
    see MEASUREMENTS.md), plus headroom for the OS. For a model folder, the size of all its files."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    need = int(size * 1.35) + 512 * 2**20
    return psutil.virtual_memory().available > need


def wait_idle(runtime: Runtime, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not runtime.scheduler.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not runtime.scheduler.idle():
        log.warning("%s still busy after %.0f s; its requests are cut", runtime.model_id, timeout_s)
