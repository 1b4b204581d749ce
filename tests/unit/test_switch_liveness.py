"""Finding 3 of issue 13, the load itself: while a drain-and-swap loads the candidate, liveness is the switch's.

The candidate's load is held open by wrapping :func:`edgert.serving.runtime.open_runtime` (the one thing a
test cannot make slow on a 1.6 MB model); everything else is the real switch on the real tiny GGUF.
The daemon's watchdog pings exactly when ``InferenceService.stall`` returns None, so that is what is
asked here, at moments well past the closed engine's last sign of life.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgert import model_switch
from edgert.model_switch import ServingModelSwitch
from edgert.serving.host import ModelHost
from edgert.serving.runtime import Runtime, open_runtime
from edgert.serving.service import InferenceService, Limits
from edgert.settings import load_settings

INTERVAL_S = 1.0  # the watchdog's: no engine progress for this long withholds the ping


def test_a_slow_candidate_load_keeps_the_watchdog_fed(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(
        state_dir=tmp_path,
        engine={"n_ctx": 512, "n_parallel": 1, "n_threads": 1, "prefix_cache_entries": 0, "load_timeout_s": 90},
        serve={"model_swap": "drain"},
    )
    serving = open_runtime(settings, str(tiny_gguf))
    service = InferenceService(ModelHost.serving_runtime(serving), Limits(default_timeout_s=30, max_tokens_cap=8))
    service.ready = True
    loading, go_on = threading.Event(), threading.Event()

    def slow_open(*args: Any, **kwargs: Any) -> Runtime:
        loading.set()
        assert go_on.wait(60)
        return open_runtime(*args, **kwargs)

    monkeypatch.setattr(model_switch, "open_runtime", slow_open)

    async def scenario() -> None:
        switch = ServingModelSwitch(settings, service.host, asyncio.get_running_loop(), drain_timeout_s=5)
        load = asyncio.ensure_future(asyncio.to_thread(switch.load_beside, tiny_gguf))
        while not loading.is_set():
            assert not load.done(), load.exception()
            await asyncio.sleep(0.01)
        assert not service.ready  # drained: requests get 503 meanwhile
        # The old engine is closed: 5 s after its last progress it would look wedged, the load does not.
        later = serving.scheduler.stats.last_progress + 5 * INTERVAL_S
        assert service.stall(later, INTERVAL_S) is None
        assert service.switch_step is not None
        assert service.switch_step.what == f"loading {tiny_gguf.name}"
        # ... until the load overruns its own limit: then the watchdog may restart the daemon.
        overrun = service.stall(time.monotonic() + 91, INTERVAL_S)
        assert overrun is not None
        assert "overran its time limit" in overrun

        go_on.set()
        await load
        await asyncio.to_thread(switch.probe, 30)
        assert service.switch_step is not None
        assert service.switch_step.engine is switch.candidate  # hooks run now: the candidate's engine speaks
        assert service.stall(time.monotonic(), INTERVAL_S) is None
        await asyncio.to_thread(switch.swap)
        assert service.switch_step is None
        assert service.ready
        assert service.runtime is switch.serving
        await asyncio.to_thread(switch.release)
        switch.close()

    asyncio.run(scenario())
