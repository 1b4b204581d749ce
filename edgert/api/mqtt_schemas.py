"""The MQTT wire contract: topics and every payload, as pydantic models (no paho here).

Topic tree (``<device>`` is ``mqtt.device_id``, ``<group>`` is ``mqtt.group``)::

    edgert/v1/<device>/req            requests in (QoS 1)                       MqttChatRequest
    edgert/v1/<device>/status         retained; last will = offline             DeviceStatus
    edgert/v1/<device>/telemetry      retained; every telemetry_interval_s (QoS 0) Telemetry
    edgert/v1/<device>/deploy         retained; each update phase change        DeployState
    edgert/v1/<device>/cmd            cancel a request, nudge an update check   Command
    edgert/v1/<device>/reply/<client> replies to <client>'s requests            ReplyChunk/Final/Error
    edgert/v1/fleet/<group>/req       shared by the group's devices (MQTT 5)    MqttChatRequest
    edgert/v1/fleet/<group>/reply/<client>  replies to fleet requests           ReplyChunk/Final/Error

Replies go to the request's MQTT 5 Response Topic (with its Correlation Data), or
for MQTT 3.1.1 clients to ``reply_to`` in the payload. That topic must lie in a
reply subtree (``mqtt.reply_topics``; by default the device's own
``edgert/v1/<device>/reply/#`` and its group's): a device publishes with its own
credentials, so a requester must not be able to point it at another device's
``cmd``, at a status topic or at ``$SYS`` (a confused deputy). A streamed reply is ordered
:class:`ReplyChunk` messages then one :class:`ReplyFinal`; a non-streamed reply is
one :class:`ReplyFinal` carrying the whole text; a refused request gets one
:class:`ReplyError`. Every reply carries the request ``id`` and a ``seq`` counting
from 0, so a client can spot gaps and duplicates.

``python -m edgert.api.mqtt_schemas`` prints the JSON Schema of every payload as the
markdown of the README's MQTT section (a test keeps the two in step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgert.api.schemas import ChatCompletionRequest, FinishReason, Modality, ToolCall, ToolCallDelta, Usage

PREFIX = "edgert/v1"
RequestId = Annotated[str, Field(min_length=1, max_length=200, description="Client-chosen request id; dedupe key")]


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names of one device (and its fleet group, when it has one)."""

    device_id: str
    group: str | None = None

    @property
    def req(self) -> str:
        return f"{PREFIX}/{self.device_id}/req"

    @property
    def status(self) -> str:
        return f"{PREFIX}/{self.device_id}/status"

    @property
    def telemetry(self) -> str:
        return f"{PREFIX}/{self.device_id}/telemetry"

    @property
    def cmd(self) -> str:
        return f"{PREFIX}/{self.device_id}/cmd"

    @property
    def deploy(self) -> str:
        return f"{PREFIX}/{self.device_id}/deploy"

    @property
    def fleet_req(self) -> str | None:
        return None if self.group is None else f"{PREFIX}/fleet/{self.group}/req"

    @property
    def fleet_share(self) -> str | None:
        """The shared subscription that spreads fleet requests over the group's devices."""
        return None if self.group is None else f"$share/{self.group}/{PREFIX}/fleet/{self.group}/req"


#: every device's status topic, for ``edgert mqtt status``
ALL_STATUS = f"{PREFIX}/+/status"


def reply_topic_for(request_topic: str, client_id: str) -> str:
    """The reply topic of a request sent to ``request_topic`` (``.../req`` -> ``.../reply/<client_id>``).

    Replies live beside the request topic, in the answering side's own subtree, so a
    broker ACL can let each device write only under its own id and each client read
    only under its own client id (packaging/mosquitto/edgert.acl).
    """
    base, _, last = request_topic.rpartition("/")
    if last != "req" or not base:
        raise ValueError(f"not a request topic: {request_topic!r}")
    return f"{base}/reply/{client_id}"


def client_reply_filters(client_id: str) -> list[str]:
    """What a client subscribes to for the replies of every device and fleet group."""
    return [f"{PREFIX}/+/reply/{client_id}", f"{PREFIX}/fleet/+/reply/{client_id}"]


def in_reply_space(topic: str) -> bool:
    """Whether ``topic`` may carry replies at all: outside ``edgert/v1/`` (then the configured
    filters decide), or inside a ``reply`` subtree there -- never a device's req/cmd/status/
    telemetry/deploy topic, the fleet request topic, or a ``$`` topic."""
    if topic.startswith("$"):
        return False
    levels = topic.split("/")
    if levels[:2] != PREFIX.split("/"):
        return True
    if len(levels) >= 6 and levels[2] == "fleet":
        return levels[4] == "reply"
    return len(levels) >= 5 and levels[2] != "fleet" and levels[3] == "reply"


# --------------------------------------------------------------------- requests
class MqttChatRequest(ChatCompletionRequest):
    """The socket API's chat/completions body plus the MQTT envelope fields."""

    model_config = ConfigDict(extra="ignore", title="MqttChatRequest")

    id: RequestId
    reply_to: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Reply topic for MQTT 3.1.1 clients (MQTT 5 clients set the Response Topic property instead); "
        "it must match mqtt.reply_topics, by default edgert/v1/<device>/reply/<client>",
    )


class Command(BaseModel):
    """Published to ``edgert/v1/<device>/cmd``."""

    model_config = ConfigDict(extra="ignore")

    action: Literal["cancel", "update_check"]
    id: str | None = Field(None, max_length=200, description="The request id to cancel (action 'cancel')")
    reply_to: str | None = Field(
        None,
        max_length=1024,
        description="The reply topic of the request to cancel (action 'cancel'; MQTT 5 clients may set the "
        "Response Topic property instead): a cancel only reaches the requester's own request",
    )


# --------------------------------------------------------------------- replies
class ErrorBody(BaseModel):
    """OpenAI's error object (``EdgertError.to_dict()``), plus retry_after for 'overloaded'."""

    message: str
    type: str
    param: str | None = None
    code: str
    retry_after: float | None = Field(None, description="Seconds to wait before retrying (code 'overloaded')")


class ReplyChunk(BaseModel):
    """One piece of a streamed reply; chunks arrive in ``seq`` order (0, 1, 2, ...).

    A chunk carries answer text (``delta``), or thinking (``reasoning``), or a piece of a tool call
    (``tool_calls``: the first piece of a call has its ``id`` and ``function.name``, the following ones
    ``function.arguments`` pieces that concatenate to the call's JSON arguments).
    """

    type: Literal["chunk"] = "chunk"
    id: str
    seq: int = Field(ge=0)
    delta: str = Field("", description="Answer text ('' in a thinking or tool-call chunk)")
    reasoning: str | None = Field(None, description="Thinking text (requests with think or reasoning_effort)")
    tool_calls: list[ToolCallDelta] | None = None


class Timings(BaseModel):
    ttft_s: float | None = Field(None, description="Seconds from admission to the first token, on the device")
    total_s: float = Field(description="Seconds from admission to the end of generation, on the device")


class ReplyFinal(BaseModel):
    """The last reply message of a request that ran: why it stopped, token usage, device timings."""

    type: Literal["final"] = "final"
    id: str
    seq: int = Field(ge=0)
    model: str
    device_id: str = Field(description="The device that answered (fleet requests may go to any of the group)")
    finish_reason: FinishReason
    usage: Usage
    content: str | None = Field(None, description="The whole reply text (non-streamed requests only)")
    reasoning_content: str | None = Field(None, description="The whole thinking text (non-streamed requests only)")
    tool_calls: list[ToolCall] | None = Field(
        None, description="The calls the model made (non-streamed requests only; finish_reason 'tool_calls')"
    )
    error: ErrorBody | None = Field(None, description="Why generation stopped early (finish_reason 'error')")
    timings: Timings | None = None


class ReplyError(BaseModel):
    """The only reply to a request that was refused (bad payload, unknown model, overloaded...)."""

    type: Literal["error"] = "error"
    id: str | None = Field(description="The request id, when the payload had a readable one")
    seq: int = Field(0, ge=0)
    error: ErrorBody


# --------------------------------------------------------------------- device topics
def _text_only() -> list[Modality]:
    return ["text"]


class ModelRef(BaseModel):
    id: str
    file: str
    quant: str | None = None
    version: str | None = Field(None, description="Installed version when the model came from the registry")
    modalities: list[Modality] = Field(
        default_factory=_text_only,
        description="Input the served model accepts: image/audio when its multimodal projector is loaded",
    )


class DeviceStatus(BaseModel):
    """Retained on ``edgert/v1/<device>/status``; the last will sets ``state`` to offline."""

    state: Literal["online", "offline"]
    device_id: str
    reason: str | None = Field(None, description="Why offline: 'shutdown' or 'connection lost' (last will)")
    group: str | None = None
    model: ModelRef | None = None
    backend: str | None = None
    edgert_version: str | None = None
    protocol: Literal["5", "3.1.1"] | None = None
    uptime_s: float | None = None
    ts: float = Field(description="Unix time the message was made")


#: payload versions of the retained deploy state and of telemetry (2: the fleet fields of issue 18)
DEPLOY_SCHEMA = 2
TELEMETRY_SCHEMA = 2
#: upper bounds (seconds) of the time-to-first-token histogram in :class:`VersionCounters`; the last bucket is +Inf
TTFT_BUCKETS_S: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EvalScore(BaseModel):
    """A release's signed evaluation set, run through the real engine on the device before commit."""

    release: str = Field(description="<model-id>@<version> evaluated")
    score: float = Field(ge=0.0, le=1.0, description="Fraction of the set's cases that passed all their checks")
    threshold: float = Field(ge=0.0, le=1.0, description="The release's minimum score to commit")
    passed: int = Field(ge=0)
    total: int = Field(ge=0)
    ts: float = Field(description="Unix time the evaluation finished")


class DeployState(BaseModel):
    """Retained on ``edgert/v1/<device>/deploy`` at every saved phase change, after every update round and when
    the link comes back: where the signed update path stands."""

    device_id: str
    phase: str = Field(
        description="idle, downloading, staged, activating, health_check, committing, rolling_back; "
        "disabled when the update state is unreadable"
    )
    current: str | None = Field(None, description="<model-id>@<version> committed and served")
    previous: str | None = Field(None, description="The release kept on disk for a manual rollback")
    pending: str | None = Field(None, description="The release being installed when phase is not idle")
    channel: str | None = Field(None, description="The registry channel the device follows (update.channel)")
    blocklist: list[str] = Field(default_factory=list, description="Releases this device will never install again")
    last_check: datetime | None = None
    last_error: str | None = None
    last_round: str | None = Field(None, description="Outcome of the latest round, e.g. 'committed m@2'")
    rollback_reason: str | None = Field(
        None, description="Why the latest install of ``rolled_back`` was undone (health check, evaluation, hook...)"
    )
    rolled_back: str | None = Field(
        None,
        description="<model-id>@<version> whose install this device undid last: rolled back (failed load, health "
        "check or evaluation; a manual rollback) or refused (a hook veto, a bad publisher signature); kept after "
        "later installs and restarts",
    )
    evaluation: EvalScore | None = Field(None, description="The latest release evaluation run on this device")
    phase_since: float | None = Field(None, description="Unix time the device entered ``phase``")
    schema_version: int = Field(DEPLOY_SCHEMA, description="Payload version; readers ignore fields they do not know")
    ts: float = Field(description="Unix time the message was made")


class MemoryReading(BaseModel):
    rss_bytes: int
    available_bytes: int
    total_bytes: int


class LinkCounters(BaseModel):
    """The MQTT link's own health, as seen by the device."""

    connected: bool
    reconnects: int
    buffered: int = Field(description="Replies waiting for the broker")
    dropped: int = Field(
        description="Replies dropped because the offline buffer was full (resent duplicates first, then the oldest)"
    )
    duplicates: int = Field(description="Redelivered requests answered from the dedupe cache")
    bad_payloads: int
    requests: int = Field(description="Requests accepted over MQTT since start")


class VersionCounters(BaseModel):
    """What one served release did on this device since the daemon started (cumulative, never reset while it runs).

    Readers compare two readings of the same ``release`` and ``started`` (a restart starts from zero), so a
    time window costs them two messages per device, not a stream.
    """

    release: str = Field(description="<model-id>@<version> (or <model-id> for a model not from the registry)")
    started: float = Field(description="Unix time the daemon started counting (its start)")
    requests_ok: int = Field(ge=0, description="Requests that finished normally (stop, length, tool_calls)")
    requests_failed: int = Field(ge=0, description="Requests that ended in an error (engine or deadline)")
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    decode_s: float = Field(ge=0.0, description="Seconds spent generating (first token to last), summed")
    ttft_buckets: list[int] = Field(
        description="Requests by time to first token: counts per TTFT_BUCKETS_S upper bound, then +Inf (not cumulative)"
    )


class Telemetry(BaseModel):
    """Published to ``edgert/v1/<device>/telemetry`` every ``mqtt.telemetry_interval_s`` (QoS 0, retained: the
    latest reading of every device is what ``edgert fleet status`` shows)."""

    schema_version: int = Field(TELEMETRY_SCHEMA, description="Payload version; readers ignore fields they do not know")
    ts: float
    device_id: str
    uptime_s: float
    tokens_per_s: float = Field(description="Generated tokens per second over the last interval")
    queue_depth: int
    active: int
    requests_finished: int
    rejected: int
    memory: MemoryReading
    temperature_c: float | None = Field(None, description="Hottest readable sensor; null where none is readable")
    mqtt: LinkCounters
    versions: list[VersionCounters] = Field(
        default_factory=list,
        description="Per served release since start (the 4 most recently served): requests, errors, tokens, TTFT "
        "histogram",
    )


PAYLOADS: tuple[type[BaseModel], ...] = (
    MqttChatRequest,
    ReplyChunk,
    ReplyFinal,
    ReplyError,
    DeviceStatus,
    DeployState,
    Telemetry,
    Command,
)


def json_schemas() -> dict[str, dict[str, object]]:
    """The JSON Schema of every MQTT payload, by model name."""
    return {model.__name__: model.model_json_schema() for model in PAYLOADS}


def schema_markdown() -> str:
    """The README's payload reference: one collapsed JSON Schema per payload."""
    blocks = ["### Payload schemas (generated by `python -m edgert.api.mqtt_schemas`)\n"]
    for name, schema in json_schemas().items():
        description = schema.get("description")
        summary = description.split("\n")[0] if isinstance(description, str) else ""
        blocks.append(
            f"#### `{name}`\n\n{summary}\n\n<details><summary>JSON Schema</summary>\n\n"
            f"```json\n{json.dumps(schema, indent=2)}\n```\n\n</details>\n"
        )
    return "\n".join(blocks)


if __name__ == "__main__":
    print(schema_markdown(), end="")
