"""Liveness, readiness and metrics: ``/health``, ``/ready``, ``/metrics``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from edgert.serving.metrics import CONTENT_TYPE
from edgert.transport.shared import ApiState, not_ready, serving


def router(state: ApiState) -> APIRouter:
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.monotonic() - state.started, 3)}

    @routes.get("/ready")
    async def ready() -> JSONResponse:
        status = not_ready(state)
        if status is not None:
            return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": serving(state).model_id})

    @routes.get("/metrics")
    async def metrics_route() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return routes
