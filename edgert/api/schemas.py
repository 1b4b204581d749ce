"""The wire contract: OpenAI-compatible request/response bodies, shared by HTTP and MQTT.

Requests ignore fields edgert does not know (OpenAI clients send many), but a
known field with a value edgert cannot honour (``n`` > 1, ``logprobs``) is a
400 naming the field — never silently ignored. Two edgert extensions ride in the
body: ``priority`` ("interactive" | "batch") and ``timeout`` (seconds).

Chat requests take OpenAI's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and a history with
assistant ``tool_calls`` and ``role: "tool"`` results; thinking is asked for with ``reasoning_effort``
(any value but "none") or edgert's ``think`` (true/false wins over ``reasoning_effort``).

User messages may carry images and audio as OpenAI content parts (``image_url``, ``input_audio``;
:mod:`edgert.media` defines them, decodes them and holds their limits), several per message, in
order, between text parts. A template sees :data:`~edgert.media.parts.MEDIA_MARKER` where each one was.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgert.chat.tool_grammar import check_parameters_schema
from edgert.errors import BadRequestError
from edgert.media.parts import MEDIA_MARKER, ImageUrl, ImageUrlPart, InputAudio, InputAudioPart

__all__ = ["ImageUrl", "ImageUrlPart", "InputAudio", "InputAudioPart"]  # the media parts, re-exported

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


#: one piece of a message's content, told apart by its ``type``
ContentPart = Annotated[TextPart | ImageUrlPart | InputAudioPart, Field(discriminator="type")]


#: OpenAI's rule for function names; Gemma 4 writes the name bare (``call:NAME{``), so it must be plain too
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    #: the arguments as a JSON object in text, as OpenAI sends and returns them
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Role
    #: text, or parts: text, and in user messages images and audio
    content: str | list[ContentPart] | None = None
    name: str | None = None
    #: assistant turns: the calls the model made
    tool_calls: list[ToolCall] | None = None
    #: tool turns: which call this is the result of
    tool_call_id: str | None = Field(None, max_length=200)
    #: assistant turns: earlier thinking (the template drops it, except between a call and its result)
    reasoning_content: str | None = None

    def text(self) -> str:
        """The text parts only: what the prompt-size bound counts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def template_text(self) -> str:
        """The content as the template renders it: :data:`MEDIA_MARKER` in the place of each medium."""
        if self.content is None or isinstance(self.content, str):
            return self.text()
        return "".join(part.text if isinstance(part, TextPart) else MEDIA_MARKER for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """This message as chat templates take it: arguments as objects, "developer" as "system"."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = None if self.content is None and self.role == "assistant" else self.template_text()
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        for key in ("name", "tool_call_id", "reasoning_content"):
            value = getattr(self, key)
            if value is not None:
                message[key] = value
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    description: str | None = Field(None, max_length=8192)
    #: a JSON Schema of type object; omitted = the function takes no arguments
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Model id; omitted or 'default' = the active model")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=5.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    logprobs: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    #: keep generating past end-of-generation tokens (llama-server's option; for benchmarks and tests)
    ignore_eos: bool = False
    priority: Literal["interactive", "batch"] = "interactive"
    timeout: Annotated[float, Field(gt=0.0, le=86400.0)] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        if self.n != 1:
            raise BadRequestError("n: only one choice per request is supported", param="n")
        if self.logprobs:
            raise BadRequestError("logprobs: not supported", param="logprobs")
        stops = self.stop_strings()
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise BadRequestError("stop: at most 4 strings of up to 256 characters", param="stop")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    #: "auto" when tools are given, "none" otherwise (OpenAI's defaults)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    #: edgert's switch for thinking; wins over reasoning_effort when both are given
    think: bool | None = None

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        _check_tools(self)
        _check_history(self.messages)
        _check_media_roles(self.messages)
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.template_dict() for m in self.messages]

    def thinking(self) -> bool:
        if self.think is not None:
            return self.think
        return self.reasoning_effort not in (None, "none")

    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The declared tools as chat templates take them (unset fields left out)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


def _check_tools(body: ChatCompletionRequest) -> None:
    names = [tool.function.name for tool in body.tools or ()]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BadRequestError(f"tools: function {duplicates[0]!r} is declared twice", param="tools")
    for index, tool in enumerate(body.tools or ()):
        schema = tool.function.parameters
        if schema is not None and schema.get("type", "object") != "object":
            raise BadRequestError(
                f"tools.{index}.function.parameters: must be a JSON Schema of type 'object' (the function's "
                f"named arguments), not {schema.get('type')!r}",
                param=f"tools.{index}.function.parameters",
            )
        try:  # what the call grammar cannot honour is refused here, before anything is queued
            check_parameters_schema(tool.function.name, schema or {})
        except BadRequestError as exc:
            raise BadRequestError(exc.message, param=f"tools.{index}.function.parameters") from None
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        declared = ", ".join(repr(name) for name in names) or "none"
        raise BadRequestError(
            f"tool_choice: function {choice.function.name!r} is not among the declared tools ({declared})",
            param="tool_choice",
        )
    if choice is not None and choice != "none" and not names:
        raise BadRequestError("tool_choice: no tools are declared", param="tool_choice")
    if body.tools and body.response_format is not None and body.response_format.type != "text":
        raise BadRequestError(
            "response_format: cannot be combined with tools; declare the output as a tool instead",
            param="response_format",
        )


def _check_history(messages: list[ChatMessage]) -> None:
    """Arguments must be JSON objects; every tool result must answer a call made earlier."""
    calls: set[str] = set()
    for index, message in enumerate(messages):
        for number, call in enumerate(message.tool_calls or ()):
            where = f"messages.{index}.tool_calls.{number}.function.arguments"
            if message.role != "assistant":
                raise BadRequestError(f"messages.{index}: only assistant messages carry tool_calls", param=where)
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError as exc:
                raise BadRequestError(f"{where}: not valid JSON: {exc}", param=where) from None
            if not isinstance(arguments, dict):
                raise BadRequestError(f"{where}: must be a JSON object", param=where)
            calls.add(call.id)
        if message.role == "tool":
            where = f"messages.{index}.tool_call_id"
            if message.tool_call_id is None:
                raise BadRequestError(f"{where}: a tool message must name the call it answers", param=where)
            if message.tool_call_id not in calls:
                raise BadRequestError(
                    f"{where}: {message.tool_call_id!r} matches no tool call of an earlier assistant message",
                    param=where,
                )


def _check_media_roles(messages: list[ChatMessage]) -> None:
    """Images and audio come from the user; a system, assistant or tool turn carrying one is refused."""
    for index, message in enumerate(messages):
        if message.role == "user" or isinstance(message.content, str) or message.content is None:
            continue
        for number, part in enumerate(message.content):
            if not isinstance(part, TextPart):
                where = f"messages.{index}.content.{number}"
                raise BadRequestError(
                    f"{where}: images and audio are accepted in user messages only, not in a {message.role!r} message",
                    param=where,
                )


class CompletionRequest(SamplingFields):
    prompt: str

    def token_limit(self) -> int | None:
        return self.max_tokens


# --------------------------------------------------------------------- responses
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "deadline", "error"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    #: prompt tokens whose KV came from the prefix cache
    cached_tokens: int = 0
    #: prompt tokens that were images (an edgert extension) and audio (as OpenAI counts them)
    image_tokens: int = 0
    audio_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def _absent_when_none(value: object) -> bool:
    return value is None


#: a field left out of replies while unset, as OpenAI leaves out ``tool_calls`` in a plain answer
_OPTIONAL = Field(None, exclude_if=_absent_when_none)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    #: None when the reply is only tool calls
    content: str | None
    reasoning_content: str | None = _OPTIONAL
    tool_calls: list[ToolCall] | None = _OPTIONAL


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a call: ``id``, ``type`` and the name come once, in its first delta."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = _OPTIONAL
    tool_calls: list[ToolCallDelta] | None = _OPTIONAL


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


Modality = Literal["text", "image", "audio"]


def _text_only() -> list[Modality]:
    return ["text"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgert"
    modalities: list[Modality] = Field(
        default_factory=_text_only,
        description="edgert extension: the input the served model accepts now; image/audio need its projector",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
