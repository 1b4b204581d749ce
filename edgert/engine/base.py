"""The backend protocol the scheduler drives. No third-party imports here.

A backend owns one loaded model and one inference context with ``n_seq_max``
sequence slots. It is driven from exactly one thread (the scheduler's engine
thread): nothing here is thread-safe, by design.

One scheduler step is: build a list of :class:`BatchToken` (new prompt tokens for
prefilling sequences, the last sampled token for generating ones), call
:meth:`Backend.decode` once, then :meth:`Backend.sample` for each token that asked
for logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    """What the inference library in this process was built with."""

    name: str
    version: str
    gpu_offload: bool
    system_info: str


@dataclass(frozen=True, slots=True)
class LoadOptions:
    n_ctx: int
    n_seq_max: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int = 0
    flash_attn: bool = True
    swa_full: bool = False
    kv_cache_type: str = "f16"
    use_mmap: bool = True
    #: Gemma 4's per-layer token embedding read from the mapped file on demand ("on"), kept resident
    #: ("off"), or llama.cpp's choice ("auto": on demand only for such a table over 4 GiB)
    lazy_embeddings: Literal["off", "auto", "on"] = "auto"
    #: llama.cpp's CPU repack of some weights into a faster layout (an extra copy beside the mapped file)
    weight_repack: bool = True
    #: one KV pool for all sequences (False: n_ctx / n_seq_max private cells each)
    kv_unified: bool = True
    #: the multimodal projector (mmproj GGUF) to load beside the model, or None for text only
    mmproj: Path | None = None
    #: the text that stands for one medium in a rendered prompt (random per process, so users cannot forge it)
    media_marker: str = "<__media__>"
    #: an MTP drafter (gemma4-assistant GGUF) for speculative decoding, or None
    drafter: Path | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: Path
    architecture: str
    n_ctx: int
    #: the most positions one sequence can hold (n_ctx with a unified KV cache)
    n_ctx_seq: int
    n_ctx_train: int
    n_seq_max: int
    #: sliding-window size of SWA layers (0 = no sliding-window attention)
    n_swa: int
    n_vocab: int
    n_params: int
    size_bytes: int
    description: str
    bos_token: str
    eos_token: str
    add_bos: bool
    chat_template: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    #: what the model takes in: "text", plus "image" / "audio" when a projector with that encoder is loaded
    modalities: tuple[str, ...] = ("text",)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 64
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    #: constrain the output to JSON: "object" (any JSON object) or "schema" (``json_schema``)
    json_mode: Literal["object", "schema"] | None = None
    #: the JSON Schema as JSON text (hashable, so backends can cache what they compile from it)
    json_schema: str | None = None
    #: a GBNF grammar (rule ``root``) the output must follow, e.g. Gemma 4 tool calls; not with json_mode
    grammar: str | None = None
    #: the grammar applies only from the first of ``grammar_trigger_tokens`` on (tool_choice "auto")
    grammar_lazy: bool = False
    grammar_trigger_tokens: tuple[int, ...] = ()
    #: tokens that may never be sampled (the tool-call opener under tool_choice "none")
    banned_tokens: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One image or audio clip of a request, decoded as far as the backend needs it."""

    kind: Literal["image", "audio"]
    #: image: packed RGB, width * height * 3 bytes; audio: the encoded file (WAV, MP3) as sent
    data: bytes
    width: int
    height: int
    #: sha256 of the medium: identical media share cached KV
    digest: str
    #: the request part it came from ("messages.1.content.2"), for errors
    where: str


@dataclass(eq=False, slots=True)
class MediaSpan:
    """A medium inside a prompt: ``n_tokens`` positions from ``start``, evaluated by the backend as one piece.

    ``handle`` is the backend's encoded-input object; the scheduler hands it back to
    :meth:`MediaBackend.release_media` once the span is evaluated or the request ends.
    """

    start: int
    n_tokens: int
    kind: str
    digest: str
    handle: object | None
    #: the encoder's output between :meth:`MediaBackend.encode_media` and :meth:`MediaBackend.decode_media`
    encoded: object | None = None


@dataclass(frozen=True, slots=True)
class BatchToken:
    seq: int
    token: int
    pos: int
    logits: bool


class SequenceHandle(Protocol):
    """One running generation of a :class:`SequenceBackend`."""


@runtime_checkable
class SequenceBackend(Protocol):
    """A backend that generates per sequence instead of in a shared batch (onnxruntime-genai).

    The scheduler keeps admission, deadlines, cancellation, stop strings and streaming
    the same for both kinds; with this kind it steps the running sequences round-robin,
    one token each per step, from its single engine thread.
    """

    info: ModelInfo

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...
    def is_end_of_generation(self, token: int) -> bool: ...

    def start(self, prompt: list[int], params: SamplingParams, max_length: int) -> SequenceHandle:
        """Create a generator and feed it the whole prompt. Raises BadRequestError for
        parameters the backend cannot honour (e.g. a JSON schema it cannot compile)."""

    def next_token(self, handle: SequenceHandle) -> tuple[int, bytes]:
        """Generate one token; return it with its UTF-8 bytes (may be a partial character)."""

    def release(self, handle: SequenceHandle) -> None: ...
    def close(self) -> None: ...


class Sampler(Protocol):
    def reset(self) -> None: ...
    def close(self) -> None: ...


class Backend(Protocol):
    info: ModelInfo

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...
    def token_bytes(self, token: int) -> bytes: ...
    def is_end_of_generation(self, token: int) -> bool: ...
    def new_sampler(self, params: SamplingParams) -> Sampler: ...

    def decode(self, batch: list[BatchToken]) -> None:
        """Run one forward pass. Raises EngineError; on failure the batch had no effect."""

    def sample(self, sampler: Sampler, batch_index: int) -> int:
        """Sample (and accept) a token from the logits of ``batch[batch_index]``."""

    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None: ...
    def seq_copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...
    def seq_pos_max(self, seq: int) -> int: ...
    def seq_pos_min(self, seq: int) -> int: ...
    def save_seq_state(self, seq: int, path: Path, tokens: list[int]) -> None: ...
    def load_seq_state(self, seq: int, path: Path, max_tokens: int) -> list[int]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """Draft up to ``n_max`` tokens for sequence ``seq`` after ``last_token``, which the model decodes at ``pos``."""

    seq: int
    last_token: int
    pos: int
    n_max: int


@runtime_checkable
class DraftingBackend(Protocol):
    """A batch backend with a drafter for speculative decoding (llama.cpp + a Gemma 4 MTP assistant).

    The scheduler verifies drafts itself: it puts ``last_token`` and the drafts of a sequence into one
    decode (consecutive positions, logits for each), samples row by row while the samples agree with the
    drafts, removes the rejected positions (:meth:`Backend.seq_remove`) and calls :meth:`keep_draft_state`
    with the row of the last token it kept, before the next decode.
    """

    @property
    def can_draft(self) -> bool:
        """False when no drafter is loaded (then the scheduler never asks for drafts)."""

    def draft(self, requests: list[DraftRequest]) -> list[list[int]]:
        """Greedy draft tokens per request (at most ``n_max``, maybe fewer). Raises EngineError."""

    def keep_draft_state(self, seq: int, batch_index: int) -> None:
        """``seq``'s next draft starts from the model's state at ``batch_index`` of the last decode."""


@runtime_checkable
class MediaBackend(Protocol):
    """A batch backend that also evaluates images and audio into a sequence (llama.cpp + libmtmd)."""

    def tokenize_media(
        self, text: str, media: list[MediaItem], *, add_special: bool, max_audio_seconds: float
    ) -> tuple[list[int], list[MediaSpan]]:
        """Tokenize ``text`` whose media markers stand for ``media``, in order. Each medium's positions get a
        placeholder token derived from its digest (so the prefix cache tells media apart). BadRequestError
        naming the part for a medium the projector cannot take."""

    def encode_media(self, span: MediaSpan) -> None:
        """Run the projector's encoder on the medium (kept in ``span.encoded``). Raises EngineError."""

    def decode_media(self, seq: int, span: MediaSpan, pos: int) -> None:
        """Write the encoded medium into ``seq`` from position ``pos``. Raises EngineError."""

    def release_media(self, span: MediaSpan) -> None: ...
