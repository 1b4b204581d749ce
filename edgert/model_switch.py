"""A :class:`~edgert.update.switch.ModelSwitch` on the real engine, for processes without a daemon.

``edgert update apply`` (and the integration tests) activate a new model with
this: the candidate is loaded through :func:`edgert.serving.runtime.open_runtime` exactly
as ``edgert serve`` would load it, and must answer one short greedy generation
in time. It lives outside :mod:`edgert.update` so the update path never imports
the engine; the daemon wires its scheduler-backed switch the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

import psutil

from edgert.errors import EdgertError, HealthCheckError
from edgert.evalset.cases import EvalSet
from edgert.evalset.checks import EvalReport
from edgert.identity import ReleaseIdentity
from edgert.memory_model import MIB
from edgert.memory_plan import beside_mib
from edgert.serving.evaluation import run_eval_set
from edgert.serving.host import ModelHost, ServedModel, SwitchStep, probe
from edgert.serving.runtime import Runtime, open_runtime
from edgert.settings import Settings

log = logging.getLogger("edgert.model_switch")


class RuntimeModelSwitch:
    """A switch on a :class:`ModelHost` with no event loop: a CLI (nothing serves) or a test."""

    def __init__(self, settings: Settings, host: ModelHost | None = None) -> None:
        self.settings = settings
        self.host = host if host is not None else ModelHost()
        #: the serving model the last swap replaced, freed by ``release``
        self._retired: Runtime | None = None

    @property
    def serving(self) -> Runtime | None:
        return self.host.serving

    @property
    def candidate(self) -> Runtime | None:
        return self.host.candidate

    def load_beside(self, path: Path, release: ReleaseIdentity | None = None) -> None:
        if self.host.candidate is not None:
            raise HealthCheckError("a candidate model is already loaded")
        try:
            runtime = open_runtime(self.settings, str(path))
        except EdgertError as exc:
            raise HealthCheckError(f"loading {path.name} failed: {exc}") from None
        self.host.add_candidate(runtime, release)

    def probe(self, timeout_s: float) -> None:
        runtime = self.host.candidate
        if runtime is None:
            raise HealthCheckError("no candidate model is loaded")
        try:
            asyncio.run(probe(runtime, self.settings.serve.probe_prompt, timeout_s))
        except HealthCheckError:
            raise
        except EdgertError as exc:
            raise HealthCheckError(f"the probe generation failed: {exc}") from None

    def evaluate(self, eval_set: EvalSet, *, threshold: float, budget_s: float, max_tokens: int) -> EvalReport:
        runtime = self.host.candidate
        if runtime is None:
            raise HealthCheckError("no candidate model is loaded")
        run = run_eval_set(runtime, eval_set, threshold=threshold, budget_s=budget_s, max_tokens_cap=max_tokens)
        return asyncio.run(run)

    def swap(self) -> None:
        candidate = self.host.candidate
        if candidate is None:
            raise HealthCheckError("no candidate model to swap in")
        self._retired = self.host.serve(candidate, self.host.candidate_release)
        self.host.ready = True

    def release(self) -> None:
        doomed: Runtime | None
        if self.host.candidate is not None:
            doomed = self.host.candidate
        else:
            doomed, self._retired = self._retired, None
        if doomed is not None:
            self.host.retire(doomed)  # closes now, or when its last request ends

    def close(self) -> None:
        """Free everything, the serving model included (end of a CLI command)."""
        self._retired = None
        self.host.close_all()


class ServingModelSwitch(RuntimeModelSwitch):
    """Swaps the model the daemon's :class:`ModelHost` serves, under live traffic.

    When memory allows, the candidate loads beside the serving model, which keeps
    answering; ``swap`` makes the host serve it, on the event loop (so a request is
    never tokenized by one model and run by another); in-flight requests finish on
    the old model, which the host closes when its last one ends. When the candidate
    does not fit beside it, the old model is drained first (new requests get 503 +
    Retry-After meanwhile), unloaded, and loaded back if the candidate fails
    (``serve.model_swap = "drain"`` always takes this path).

    While no engine serves, each step tells the host what it does and how long it
    may take (:class:`~edgert.serving.host.SwitchStep`), so the daemon's watchdog
    follows the switch instead of the closed engine: a 60 s load on a memory-tight
    device is alive, a load stuck past ``engine.load_timeout_s`` is not.
    """

    def __init__(
        self, settings: Settings, host: ModelHost, loop: asyncio.AbstractEventLoop, drain_timeout_s: float
    ) -> None:
        super().__init__(settings, host)
        self.loop = loop
        self.drain_timeout_s = drain_timeout_s
        #: the drained-and-freed model (its path and who it was), while a candidate is tried
        self._unloaded: tuple[Path, ReleaseIdentity | None] | None = None

    def load_beside(self, path: Path, release: ReleaseIdentity | None = None) -> None:
        serving = self.host.serving
        drain = self.settings.serve.model_swap == "drain"
        if serving is not None and (drain or not fits_beside(path, self.settings)):
            why = "serve.model_swap = drain" if drain else f"{path.name} does not fit beside {serving.path.name}"
            log.warning("%s: draining and swapping", why)
            served = self.host.served
            # the drain and the unload are bounded: the wait by drain_timeout_s, the engine stop by its join
            self.host.step(f"draining {serving.model_id}", self.drain_timeout_s + _UNLOAD_S)
            self._on_loop(self.host.withdraw)
            self._unloaded = (serving.path, _identity_of(served))
            if not self.host.retire(serving).wait(self.drain_timeout_s):
                log.warning("%s still busy after %.0f s; its requests are cut", serving.model_id, self.drain_timeout_s)
                self.host.close_now(serving)
        if self._unloaded is not None:
            self.host.step(f"loading {path.name}", self.settings.engine.load_timeout_s)
        super().load_beside(path, release)

    def probe(self, timeout_s: float) -> None:
        if self._unloaded is not None:
            self.host.step("probing the candidate", timeout_s + _UNLOAD_S)
        super().probe(timeout_s)
        if self._unloaded is not None and self.host.candidate is not None:
            # until the swap (health-check hooks run meanwhile) the loaded candidate's engine speaks for it
            self.host.switch_step = SwitchStep("waiting to swap", engine=self.host.candidate)

    def evaluate(self, eval_set: EvalSet, *, threshold: float, budget_s: float, max_tokens: int) -> EvalReport:
        if self._unloaded is not None:
            # nothing serves meanwhile: the watchdog follows the evaluation, bounded by its own time limit
            self.host.step("evaluating the candidate", budget_s + _UNLOAD_S)
        report = super().evaluate(eval_set, threshold=threshold, budget_s=budget_s, max_tokens=max_tokens)
        if self._unloaded is not None and self.host.candidate is not None:
            self.host.switch_step = SwitchStep("waiting to swap", engine=self.host.candidate)
        return report

    def swap(self) -> None:
        if self.host.candidate is None:
            raise HealthCheckError("no candidate model to swap in")
        self._on_loop(super().swap)
        self._unloaded = None

    def release(self) -> None:
        if self._unloaded is not None:
            path, identity = self._unloaded
            self.host.step("unloading the failed candidate", _UNLOAD_S)
            super().release()  # the failed candidate, if it loaded at all
            self.host.step(f"loading {path.name} back", self.settings.engine.load_timeout_s)
            runtime = open_runtime(self.settings, str(path))
            self._unloaded = None

            def serve_again() -> None:
                self.host.serve(runtime, identity)
                self.host.ready = True

            self._on_loop(serve_again)
            return
        super().release()

    def _on_loop(self, action: Callable[[], object]) -> None:
        """Run ``action`` on the daemon's event loop (we are on the updater's worker thread)."""

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)


def _identity_of(served: ServedModel | None) -> ReleaseIdentity | None:
    if served is None or served.version is None:
        return None
    return ReleaseIdentity(served.id, served.version, served.digest)


#: stopping an engine thread (joined for at most 10 s) and freeing its model
_UNLOAD_S: Final = 30.0


#: what the OS and page cache keep beside two models
_HEADROOM = 512 * 2**20


def fits_beside(path: Path, settings: Settings) -> bool:
    """Room for a second model? A GGUF's resident memory comes from the memory model (weights, per-layer table
    lazy or not, repack duplicate, KV cache, compute buffers, projector; issue 17); a model folder (ONNX) or an
    unreadable header falls back on ~1.35x its files (MEASUREMENTS.md). Plus headroom for the OS."""
    need_mib = beside_mib(settings, path)
    if need_mib is not None:
        need = need_mib * MIB
    else:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        need = int(size * 1.35)
    return psutil.virtual_memory().available > need + _HEADROOM
