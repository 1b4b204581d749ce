"""API requests -> engine requests, for every transport alike.

HTTP and MQTT both hand a validated :mod:`edgert.api.schemas` body to
:class:`InferenceService`; it resolves the model name (404 for anything but the
active model or "default"), merges sampling defaults, builds the JSON grammar,
turns ``timeout``/``priority`` into a deadline and a queue class, tokenizes, and
submits. Transports only translate the resulting token stream to their wire format.

Rendering and tokenizing a prompt costs ~1 s per MiB, so :meth:`InferenceService.generate`
does it on a worker thread (the event loop keeps answering ``/health`` and streaming),
after a cheap length bound has refused prompts that cannot fit the context whatever
their tokens: no token is longer than ``prompt_length_factor`` characters.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from edgert.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, SamplingFields
from edgert.chat.gemma4_output import Gemma4OutputParser
from edgert.engine.base import MediaItem, SamplingParams
from edgert.errors import ModelNotFoundError, OverloadedError, PromptTooLongError
from edgert.media.inputs import MediaLimits, collect_media
from edgert.serving.chat_output import ChatOutput
from edgert.serving.chat_plan import ChatPlan, plan_chat
from edgert.serving.host import ModelHost, ServedModel, SwitchStep
from edgert.serving.runtime import Runtime
from edgert.serving.scheduler import GenerationRequest, Priority, SchedulerStats, TokenStream
from edgert.settings import ServeSettings


@dataclass(frozen=True, slots=True)
class Limits:
    default_timeout_s: float
    max_tokens_cap: int
    #: no token spans more characters than this: a longer prompt than n_ctx x this cannot fit
    prompt_length_factor: int = 64
    #: bytes, pixels, count and seconds of media a request may carry (settings' serve.media_*)
    media: MediaLimits = field(default_factory=lambda: MediaLimits.from_settings(ServeSettings()))


class InferenceService:
    """Requests on whichever model the :class:`~edgert.serving.host.ModelHost` serves; it holds no model itself."""

    def __init__(self, host: ModelHost, limits: Limits) -> None:
        self.host = host
        self.limits = limits
        self.created = int(time.time())

    @property
    def runtime(self) -> Runtime:
        runtime = self.host.serving
        if runtime is None:
            raise OverloadedError("the model is being swapped", retry_after_s=2)
        return runtime

    @property
    def ready(self) -> bool:
        return self.host.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.host.ready = value

    @property
    def switch_step(self) -> SwitchStep | None:
        return self.host.switch_step

    @property
    def served(self) -> ServedModel:
        served = self.host.served
        if served is None:
            raise OverloadedError("the model is still loading", retry_after_s=2)
        return served

    @property
    def model_id(self) -> str:
        return self.served.id

    def models(self) -> list[ModelCard]:
        """The served model's card, with what it accepts now (a swap may add or drop its projector)."""
        served = self.served
        modalities = [kind for kind in served.modalities if kind in ("text", "image", "audio")]
        return [ModelCard(id=served.id, created=self.created, modalities=modalities)]

    def stats(self) -> tuple[SchedulerStats, int]:
        return self.host.stats()

    def stall(self, now: float, interval_s: float) -> str | None:
        return self.host.stall(now, interval_s)

    def check_model(self, name: str | None) -> str:
        if name in (None, "", "default", self.model_id):
            return self.model_id
        raise ModelNotFoundError(
            f"model {name!r} is not served here; this daemon serves {self.model_id!r} (or use 'default')",
            param="model",
        )

    def check_prompt_size(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        """Refuse, without tokenizing, a prompt too long for the context whatever its tokens."""
        if isinstance(body, ChatCompletionRequest):
            field, chars = "messages", sum(len(message.text()) for message in body.messages)
            chars += sum(len(json.dumps(tool)) for tool in body.tool_dicts() or ())  # declarations render too
        else:
            field, chars = "prompt", len(body.prompt)
        n_ctx = self.runtime.scheduler.config.n_ctx
        if chars > n_ctx * self.limits.prompt_length_factor:
            raise PromptTooLongError(
                f"{field}: {chars} characters cannot fit in the context, which holds {n_ctx} tokens of at most "
                f"{self.limits.prompt_length_factor} characters each; shorten it",
                param=field,
            )

    async def generate(self, body: ChatCompletionRequest | CompletionRequest, request_id: str) -> TokenStream:
        """Check, tokenize on a worker thread, submit: the event loop never tokenizes."""
        self.check_model(body.model)
        self.check_prompt_size(body)
        while True:
            runtime = self.runtime
            request, plan = await asyncio.to_thread(prepare_request, runtime, body, self.limits, request_id)
            if not self.ready:
                raise OverloadedError("the model is being swapped", retry_after_s=2)
            # Back on the loop, where a model swap also runs: if one happened meanwhile, these tokens
            # belong to the old model's vocabulary; tokenize again for the new one.
            if runtime is not self.host.serving:
                for span in request.media:  # encoded for the old model's projector
                    runtime.release_media(span)
            else:
                stream = runtime.scheduler.submit(request)
                self.host.hold(runtime, stream)  # a retired model closes when its last request ends
                stream.chat = chat_output(plan)
                return stream

    async def render_chat(self, body: ChatCompletionRequest) -> str:
        """The prompt text a chat request becomes (llama-server's ``/apply-template``): for checking templates."""
        self.check_model(body.model)
        self.check_prompt_size(body)
        runtime = self.runtime

        def render() -> str:
            plan = plan_chat(body, runtime.formatter, runtime.special_tokens, runtime.model_id)
            return runtime.formatter.render(
                body.message_dicts(), tools=plan.tools, enable_thinking=plan.enable_thinking
            )

        return await asyncio.to_thread(render)


def prepare_request(
    runtime: Runtime, body: ChatCompletionRequest | CompletionRequest, limits: Limits, request_id: str = ""
) -> tuple[GenerationRequest, ChatPlan | None]:
    """A validated API body -> the engine request (tokenized; the caller's thread) and, for chat, its plan."""
    if isinstance(body, CompletionRequest):
        prompt = runtime.completion_prompt(body.prompt)
        return _request(runtime, body, prompt, body.token_limit(), limits, request_id), None
    plan = plan_chat(body, runtime.formatter, runtime.special_tokens, runtime.model_id)
    media = [
        MediaItem(item.kind, item.data, item.width, item.height, item.digest, item.where)
        for item in collect_media(body.messages, limits.media)
    ]
    prompt, spans = runtime.chat_prompt_with_media(
        body.message_dicts(),
        tools=plan.tools,
        enable_thinking=plan.enable_thinking,
        media=media,
        max_audio_seconds=limits.media.max_audio_seconds,
    )
    request = replace(_request(runtime, body, prompt, body.token_limit(), limits, request_id), media=spans)
    sampling = replace(
        request.sampling,
        grammar=plan.grammar,
        grammar_lazy=plan.grammar_lazy,
        grammar_trigger_tokens=plan.grammar_trigger_tokens,
        banned_tokens=plan.banned_tokens,
    )
    return replace(request, sampling=sampling, special_pieces=plan.special_pieces), plan


def chat_output(plan: ChatPlan | None) -> ChatOutput | None:
    """What reads a chat reply back out of the text: Gemma 4's parser, or plain text; None for completions."""
    if plan is None:
        return None
    return ChatOutput(Gemma4OutputParser(tools=plan.parse_tools) if plan.parse_gemma4 else None)


def _request(
    runtime: Runtime,
    body: SamplingFields,
    prompt: tuple[int, ...],
    max_tokens: int | None,
    limits: Limits,
    request_id: str,
) -> GenerationRequest:
    defaults = runtime.defaults
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
    limit = min(max_tokens or runtime.default_max_tokens, limits.max_tokens_cap)
    timeout = body.timeout or limits.default_timeout_s
    return runtime.request(
        prompt,
        sampling=sampling,
        max_tokens=limit,
        stop=body.stop_strings(),
        priority=Priority.BATCH if body.priority == "batch" else Priority.INTERACTIVE,
        deadline=time.monotonic() + timeout,
        request_id=request_id,
        ignore_eos=body.ignore_eos,
    )
