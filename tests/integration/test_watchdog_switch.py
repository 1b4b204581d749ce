"""Finding 3 of issue 13: systemd's watchdog must not kill the daemon during a drain-and-swap update.

The drain path unloads the serving model before loading the new one, so its engine thread is gone;
the watchdog used to read progress from that closed engine and stopped pinging until the swap, which
on a real device (a 60 s load, WatchdogSec=30) meant SIGABRT mid-update. Here a fake NOTIFY_SOCKET
(a datagram socket this test reads) stands in for systemd, ``serve.model_swap = drain`` forces the
drain path, and a ``health-check`` hook holds the switch open -- with the old model unloaded and the
candidate loaded -- until the test has seen the pings go on.
"""

from __future__ import annotations

import socket as socketlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.update_support import MODEL_ID, Fleet, device_update, make_variant, write_hook

WATCHDOG_USEC = 3_000_000  # the daemon pings every second and withholds a ping after 3 s without progress
PINGS_DURING_SWITCH = 6


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        yield running


def wait_for(condition: object, what: str, daemon: DaemonProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert daemon.proc.poll() is None, daemon.log()[-4000:]
        assert time.monotonic() < deadline, f"{what} within {timeout}s\n{daemon.log()[-4000:]}"
        time.sleep(0.05)


def current_version(daemon: DaemonProcess) -> str | None:
    with daemon.client() as client:
        current = client.get("/update/status").json().get("current")
    return current["meta"]["version"] if isinstance(current, dict) else None


def served_model(daemon: DaemonProcess) -> str:
    """``<model-id>@<version>`` as served (``/v1/models``' id, ``edgert_model_info``'s version); "" while none is."""
    with daemon.client() as client:
        response = client.get("/v1/models")
        text = client.get("/metrics").text
    if response.status_code != 200:
        return ""
    versions = [
        s.labels["version"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "edgert_model_info"
    ]
    return f"{response.json()['data'][0]['id']}@{versions[0]}"


def test_watchdog_keeps_pinging_while_a_drain_and_swap_holds_the_model_unloaded(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    hooks = tmp_path / "hooks"
    write_hook(
        hooks,
        "health-check",
        f'[ "$EDGERT_MODEL_VERSION" = "2.0.0" ] || exit 0\n'
        f"touch {markers}/switching\n"
        f"while [ ! -e {markers}/go-on ]; do sleep 0.05; done",
    )
    notify_path = tmp_path / "notify.sock"
    notify = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    notify.bind(str(notify_path))
    (tmp_path / "device").mkdir()
    fleet.release("1.0.0")
    update = device_update(fleet, hooks_dir=str(hooks), hook_timeout_s=120)
    daemon = start_daemon(
        tmp_path / "device",
        tiny_gguf,
        env_extra={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
        serve__model_swap="drain",
        **{f"update__{key}": str(value) for key, value in update.items()},
    )
    try:
        wait_for(lambda: current_version(daemon) == "1.0.0", "1.0.0 installed", daemon)
        fleet.release("2.0.0", make_variant(tiny_gguf, tmp_path / "v2.gguf", general_name="tiny v2"))
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        wait_for((markers / "switching").exists, "the 2.0.0 switch reached its health-check hook", daemon)
        with daemon.client() as client:  # the drain path really ran: the old model is unloaded, requests wait
            assert client.get("/ready").status_code == 503

        # Drop what systemd was told before the switch got here; count the pings that come now.
        notify.setblocking(False)
        while True:
            try:
                notify.recv(4096)
            except BlockingIOError:
                break
        notify.settimeout(PINGS_DURING_SWITCH * 2 + 5)
        pings = 0
        try:
            while pings < PINGS_DURING_SWITCH:
                if notify.recv(4096) == b"WATCHDOG=1":
                    pings += 1
        except TimeoutError:
            pass
        assert pings == PINGS_DURING_SWITCH, f"the watchdog went quiet mid-switch\n{daemon.log()[-3000:]}"

        (markers / "go-on").touch()
        wait_for(lambda: current_version(daemon) == "2.0.0", "2.0.0 committed", daemon)
        wait_for(lambda: "2.0.0" in served_model(daemon), "2.0.0 served", daemon)
        assert "withholding the watchdog ping" not in daemon.log()
        assert f"{MODEL_ID}@2.0.0" in daemon.log()
    finally:
        (markers / "go-on").touch()
        assert daemon.stop() == 0, daemon.log()[-4000:]
        notify.close()
