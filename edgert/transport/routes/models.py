"""The served model as OpenAI lists it: ``/v1/models`` and ``/v1/models/{id}``.

Each card carries ``modalities`` (an edgert extension): what the served model accepts right now, asked of
the model host at each request, so a swap to a model with or without a projector shows at once.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from edgert.api.schemas import ModelCard, ModelList
from edgert.serving.service import InferenceService
from edgert.transport.shared import ApiState, serving


def router(state: ApiState) -> APIRouter:
    routes = APIRouter()

    @routes.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=_cards(serving(state)))

    @routes.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        svc = serving(state)
        svc.check_model(model_id)
        return _cards(svc)[0]

    return routes


def _cards(svc: InferenceService) -> list[ModelCard]:
    modalities = [kind for kind in svc.served.modalities if kind in ("text", "image", "audio")]
    return [card.model_copy(update={"modalities": modalities}) for card in svc.models()]
