"""The one configuration model: TOML file + ``EDGERT_*`` environment variables.

Longer than ~400 lines on purpose: it is the one configuration model, every setting a typed field
with its limit and description beside it, and splitting it would scatter that single list.

This is the only module that reads ``os.environ``. Precedence, highest first:
constructor arguments (CLI flags) > ``EDGERT_*`` env vars > TOML file > defaults.
Nested groups use ``__`` in env names: ``EDGERT_ENGINE__N_CTX=8192``.

The TOML file is the ``--config`` flag, else ``$EDGERT_CONFIG`` when set, else
``/etc/edgert/edgert.toml`` when present (an installed device: the unit and every CLI
command read it wherever they are started), else ``./edgert.toml`` in a development run.
A config file can name hooks that run with the caller's rights, so a working-directory
file is never trusted by default: it is read only when no system config is installed, the
process is not root, and the file is owned by the caller and not writable by group or
others. Otherwise it is ignored with a warning naming why (``--config ./edgert.toml``
uses it on purpose). ``make serve`` in a fresh clone reads no file at all: defaults and
``EDGERT_*`` variables.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ByteSize,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edgert.errors import ConfigError

_log = logging.getLogger(__name__)

#: a serve.media_url_hosts entry: [http(s)://]host-or-[IPv6][:port][/]
_MEDIA_HOST = re.compile(r"(https?://)?([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?")

SYSTEM_CONFIG = Path("/etc/edgert/edgert.toml")
LOCAL_CONFIG = Path("edgert.toml")

#: set by load_settings(config_path=...) (a --config flag) for the duration of one load
_explicit_config: ContextVar[Path | None] = ContextVar("edgert_explicit_config", default=None)


def default_state_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "edgert"


def config_file_path() -> Path | None:
    """The TOML file in force, or None when there is none."""
    flag = _explicit_config.get()
    if flag is not None:
        return flag
    explicit = os.environ.get("EDGERT_CONFIG")
    if explicit:
        return Path(explicit)
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    if LOCAL_CONFIG.is_file() and local_config_refusal(LOCAL_CONFIG) is None:
        return LOCAL_CONFIG
    return None


def local_config_refusal(path: Path, *, euid: int | None = None) -> str | None:
    """Why the working-directory config ``path`` may not be read implicitly; None in a development run.

    A planted ``./edgert.toml`` once made ``sudo edgert update apply`` run its hooks as root, so the file
    must be the caller's own, unwritable by anyone else, and never read by root or on an installed device.
    """
    if SYSTEM_CONFIG.is_file():
        return f"{SYSTEM_CONFIG} is installed and takes precedence"
    uid = os.geteuid() if euid is None else euid
    if uid == 0:
        return "running as root, which never reads a config file from the working directory implicitly"
    info = path.stat()
    if info.st_uid != uid:
        return f"it is owned by uid {info.st_uid}, not by this user (uid {uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {stat.filemode(info.st_mode)})"
    return None


def ignored_local_config() -> str | None:
    """A warning when ``./edgert.toml`` exists but is not read; None when it is read or absent or a file was named."""
    if _explicit_config.get() is not None or os.environ.get("EDGERT_CONFIG") or not LOCAL_CONFIG.is_file():
        return None
    reason = local_config_refusal(LOCAL_CONFIG)
    if reason is None:
        return None
    return f"ignoring ./{LOCAL_CONFIG}: {reason}; pass --config {LOCAL_CONFIG} (or set EDGERT_CONFIG) to use it"


class EngineSettings(BaseModel):
    """How the model is loaded and how the continuous-batching engine runs."""

    n_ctx: int = Field(4096, ge=256, le=262144, description="Total KV-cache context shared by all slots (tokens).")
    n_parallel: int = Field(8, ge=1, le=64, description="Sequence slots: requests decoded together in one batch.")
    n_batch: int = Field(512, ge=16, le=8192, description="Most tokens submitted to llama.cpp in one decode call.")
    n_ubatch: int = Field(512, ge=16, le=8192, description="Physical micro-batch size inside llama.cpp.")
    prefill_chunk: int = Field(
        256,
        ge=16,
        le=8192,
        description="Most prompt tokens one sequence may prefill per step, so running streams keep flowing.",
    )
    n_threads: int | None = Field(None, ge=1, le=1024, description="Decode threads; unset = physical cores.")
    n_threads_batch: int | None = Field(None, ge=1, le=1024, description="Prefill threads; unset = n_threads.")
    n_gpu_layers: int = Field(
        -1, ge=-1, description="Layers offloaded to the GPU (-1 = all, 0 = CPU only). Ignored on CPU builds."
    )
    flash_attn: bool = Field(True, description="Flash attention: smaller KV cache and compute buffer.")
    swa_full: bool = Field(
        False, description="Full-size sliding-window KV cache (llama-cpp-python's default; ~3x more memory)."
    )
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16", description="KV-cache element type; quantized types need flash attention."
    )
    kv_unified: bool = Field(
        True,
        description=(
            "One KV pool for all slots: any request may use the whole n_ctx and a cached prefix's cells"
            " are shared, not copied. false = private cells per sequence, n_ctx / (n_parallel +"
            " prefix_cache_entries) each: faster with many concurrent streams; a cached prefix is copied."
        ),
    )
    prefix_cache_entries: int = Field(
        4, ge=0, le=32, description="Prompt prefixes kept in the KV cache for reuse (0 = no prefix cache)."
    )
    prefix_cache_min_tokens: int = Field(
        32, ge=1, description="Shortest shared prefix worth caching / reusing (tokens)."
    )
    prefix_cache_max_tokens: int | None = Field(
        None, ge=1, description="KV cells the prefix cache may hold in all; unset = half of n_ctx."
    )
    prefix_cache_persist: bool = Field(
        True, description="Save shared prefixes under state_dir/prefix-cache so restarts reuse them."
    )
    warm_prefixes: list[str] = Field(
        default_factory=list,
        description="System prompts to prefill into the prefix cache at start-up, before reporting ready.",
    )
    max_queue: int = Field(
        32,
        ge=0,
        le=10000,
        description="Requests that may wait for a slot; beyond this they are refused (503).",
    )
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After hint sent with an overloaded refusal.")
    use_mmap: bool = Field(True, description="Map the weights instead of reading them into memory.")
    lazy_embeddings: Literal["off", "auto", "on"] = Field(
        "auto",
        description="Gemma 4's per-layer token embedding table (1.8 GiB of an E2B Q4_K_M): 'on' reads its rows"
        " from the file on demand instead of keeping it resident (E2B: peak RSS 4.4 -> 3.0 GiB, decode"
        " 0.93-1.08x); 'off' keeps it resident; 'auto' is llama.cpp's rule, on demand only for a table over"
        " 4 GiB (so resident for E2B and E4B). Works with use_mmap false too (the table is mapped anyway).",
    )
    weight_repack: bool = Field(
        True,
        description="Repack some weights into the CPU's faster layout (faster decode); false drops that"
        " extra copy (E2B Q4_K_M: ~0.87 GiB less RSS, decode 0.85x; the 270M: no measurable loss).",
    )
    load_timeout_s: float = Field(120.0, gt=0, description="Give up loading a model after this long.")
    min_decode_tok_s: float = Field(
        8.0,
        ge=0.0,
        description="model = auto (and doctor) pass over models estimated to decode slower than this many"
        " tokens/s on this machine (from its measured memory bandwidth); if none fits and is fast enough, the"
        " fastest that fits is chosen. 0 = off (pick by memory only).",
    )
    multimodal: bool = Field(
        True,
        description="Load the model's multimodal projector (images/audio) when one is installed or set;"
        " false = serve text only (saves the projector's ~1-1.5 GiB on tight devices).",
    )
    mmproj: Path | None = Field(
        None,
        description="Multimodal projector GGUF to load with the model (as llama-server's --mmproj);"
        " unset = the catalog model's installed projector. Ignored when multimodal is false.",
    )
    drafter: Path | None = Field(
        None,
        description="Gemma 4 multi-token-prediction drafter GGUF (llama.cpp architecture gemma4-assistant, e.g."
        " a conversion of google/gemma-4-E2B-it-assistant) for speculative decoding; unset = the model's own:"
        " its catalog entry's installed drafter or its signed release's, else none.",
    )
    speculative: Literal["off", "auto", "on"] = Field(
        "auto",
        description="Speculative decoding with the drafter: 'auto' drafts per stream only while the measured"
        " cost of drafting and of the wider batch is repaid by that stream's measured acceptance rate (so"
        " with many streams, or a drafter that keeps missing, it drafts nothing); 'on' always drafts"
        " draft_max tokens; 'off' never loads the drafter. Output is unchanged either way.",
    )
    draft_max: int = Field(
        3, ge=1, le=16, description="Most tokens drafted per stream per step (llama.cpp's --spec-draft-n-max)."
    )

    @field_validator("mmproj", "drafter", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _kv_type_needs_flash_attn(self) -> EngineSettings:
        # llama.cpp refuses a quantized V cache without flash attention only when the context is
        # created, with a log line; refused here it names the settings to change.
        if self.kv_cache_type != "f16" and not self.flash_attn:
            raise ValueError(
                f"kv_cache_type = {self.kv_cache_type!r} needs flash_attn = true (llama.cpp quantizes the V cache"
                " only with flash attention); set flash_attn = true or kv_cache_type = 'f16'"
            )
        return self


class SamplingDefaults(BaseModel):
    """Sampling used when a request does not say."""

    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Softmax temperature; 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(64, ge=0, description="Keep only the k most likely tokens (0 = off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")
    repeat_penalty: float = Field(1.0, gt=0.0, le=5.0, description="Repetition penalty (1.0 = off).")
    max_tokens: int = Field(512, ge=1, description="Tokens generated when a request sets no limit.")


class ServeSettings(BaseModel):
    """The daemon's socket, limits and lifecycle."""

    socket: Path = Field(
        Path("run/edgert.sock"),
        description="Unix socket the HTTP API listens on (/run/edgert/edgert.sock under systemd).",
    )
    socket_mode: int = Field(0o660, ge=0, le=0o777, description="Socket file permissions (owner+group only).")
    socket_group: str | None = Field(None, description="Group that may use the socket (kiosk apps join it).")
    tcp_host: str | None = Field(None, description="Also listen on TCP here. Unset = no TCP listener at all.")
    tcp_port: int = Field(8080, ge=1, le=65535, description="TCP port, used only when tcp_host is set.")
    max_body_bytes: int = Field(
        12 * 1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="Largest request body accepted (413 beyond); room for one media_max_bytes medium in base64.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Default per-request deadline; a request may ask for less (timeout field/header)."
    )
    max_tokens_cap: int = Field(4096, ge=1, description="Upper bound on max_tokens a request may ask for.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT: how long in-flight requests may finish before they are cut."
    )
    probe_prompt: str = Field("Hi", description="Prompt of the start-up probe generation that gates /ready.")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="A connection must send a complete request head within this time (counted from when it "
        "opens or its previous response ends, not reset by each byte), else it is closed (slowloris).",
    )
    max_connections: int = Field(
        256,
        ge=4,
        le=4096,
        description="Open HTTP connections (socket and TCP together). At the cap the connection that has waited "
        "longest without a request is closed for the new one; keep it well under the process's file limit.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Once its head has arrived, a request's body must arrive within this time (408 beyond), so "
        "slow bodies cannot hold connections either.",
    )
    max_json_depth: int = Field(
        64, ge=4, le=512, description="Deepest nesting of arrays/objects a JSON request body may have (400 beyond)."
    )
    prompt_length_factor: int = Field(
        64,
        ge=8,
        le=1024,
        description="Cheap bound checked before tokenizing: a prompt longer than the context (tokens) times this "
        "many characters cannot fit and is refused (400) without being tokenized.",
    )
    tcp_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names the TCP listener accepts besides its bind address (and localhost for a "
        "loopback bind, any IP literal for a wildcard bind); others get 400 (DNS-rebinding guard).",
    )
    tcp_auth_token: SecretStr | None = Field(
        None,
        description="When set, every TCP request but /health must send 'Authorization: Bearer <token>' (401 "
        "otherwise). Never logged. The Unix socket is guarded by its file mode instead.",
    )
    model_swap: Literal["auto", "drain"] = Field(
        "auto",
        description="How an update swaps models: auto = load the new one beside the serving one when memory "
        "allows, else drain and unload first; drain = always drain first (predictable peak memory, e.g. VRAM).",
    )
    media_max_bytes: int = Field(
        8 * 1_048_576,
        ge=1024,
        le=256 * 1_048_576,
        description="Largest image or audio file in a request, decoded from base64 or fetched (413 beyond). "
        "Inline media also count against max_body_bytes (and MQTT's max_message_bytes).",
    )
    media_max_pixels: int = Field(
        24_000_000,
        ge=1,
        le=89_000_000,
        description="Most pixels an image may have, read from its header before decoding (400 beyond; a "
        "decompression-bomb guard). Below Pillow's own 89 M pixel guard.",
    )
    media_max_side: int = Field(
        2048,
        ge=64,
        le=8192,
        description="Images are downscaled to at most this many pixels on their longest side before the "
        "projector resizes them to its own budget (Gemma 4: at most 1120 tokens of 48x48 px).",
    )
    media_max_per_request: int = Field(
        8, ge=0, le=64, description="Most images and audio clips in one request (400 beyond; 0 = no media)."
    )
    media_max_audio_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest audio clip (400 beyond). 30 s is Gemma 4's audio window; raised, mtmd splits "
        "longer clips into 30 s windows as llama.cpp does.",
    )
    media_url_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts image_url may fetch from; empty = http(s) URLs are refused (file:// always is). "
        "Entries: 'host' or 'host:port' (https), or 'http://host[:port]' to allow plain http.",
    )
    media_url_timeout_s: float = Field(
        10.0, gt=0, le=300, description="An allowed image URL must be fetched whole within this time."
    )

    @field_validator("media_url_hosts", mode="after")
    @classmethod
    def _host_entries(cls, value: list[str]) -> list[str]:
        for entry in value:  # the full parse is edgert.media.remote's; refuse obvious mistakes at load
            if not _MEDIA_HOST.fullmatch(entry):
                raise ValueError(f"media_url_hosts entry {entry!r}: expected host, host:port or http(s)://host[:port]")
        return value


class UpdateSettings(BaseModel):
    """Signed model delivery: where the TUF registry is, what this device follows, and the limits."""

    registry_url: str | None = Field(
        None,
        description="Base URL of the TUF registry (serves metadata/ and targets/ below it); unset = updates off.",
    )
    targets_url: str | None = Field(
        None, description="Base URL for model files when they live elsewhere (a CDN); unset = <registry_url>/targets/."
    )
    trusted_root: Path | None = Field(
        None,
        description="The fleet's root.json shipped with the device: the trust anchor of every update.",
    )
    channel: str = Field(
        "stable", pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Release channel this device follows."
    )
    device_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Stable device identity for rollout buckets and MQTT topics; unset = /etc/machine-id, "
        "else the host name.",
    )
    check_interval_s: float = Field(3600.0, ge=10, description="Seconds between background update checks.")
    check_jitter_s: float = Field(
        300.0, ge=0, description="Random extra delay (0..jitter s) added to each check so a fleet spreads out."
    )
    retry_initial_s: float = Field(
        60.0,
        ge=1,
        le=86400,
        description="After a failed update round the next one comes this much later, doubling with each failure "
        "in a row up to check_interval_s (a nudge runs one at once).",
    )
    max_target_bytes: int = Field(
        32 * 1024**3, gt=0, description="Refuse any model file larger than this, whatever the metadata says."
    )
    disk_reserve_bytes: int = Field(
        64 * 1024**2, ge=0, description="Free space kept on the models volume beyond a download (logs, state)."
    )
    hooks_dir: Path | None = Field(
        None, description="Directory of firmware hook executables (see firmware_hooks/README.md); unset = none."
    )
    hook_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="A hook running longer is killed (its process group) and counts as failed."
    )
    health_check_timeout_s: float = Field(
        120.0, gt=0, description="The new model must load and answer its probe generation within this time."
    )
    eval_timeout_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="A release's evaluation set must finish on the candidate within this time (all cases); the "
        "cases left when it runs out fail as not run. The candidate runs beside the serving model, sharing its CPU.",
    )
    eval_max_tokens: int = Field(
        256,
        ge=1,
        le=1024,
        description="Most tokens one evaluation case may generate on the device, whatever its max_tokens says.",
    )
    download_timeout_s: float = Field(
        60.0, gt=0, description="Give up on a silent registry connection after this long (resumable)."
    )
    download_min_bytes_per_s: int = Field(
        64 * 1024,
        ge=1,
        le=10 * 1024**3,
        description="Slowest acceptable model download: one must end within download_deadline_slack_s + its "
        "remaining signed bytes / this, else it is cut off as too slow (the .part is kept; the next round resumes).",
    )
    download_deadline_slack_s: float = Field(
        120.0, ge=0, le=86400, description="Seconds added to every download's deadline (connection set-up, stalls)."
    )
    max_activation_attempts: int = Field(
        2,
        ge=1,
        le=10,
        description="Activations of one version interrupted by a crash before it is rolled back and blocklisted.",
    )
    publisher_public_key: Path | None = Field(
        None,
        description="When set, every release must carry a model-signing bundle verifiable with this EC public key "
        "(PEM), else it is refused before staging; needs the [signing] extra. Unset = TUF signatures only.",
    )

    @field_validator("trusted_root", "hooks_dir", "publisher_public_key", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class MqttSettings(BaseModel):
    """Serving over MQTT (topics under edgert/v1/<device-id>/); off unless ``broker`` is set."""

    broker: str | None = Field(None, description="Broker host name or address; unset = no MQTT transport.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is the usual TLS port).")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version; 3.1.1 has no shared subscriptions, replies go to 'reply_to'."
    )
    device_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[^/+#\s]+$",
        description="This device's topic segment and client id; unset = update.device_id, else /etc/machine-id, "
        "else the host name.",
    )
    group: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[^/+#\s]+$",
        description="Fleet group: also take work from edgert/v1/fleet/<group>/req (MQTT 5 shared subscription).",
    )
    tls: bool = Field(False, description="Use TLS; implied by ca_file. Without ca_file the system CAs are trusted.")
    ca_file: Path | None = Field(None, description="PEM CA bundle that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="PEM client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(None, description="Broker password (never logged).")
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keepalive; a dead link is noticed within 1.5x.")
    session_expiry_s: int = Field(
        86400,
        ge=0,
        le=0xFFFFFFFF,
        description="How long the broker keeps this device's session (and queued requests) while it is offline.",
    )
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles per failure (+ jitter).")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay.")
    telemetry_interval_s: float = Field(30.0, ge=0, description="Seconds between telemetry messages (0 = none).")
    max_message_bytes: int = Field(
        262_144,
        ge=4096,
        le=256 * 1_048_576,
        description="Largest MQTT message accepted or published (request bodies, replies); the broker's "
        "own Maximum Packet Size lowers it further.",
    )
    max_queued_messages: int = Field(
        256, ge=1, le=65535, description="Replies handed to paho and not yet acknowledged by the broker."
    )
    reply_buffer_messages: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Replies kept while the broker is unreachable; beyond this the oldest are dropped (counted).",
    )
    dedupe_entries: int = Field(
        256, ge=1, le=100_000, description="Recent request ids remembered, so a redelivered request runs once."
    )
    dedupe_bytes: int = Field(
        16 * 1_048_576, ge=65536, description="Bytes of final replies kept for answering redelivered requests."
    )
    duplicate_interval_s: float = Field(
        10.0,
        ge=0.1,
        le=3600,
        description="A redelivered request id gets its cached final reply at most once per this many seconds "
        "(more copies are dropped and counted), so replays never amplify.",
    )
    reply_buffer_bytes: int = Field(
        16 * 1_048_576,
        ge=65536,
        le=1 << 32,
        description="Bytes of replies kept while the broker is unreachable; resent duplicates go first, then the "
        "oldest replies (counted).",
    )
    reply_topics: list[str] = Field(
        default_factory=lambda: ["edgert/v1/{device}/reply/#", "edgert/v1/fleet/{group}/reply/#"],
        min_length=1,
        max_length=32,
        description="MQTT topic filters a reply topic (Response Topic or 'reply_to') must match; {device} and "
        "{group} are this device's id and group (a filter naming {group} applies only when group is set). "
        "Whatever is listed, replies never go to a $ topic or to an edgert/v1/ topic outside a 'reply' subtree.",
    )
    max_topic_bytes: int = Field(
        256, ge=32, le=65535, description="Longest reply topic accepted (UTF-8 bytes); longer ones are refused."
    )
    max_correlation_bytes: int = Field(
        256,
        ge=16,
        le=65535,
        description="Largest MQTT 5 Correlation Data accepted; a request with more is refused (never echoed).",
    )

    @field_validator("ca_file", "cert_file", "key_file", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("reply_topics", mode="after")
    @classmethod
    def _valid_filters(cls, filters: list[str]) -> list[str]:
        for topic_filter in filters:
            levels = topic_filter.split("/")
            bad_wildcard = any(
                ("#" in level and (level != "#" or index != len(levels) - 1)) or ("+" in level and level != "+")
                for index, level in enumerate(levels)
            )
            # '#' alone would let replies go anywhere a device may publish: exactly the confused deputy.
            if not topic_filter or topic_filter.startswith(("$", "#", "+")) or bad_wildcard or "\0" in topic_filter:
                raise ValueError(f"mqtt.reply_topics: {topic_filter!r} is not a usable topic filter")
        return filters


class Settings(BaseSettings):
    """Everything an edgert process can be told. Every field has a default."""

    model_config = SettingsConfigDict(
        env_prefix="EDGERT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Models, downloads and update state live here (/var/lib/edgert under systemd).",
    )
    catalog: Path | None = Field(None, description="models.toml to use instead of the packaged catalog.")
    model: str = Field(
        "gemma-3-270m:q4_k_m",
        description="Model served by default: a catalog id, a path to a .gguf file, or 'auto' "
        "(the largest installed catalog model that fits this machine).",
    )
    memory_budget: str | None = Field(
        None,
        description="Most RAM the served model may take (e.g. '3GiB'); unset = no budget. The daemon predicts"
        " the model's memory from its file and, to fit, turns on lazy embeddings, then repack off, a q8_0 KV"
        " cache, a smaller n_ctx, text only, in that order, logging each change; if nothing fits it refuses"
        " to start (exit 1) with the breakdown.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_json: bool = Field(False, description="Log JSON lines (for journald) instead of console text.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Engine and model loading.")
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults, description="Default sampling.")
    update: UpdateSettings = Field(default_factory=UpdateSettings, description="Signed model updates.")
    serve: ServeSettings = Field(default_factory=ServeSettings, description="The daemon (edgert serve).")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="Serving over MQTT.")
    notify_socket: str | None = Field(
        None, validation_alias="NOTIFY_SOCKET", description="Set by systemd for Type=notify services."
    )
    watchdog_usec: int | None = Field(
        None, validation_alias="WATCHDOG_USEC", description="Set by systemd when WatchdogSec= is configured."
    )

    @field_validator("memory_budget", mode="after")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None and TypeAdapter(ByteSize).validate_python(value) <= 0:
            raise ValueError("must be more than 0 bytes")
        return value

    @field_validator("state_dir", "catalog", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - no .env files on devices
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = config_file_path()
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


def load_settings(config_path: Path | None = None, **overrides: object) -> Settings:
    """Build the settings, turning validation failures into one clear ConfigError.

    ``config_path`` (a ``--config`` flag) wins over ``EDGERT_CONFIG``; ``overrides``
    (other CLI flags) win over everything; None values are ignored.
    """
    token = _explicit_config.set(config_path)
    try:
        return _load(overrides)
    finally:
        _explicit_config.reset(token)


def _load(overrides: dict[str, object]) -> Settings:
    ignored = ignored_local_config()
    if ignored is not None:
        # Logged, not raised: the system config (or the defaults) still make a working setup.
        _log.warning(ignored)
    toml_path = config_file_path()
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"config file {toml_path} does not exist")
    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc, toml_path)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"config file {toml_path}: {exc}") from None


def _describe(exc: ValidationError, toml_path: Path | None) -> str:
    where = f" (config file {toml_path}, or EDGERT_* environment)" if toml_path else " (EDGERT_* environment)"
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        problems.append(f"{field}: {error['msg']}")
    return "invalid setting" + where + ": " + "; ".join(problems)
