"""API requests -> engine requests, for every transport alike.

HTTP and MQTT both hand a validated :mod:`edgert.api.schemas` body to
:class:`InferenceService`; it resolves the model name (404 for anything but the
active model or "default"), merges sampling defaults, builds the JSON grammar,
turns ``timeout``/``priority`` into a deadline and a queue class, tokenizes, and
submits. Transports only translate the resulting token stream to their wire format.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

from edgert.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, SamplingFields
from edgert.engine.base import SamplingParams
from edgert.errors import ModelNotFoundError
from edgert.runtime import Runtime
from edgert.serving.scheduler import GenerationRequest, Priority, SchedulerStats, TokenStream


@dataclass(frozen=True, slots=True)
class Limits:
    default_timeout_s: float
    max_tokens_cap: int


class InferenceService:
    def __init__(self, runtime: Runtime, limits: Limits) -> None:
        self.runtime = runtime
        self.limits = limits
        self.created = int(time.time())
        self.ready = False

    @property
    def model_id(self) -> str:
        return self.runtime.model_id

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id, created=self.created)]

    def stats(self) -> tuple[SchedulerStats, int]:
        return self.runtime.scheduler.stats, self.runtime.scheduler.kv_cells

    def check_model(self, name: str | None) -> str:
        if name in (None, "", "default", self.model_id):
            return self.model_id
        raise ModelNotFoundError(
            f"model {name!r} is not served here; this daemon serves {self.model_id!r} (or use 'default')",
            param="model",
        )

    def prepare_chat(self, body: ChatCompletionRequest, request_id: str) -> GenerationRequest:
        self.check_model(body.model)
        prompt = self.runtime.chat_prompt(body.message_dicts())
        return self._request(body, prompt, body.token_limit(), request_id)

    def prepare_completion(self, body: CompletionRequest, request_id: str) -> GenerationRequest:
        self.check_model(body.model)
        prompt = self.runtime.completion_prompt(body.prompt)
        return self._request(body, prompt, body.token_limit(), request_id)

    def prepare(self, body: ChatCompletionRequest | CompletionRequest, request_id: str) -> GenerationRequest:
        if isinstance(body, ChatCompletionRequest):
            return self.prepare_chat(body, request_id)
        return self.prepare_completion(body, request_id)

    def submit(self, request: GenerationRequest) -> TokenStream:
        return self.runtime.scheduler.submit(request)

    def _request(
        self, body: SamplingFields, prompt: tuple[int, ...], max_tokens: int | None, request_id: str
    ) -> GenerationRequest:
        defaults = self.runtime.defaults
        fmt = body.response_format
        json_mode: Literal["object", "schema"] | None = None
        json_schema = None
        if fmt is not None and fmt.type == "json_object":
            json_mode = "object"
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            json_mode = "schema" if fmt.json_schema.schema_ else "object"
            json_schema = json.dumps(fmt.json_schema.schema_, sort_keys=True) if fmt.json_schema.schema_ else None
        sampling = SamplingParams(
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            min_p=defaults.min_p if body.min_p is None else body.min_p,
            repeat_penalty=defaults.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
            seed=body.seed,
            json_mode=json_mode,
            json_schema=json_schema,
        )
        limit = min(max_tokens or self.runtime.default_max_tokens, self.limits.max_tokens_cap)
        timeout = body.timeout or self.limits.default_timeout_s
        return self.runtime.request(
            prompt,
            sampling=sampling,
            max_tokens=limit,
            stop=body.stop_strings(),
            priority=Priority.BATCH if body.priority == "batch" else Priority.INTERACTIVE,
            deadline=time.monotonic() + timeout,
            request_id=request_id,
            ignore_eos=body.ignore_eos,
        )
