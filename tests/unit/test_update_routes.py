"""The socket routes `edgert update …` uses while a daemon runs (issue 14): who may ask, and the error shape.

An apply or a rollback changes the model every client gets: only root or the daemon's own user may ask
(what writing the state directory needed before), never a kiosk app that may merely use the socket.
The real SO_PEERCRED path is exercised by tests/integration/test_update_one_driver.py (run as root).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest

from edgert.errors import HookVetoError
from edgert.serving.metrics import Metrics
from edgert.serving.scheduler import SchedulerStats
from edgert.transport.http import ApiState, create_app
from edgert.transport.routes import update as update_routes


def ask(
    monkeypatch: pytest.MonkeyPatch, uid: int | None, method: str, path: str, run: Any
) -> tuple[httpx.Response, list[tuple[str, str | None]]]:
    asked: list[tuple[str, str | None]] = []

    async def update_run(action: str, version: str | None) -> dict[str, Any]:
        asked.append((action, version))
        return dict(await run(action, version))

    monkeypatch.setattr(update_routes, "peer_uid", lambda: uid)
    state = ApiState(metrics=Metrics(lambda: (SchedulerStats(), 1)), max_body_bytes=1_048_576, update_run=update_run)

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://edgert") as client:
            return await client.request(method, path)

    return asyncio.run(scenario()), asked


async def committed(action: str, version: str | None) -> dict[str, Any]:
    return {"outcome": "committed", "release": f"m@{version}", "detail": action}


@pytest.mark.parametrize("path", ["/update/apply?version=2.0.0", "/update/rollback"])
@pytest.mark.parametrize("uid", [12345, None])
def test_apply_and_rollback_are_refused_to_other_users(
    monkeypatch: pytest.MonkeyPatch, path: str, uid: int | None
) -> None:
    response, asked = ask(monkeypatch, uid, "POST", path, committed)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"
    assert asked == []  # no round ran


@pytest.mark.parametrize("uid", [0, os.getuid()])
def test_root_and_the_daemons_user_may_apply_a_pinned_version(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    response, asked = ask(monkeypatch, uid, "POST", "/update/apply?version=2.0.0", committed)
    assert response.status_code == 200, response.text
    assert response.json()["release"] == "m@2.0.0"
    assert asked == [("apply", "2.0.0")]


def test_anyone_on_the_socket_may_ask_what_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    response, asked = ask(monkeypatch, 12345, "GET", "/update/offer", committed)
    assert response.status_code == 200, response.text
    assert asked == [("check", None)]


def test_a_failed_round_names_its_failure_class(monkeypatch: pytest.MonkeyPatch) -> None:
    async def vetoed(action: str, version: str | None) -> dict[str, Any]:
        raise HookVetoError("pre-download hook vetoed m@2")

    response, _ = ask(monkeypatch, 0, "POST", "/update/apply", vetoed)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert (error["code"], error["reason"], error["message"]) == ("hook_veto", "hook", "pre-download hook vetoed m@2")
