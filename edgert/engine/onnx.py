"""onnxruntime-genai backend: one ``og.Generator`` per request on a shared ``og.Model``.

The only module that imports ``onnxruntime_genai`` (the ``[onnx]`` extra), and only lazily,
so edgert imports without it. Telemetry is switched off (``og.disable_telemetry_events()``)
before anything else touches the library: a device must not phone home.

It implements :class:`edgert.engine.base.SequenceBackend`: the scheduler's engine thread
starts a generator per request (the whole prompt is fed at once), then steps every running
generator one token per scheduler step, round-robin, and releases it when the request ends,
is cancelled or runs out of time. Nothing here is thread-safe; one thread drives it.

Concurrency: one generator per request, not ``og.Engine`` (on a normal GQA export it pads a mixed
batch wrongly; paged attention needs CUDA or WebGPU). ``generate_next_token`` holds the GIL, so only
the engine thread calls it. The measurements: docs/adr/0001-onnx-generator-per-request.md.

Mapping of :class:`SamplingParams`: ``temperature == 0`` is greedy (``do_sample=False``);
otherwise ``temperature``, ``top_p``, ``top_k`` (0 = no top-k), ``random_seed`` (``seed``;
-1 = random) and ``repetition_penalty`` (over the whole sequence: onnxruntime-genai has no
``repeat_last_n``). ``min_p`` has no counterpart and is ignored. JSON mode uses the built-in
llguidance constraint (``set_guidance("json_schema", ...)``; 0.18 knows ``json_schema``,
``regex`` and ``lark_grammar``, no ``json_object``): "object" is the schema
``{"type": "object"}``. Whitespace between JSON tokens is made compact
(``x-guidance.whitespace_flexible = false``) unless the schema says otherwise, because small
models otherwise loop on newlines inside an unfinished object.

``benchmarks/onnx_vs_llama.py`` measures the chosen design against llama.cpp through edgert.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from edgert.engine.base import BackendCapabilities, LoadOptions, ModelInfo, SamplingParams
from edgert.errors import BadRequestError, EngineError, ModelLoadError
from edgert.onnx_folder import KNOWN_PROVIDERS, OnnxModelInfo, defect, one_line, read_json, validate_onnx_folder

_INSTALL_HINT = "install the extra: pip install 'edgert[onnx]'"

_og_module: Any = None
_og_lock = threading.Lock()


def _og() -> Any:
    """Import onnxruntime-genai once, with telemetry off before any other call."""
    global _og_module  # noqa: PLW0603 - the library and its telemetry switch are process-wide
    with _og_lock:
        if _og_module is None:
            try:
                import onnxruntime_genai as og  # noqa: PLC0415 - the [onnx] extra is optional
            except ImportError as exc:
                raise ModelLoadError(f"onnxruntime-genai is not available ({exc}); {_INSTALL_HINT}") from None
            og.disable_telemetry_events()
            _og_module = og
        return _og_module


def capabilities() -> BackendCapabilities:
    og = _og()
    providers = available_providers()
    return BackendCapabilities(
        name="onnxruntime-genai",
        version=str(og.__version__),
        gpu_offload=any(p != "cpu" for p in providers),
        system_info="execution providers: " + ", ".join(providers),
    )


def available_providers() -> tuple[str, ...]:
    """Execution providers this onnxruntime-genai build can use ("cpu" always)."""
    og = _og()
    # onnxruntime-genai asks about each execution provider with og.is_<name>_available()
    found = [name for name in KNOWN_PROVIDERS if getattr(og, f"is_{name}_available", lambda: False)()]
    return ("cpu", *found)


# ------------------------------------------------------------------ validation
def _check_available(folder: Path, providers: tuple[str, ...]) -> None:
    missing = [name for name in providers if name not in available_providers()]
    if missing:
        here = ", ".join(available_providers())
        raise defect(
            folder,
            f"genai_config.json needs execution provider {missing[0]!r}, which this onnxruntime-genai "
            f"build lacks (available here: {here}); install the matching onnxruntime-genai package or "
            "re-export the model for this device",
        )


def validate_model_folder(path: Path) -> OnnxModelInfo:
    """Check an ONNX Runtime GenAI model folder; raise ModelFileError (one line) on the first defect.

    The structural checks are :func:`edgert.onnx_folder.validate_onnx_folder` (shared with the
    registry and the update path); this adds that the named execution providers exist here.
    """
    found = validate_onnx_folder(path)
    _check_available(path, found.providers)
    return found


# ------------------------------------------------------------------ tokenizer files
def _token_text(value: Any) -> str:
    """A special token in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value) if value else ""


def _chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {str(t.get("name")): str(t.get("template")) for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    jinja = folder / "chat_template.jinja"  # transformers 5 writes the template here
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _special_tokens(folder: Path) -> list[str]:
    """The special tokens of tokenizer.json, longest first (for parse_special=False)."""
    data = read_json(folder / "tokenizer.json", folder)
    added = data.get("added_tokens", [])
    specials = {str(t["content"]) for t in added if isinstance(t, dict) and t.get("special") and t.get("content")}
    return sorted(specials, key=len, reverse=True)


# ------------------------------------------------------------------ the backend
class OnnxSequence:
    """One running generation: its generator and its UTF-8-safe detokenizer stream."""

    def __init__(self, generator: Any, stream: Any, prompt_len: int, max_length: int) -> None:
        self.generator: Any = generator
        self.stream: Any = stream
        self.prompt_len = prompt_len
        self.max_length = max_length
        self.generated = 0
        self.last_token = -1

    @property
    def released(self) -> bool:
        return self.generator is None


class OnnxBackend:
    """An ONNX Runtime GenAI model folder behind the :class:`SequenceBackend` protocol."""

    def __init__(self, path: Path, options: LoadOptions) -> None:
        self._found = validate_model_folder(path)
        og = _og()
        self._options = options
        self._model = self._load(path, options)
        try:
            self._tokenizer = og.Tokenizer(self._model)
        except RuntimeError as exc:
            raise ModelLoadError(one_line(f"{path}: onnxruntime-genai could not load the tokenizer: {exc}")) from None
        self._eog = frozenset(self._found.eos_token_ids)
        tokenizer_config = self._tokenizer_config(path)
        self._specials = _special_tokens(path)
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._live: set[OnnxSequence] = set()
        self.info = self._read_info(path, options, tokenizer_config)

    @staticmethod
    def _load(path: Path, options: LoadOptions) -> Any:
        og = _og()
        try:
            config = og.Config(str(path))
            if options.n_threads > 0:
                session = {"intra_op_num_threads": options.n_threads, "inter_op_num_threads": 1}
                config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
            return og.Model(config)
        except RuntimeError as exc:
            raise ModelLoadError(one_line(f"{path}: onnxruntime-genai could not load the model: {exc}")) from None

    @staticmethod
    def _tokenizer_config(path: Path) -> dict[str, Any]:
        file = path / "tokenizer_config.json"
        return read_json(file, path) if file.is_file() else {}

    def _read_info(self, path: Path, options: LoadOptions, tokenizer_config: dict[str, Any]) -> ModelInfo:
        found = self._found
        n_ctx = min(found.context_length, options.n_ctx) if options.n_ctx > 0 else found.context_length
        providers = ", ".join(found.providers) or "cpu"
        return ModelInfo(
            path=path,
            architecture=found.architecture,
            n_ctx=n_ctx,
            n_ctx_seq=n_ctx,
            n_ctx_train=found.context_length,
            n_seq_max=options.n_seq_max,
            n_swa=0,  # no shared KV cache: the prefix cache (the only n_swa reader) is off for this backend
            n_vocab=found.vocab_size,
            n_params=0,  # genai_config.json does not say; size_bytes does
            size_bytes=found.size_bytes,
            description=f"{found.architecture} (onnxruntime-genai, {providers})",
            bos_token=_token_text(tokenizer_config.get("bos_token")) or "<bos>",
            eos_token=_token_text(tokenizer_config.get("eos_token")) or "<eos>",
            add_bos=False,  # the chat template writes BOS; og.Tokenizer.encode adds none
            chat_template=_chat_template(path, tokenizer_config),
            metadata={
                "format": "onnx-genai",
                "execution_providers": providers,
                "sliding_window": str(found.sliding_window),
                "model_file": found.model_file.name,
            },
        )

    # ------------------------------------------------------------ tokenizing
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        if parse_special or self._special_re is None:
            ids = self._encode(text)
        else:  # og always parses special tokens: break each literal so none survives whole
            ids = []
            start = 0
            for match in self._special_re.finditer(text):
                lit = match.group()
                ids += self._encode(text[start : match.start()]) + self._encode(lit[:1]) + self._encode(lit[1:])
                start = match.end()
            ids += self._encode(text[start:])
        if add_special and self._found.bos_token_id >= 0 and ids[:1] != [self._found.bos_token_id]:
            ids.insert(0, self._found.bos_token_id)
        return ids

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)] if text else []

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog

    # ------------------------------------------------------------ generating
    def start(self, prompt: list[int], params: SamplingParams, max_length: int) -> OnnxSequence:
        if len(self._live) >= self.info.n_seq_max:
            raise EngineError(f"all {self.info.n_seq_max} generators are in use")
        if not prompt:
            raise BadRequestError("empty prompt")
        og = _og()
        gen_params = og.GeneratorParams(self._model)
        length = self._max_length(len(prompt), max_length)
        gen_params.set_search_options(**self._search_options(params, length))
        guidance = _guidance(params)
        if guidance is not None:
            gen_params.set_guidance("json_schema", guidance)
        try:
            generator = og.Generator(self._model, gen_params)
        except RuntimeError as exc:
            if guidance is not None:
                raise BadRequestError(
                    one_line(f"response_format: the JSON schema cannot be used: {exc}"), param="response_format"
                ) from None
            raise EngineError(one_line(f"onnxruntime-genai could not create a generator: {exc}")) from None
        try:
            generator.append_tokens(prompt)
        except RuntimeError as exc:
            raise EngineError(one_line(f"prefill failed: {exc}")) from None
        sequence = OnnxSequence(generator, self._tokenizer.create_stream(), len(prompt), length)
        self._live.add(sequence)
        return sequence

    def _max_length(self, prompt_len: int, requested: int) -> int:
        """Sliding-window models on CPU need ``max_length`` >= the window; the scheduler
        enforces the request's own limit, so a larger buffer costs only memory."""
        floor = max(prompt_len + 1, self._found.sliding_window + 1)
        return min(max(requested, floor), self._found.context_length)

    def _search_options(self, params: SamplingParams, max_length: int) -> dict[str, Any]:
        options: dict[str, Any] = {"max_length": max_length, "repetition_penalty": params.repeat_penalty}
        if params.temperature <= 0.0:
            return {**options, "do_sample": False}
        return {
            **options,
            "do_sample": True,
            "temperature": params.temperature,
            "top_p": min(max(params.top_p, 0.0), 1.0),
            "top_k": min(max(params.top_k, 0), self._found.vocab_size),
            "random_seed": params.seed & 0x7FFFFFFF if params.seed is not None else -1,
        }

    def next_token(self, handle: Any) -> tuple[int, bytes]:
        sequence = self._live_sequence(handle)
        generator = sequence.generator
        try:
            if generator.is_done():
                self._continue_past_end(sequence)
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
        except RuntimeError as exc:
            raise EngineError(one_line(f"onnxruntime-genai step failed: {exc}")) from None
        sequence.generated += 1
        sequence.last_token = token
        return token, _piece(sequence.stream, token)

    def _continue_past_end(self, sequence: OnnxSequence) -> None:
        """The scheduler asks for more after an end-of-generation token (``ignore_eos``). The
        generator stopped there without adding the token to its sequence; feeding it back as
        input (what llama.cpp does with it) resumes it, with the same logits as a fresh
        generator given the whole sequence (checked to 3e-6)."""
        generator = sequence.generator
        if not self.is_end_of_generation(sequence.last_token) or generator.token_count() >= sequence.max_length:
            raise EngineError(f"the generator reached its max_length ({sequence.max_length} tokens)")
        generator.append_tokens([sequence.last_token])

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        """What :meth:`next_token` streams for these tokens, via a fresh detokenizer stream."""
        stream = self._tokenizer.create_stream()
        return [_piece(stream, token) for token in tokens]

    def _live_sequence(self, handle: Any) -> OnnxSequence:
        if not isinstance(handle, OnnxSequence) or handle not in self._live:
            raise EngineError("unknown or released generation handle")
        return handle

    def release(self, handle: Any) -> None:
        if isinstance(handle, OnnxSequence):
            self._live.discard(handle)
            handle.generator = None  # drops the KV cache now, not at the next GC
            handle.stream = None

    @property
    def active(self) -> int:
        """Generators currently holding memory."""
        return len(self._live)

    def close(self) -> None:
        for sequence in list(self._live):
            self.release(sequence)
        self._tokenizer = None
        self._model = None


def _piece(stream: Any, token: int) -> bytes:
    """The token's text from its sequence's og.TokenizerStream: whole UTF-8 characters only
    (a character split over byte-fallback tokens comes with its last byte; special tokens
    give nothing)."""
    return str(stream.decode(token)).encode("utf-8")


def _guidance(params: SamplingParams) -> str | None:
    """The llguidance JSON schema for a request's JSON mode, or None."""
    if params.grammar is not None or params.banned_tokens:
        # Tool calls are planned for Gemma 4 GGUF templates only; never drop a constraint silently.
        raise BadRequestError("tools: not supported by the onnxruntime-genai backend", param="tools")
    if params.json_mode is None:
        return None
    if params.json_mode == "object":
        schema: Any = {"type": "object"}
    else:
        if not params.json_schema:
            raise BadRequestError("response_format: json_schema mode needs a schema", param="response_format")
        try:
            schema = json.loads(params.json_schema)
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"response_format: the schema is not JSON: {exc}", param="response_format") from None
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return json.dumps(schema)
