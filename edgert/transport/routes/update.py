"""The daemon's update driver over the socket: ``/update/...`` (only when a registry is configured)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from edgert.errors import BadRequestError, ForbiddenError, UpdateError
from edgert.transport.connections import peer_uid
from edgert.transport.shared import ApiState


def router(state: ApiState) -> APIRouter:
    routes = APIRouter()

    @routes.post("/update/check", status_code=202)
    async def update_check() -> dict[str, str]:
        if state.on_update_check is None:
            raise BadRequestError("this daemon has no model registry configured (update.registry_url)")
        state.on_update_check()
        return {"status": "update check scheduled"}

    @routes.get("/update/status")
    async def update_status() -> dict[str, Any]:
        if state.update_status is None:
            raise BadRequestError("this daemon has no model registry configured (update.registry_url)")
        return await asyncio.to_thread(state.update_status)

    # `edgert update check|apply|rollback` while this daemon runs: it stays the only driver of the update path.
    # The reply is the round's outcome; an error also names its failure class ("reason") for the CLI's line.
    async def update_round(action: str, version: str | None = None) -> Any:
        if state.update_run is None:
            raise BadRequestError("this daemon has no model registry configured (update.registry_url)")
        if action != "check" and peer_uid() not in {0, os.getuid()}:
            # what `edgert update apply|rollback` did on the state directory before: the daemon's user or root
            # only, never a kiosk app that may merely use the socket, nor anyone over TCP
            raise ForbiddenError(f"only root or the daemon's user may {action} model updates (edgert update {action})")
        try:
            return await state.update_run(action, version)
        except UpdateError as exc:
            return JSONResponse({"error": {**exc.to_dict(), "reason": exc.reason}}, status_code=exc.http_status)

    @routes.get("/update/offer")
    async def update_offer() -> Any:
        return await update_round("check")

    @routes.post("/update/apply")
    async def update_apply(version: str | None = None) -> Any:
        return await update_round("apply", version)

    @routes.post("/update/rollback")
    async def update_rollback() -> Any:
        return await update_round("rollback")

    return routes
