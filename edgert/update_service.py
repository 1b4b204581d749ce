"""The daemon's side of the update path: the background loop wired to the serving model.

Imported by :mod:`edgert.daemon` only when ``update.registry_url`` is set, so a device
that takes no updates never loads python-tuf, securesystemslib, cryptography or
httpx (about 18 MiB of resident memory on a kiosk).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from edgert.api.mqtt_schemas import DeployState
from edgert.model_switch import ServingModelSwitch
from edgert.serving.service import InferenceService
from edgert.settings import Settings
from edgert.update.loop import run_update_loop
from edgert.update.orchestrator import Updater
from edgert.update.state import Phase


class UpdateService:
    """One device's signed model updates: on start, every interval (+ jitter), and when nudged."""

    def __init__(self, settings: Settings, metrics: CollectorRegistry) -> None:
        self.settings = settings
        self.updater = Updater(settings)
        #: set by `POST /update/check` and the MQTT cmd topic: run an update round now
        self.nudge = asyncio.Event()
        metrics.register(_UpdateCollector(self.updater))

    def status(self) -> dict[str, object]:
        return self.updater.status().model_dump(mode="json")

    def stop(self) -> None:
        """The daemon is stopping: a download in progress ends between two reads (its ``.part`` kept).

        Whatever else a round is doing, its daemon thread does not keep the process alive.
        """
        self.updater.stop.set()

    def initial_model(self) -> str | None:
        """The release the update path committed, if it is on disk (a file or a folder)."""
        current = self.updater.current_path()
        return str(current) if current is not None and current.exists() else None

    def start(
        self, service: InferenceService, publish_deploy: Callable[[DeployState], None] | None, device_id: str
    ) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        updater = self.updater
        updater.switch = ServingModelSwitch(self.settings, service, loop, self.settings.serve.drain_timeout_s)

        def report(outcome: str) -> None:
            if publish_deploy is not None:
                publish_deploy(deploy_state(updater, outcome, device_id=device_id))

        return asyncio.create_task(run_update_loop(updater, nudge=self.nudge, on_round=report))


def deploy_state(updater: Updater, outcome: str, *, device_id: str) -> DeployState:
    state = updater.status()
    return DeployState(
        device_id=device_id,
        phase=state.phase.value,
        current=state.current.key if state.current else None,
        previous=state.previous.key if state.previous else None,
        pending=state.pending.key if state.pending else None,
        blocklist=state.blocklist,
        last_check=state.last_check,
        last_error=state.last_error,
        last_round=outcome,
        ts=time.time(),
    )


class _UpdateCollector(Collector):
    """Deployment state in /metrics, read from the update path's state file at scrape time."""

    def __init__(self, updater: Updater) -> None:
        self._updater = updater

    def collect(self) -> Iterable[GaugeMetricFamily | InfoMetricFamily]:
        state = self._updater.status()
        phase = GaugeMetricFamily("edgert_update_phase", "Current phase of the model update path", labels=["phase"])
        for candidate in Phase:
            phase.add_metric([candidate.value], 1.0 if state.phase is candidate else 0.0)
        yield phase
        releases = InfoMetricFamily("edgert_update_release", "Committed and pending model releases")
        releases.add_metric(
            [],
            {
                "current": state.current.key if state.current else "",
                "previous": state.previous.key if state.previous else "",
                "pending": state.pending.key if state.pending else "",
            },
        )
        yield releases
        yield GaugeMetricFamily(
            "edgert_update_blocklisted", "Releases blocklisted on this device", len(state.blocklist)
        )
