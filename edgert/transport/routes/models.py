"""The served model as OpenAI lists it: ``/v1/models`` and ``/v1/models/{id}``.

Each card carries ``modalities`` (an edgert extension, from :meth:`InferenceService.models`): what the
served model accepts right now, so a swap to a model with or without a projector shows at once.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from edgert.api.schemas import ModelList
from edgert.transport.shared import ApiState, serving


def router(state: ApiState) -> APIRouter:
    routes = APIRouter()

    @routes.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=serving(state).models())

    @routes.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        svc = serving(state)
        svc.check_model(model_id)
        return svc.models()[0]

    return routes
