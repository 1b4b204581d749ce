"""Settings + a model name -> a loaded, running engine (scheduler, template, metadata).

Shared by ``edgert run``, ``edgert bench`` and the daemon, so all three load a
model the same way: resolve it (catalog id or path), validate the GGUF before
llama.cpp sees it, load with the configured engine options, start the scheduler.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from edgert.catalog import Catalog, ModelSpec, load_catalog
from edgert.drafter_file import check_drafter_files
from edgert.engine.base import (
    BackendCapabilities,
    LoadOptions,
    MediaBackend,
    MediaItem,
    MediaSpan,
    SamplingParams,
    SequenceBackend,
)
from edgert.engine.llama import LlamaBackend, capabilities
from edgert.errors import BadRequestError, ConfigError, ModelMissingError
from edgert.gguf_file import GGUFInfo, validate_gguf
from edgert.hardware import detect
from edgert.media.parts import MEDIA_MARKER
from edgert.memory_fit import choose_model
from edgert.memory_plan import file_estimates, fit_settings
from edgert.serving.chat_plan import GEMMA4_MARKERS
from edgert.serving.prefix_cache import PrefixStore
from edgert.serving.prompt import ChatFormatter, formatter_for
from edgert.serving.scheduler import GenerationRequest, Priority, Scheduler, SchedulerConfig
from edgert.settings import EngineSettings, Settings
from edgert.speed_fit import machine_estimates
from edgert.store import available_ids, projector_ids, resolve_model, resolve_projector, with_release_drafter

log = logging.getLogger("edgert.serving.runtime")


def default_threads() -> int:
    """Physical cores: llama.cpp decode does not gain from SMT siblings."""
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def load_options(engine: EngineSettings) -> LoadOptions:
    threads = engine.n_threads or default_threads()
    return LoadOptions(
        n_ctx=engine.n_ctx,
        n_seq_max=engine.n_parallel + engine.prefix_cache_entries,
        n_batch=engine.n_batch,
        n_ubatch=engine.n_ubatch,
        n_threads=threads,
        n_threads_batch=engine.n_threads_batch or threads,
        n_gpu_layers=engine.n_gpu_layers,
        flash_attn=engine.flash_attn,
        swa_full=engine.swa_full,
        kv_cache_type=engine.kv_cache_type,
        use_mmap=engine.use_mmap,
        lazy_embeddings=engine.lazy_embeddings,
        weight_repack=engine.weight_repack,
        kv_unified=engine.kv_unified,
        drafter=engine.drafter if engine.speculative != "off" else None,
    )


def cache_key(path: Path, info: GGUFInfo, options: LoadOptions) -> str:
    """Identity of a model file *and* the KV layout it is run with, for keying saved KV state.

    Cheap on multi-GB files (path, size, mtime, header facts: a replaced file gets a new
    key); integrity is sha256 verification's job, not this. The KV element type and SWA
    layout are part of it because saved state is only valid for the same layout.
    """
    stat = path.stat()
    ident = "|".join(
        str(part)
        for part in (
            path.resolve(),
            stat.st_size,
            stat.st_mtime_ns,
            info.architecture,
            info.n_tensors,
            options.kv_cache_type,
            options.swa_full,
            options.flash_attn,
            options.kv_unified,
            options.mmproj,  # cached media KV is only valid for the projector that computed it
        )
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


@dataclass
class Runtime:
    """One loaded model and the engine that serves it."""

    model_id: str
    spec: ModelSpec | None
    path: Path
    architecture: str
    #: quantization (GGUF general.file_type, e.g. Q4_K_M); None when the format has none
    quant: str | None
    #: the inference library serving it, e.g. "llama.cpp 0.3.36 (cpu)"
    backend_name: str
    backend: LlamaBackend | SequenceBackend
    scheduler: Scheduler
    formatter: ChatFormatter
    defaults: SamplingParams
    default_max_tokens: int
    load_seconds: float

    #: the model's Gemma 4 control tokens by text (empty for other models): the chat plan's markers
    special_tokens: dict[str, int] = field(default_factory=dict)

    def chat_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> tuple[int, ...]:
        return self.chat_prompt_with_media(messages, tools=tools, enable_thinking=enable_thinking)[0]

    def chat_prompt_with_media(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        enable_thinking: bool = False,
        media: Sequence[MediaItem] = (),
        max_audio_seconds: float = 30.0,
    ) -> tuple[tuple[int, ...], tuple[MediaSpan, ...]]:
        """The prompt's tokens (media positions hold placeholders) and its media, ready for the engine."""
        text = self.formatter.render(messages, tools=tools, enable_thinking=enable_thinking)
        # The template writes BOS itself when the model wants one; never add a second.
        add_bos = self.backend.info.add_bos and not text.startswith(self.backend.info.bos_token)
        if not media:
            return tuple(self.backend.tokenize(text, add_special=add_bos, parse_special=True)), ()
        backend = self.backend
        if not isinstance(backend, MediaBackend) or len(backend.info.modalities) == 1:
            raise BadRequestError(
                f"{media[0].where}: model {self.model_id!r} is served text-only (no multimodal projector is "
                "loaded; see engine.mmproj / edgert serve --mmproj)",
                param=media[0].where,
            )
        tokens, spans = backend.tokenize_media(
            text, list(media), add_special=add_bos, max_audio_seconds=max_audio_seconds
        )
        return tuple(tokens), tuple(spans)

    def system_prefix(self, system_prompt: str) -> tuple[int, ...]:
        """Tokens of a conversation up to where the first user message's text begins."""
        sentinel = "\u2063edgert-user\u2063"
        text = self.formatter.render(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": sentinel}]
        )
        head = text[: text.index(sentinel)]
        add_bos = self.backend.info.add_bos and not head.startswith(self.backend.info.bos_token)
        return tuple(self.backend.tokenize(head, add_special=add_bos, parse_special=True))

    async def warm_prefixes(self, system_prompts: Sequence[str]) -> int:
        """Prefill each system prompt into the prefix cache; returns how many are cached."""
        for system_prompt in system_prompts:
            prefix = self.system_prefix(system_prompt)
            request = GenerationRequest(prompt=prefix, sampling=self.defaults, max_tokens=1, prefill_only=True)
            await self.scheduler.submit(request).collect()
        return self.scheduler.stats.prefix_entries

    def release_media(self, span: MediaSpan) -> None:
        """Let go of a prepared medium that will not run (the request was prepared for a model being swapped)."""
        if isinstance(self.backend, MediaBackend):
            self.backend.release_media(span)

    def completion_prompt(self, prompt: str) -> tuple[int, ...]:
        return tuple(self.backend.tokenize(prompt, add_special=True, parse_special=True))

    def request(
        self,
        prompt: tuple[int, ...],
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int | None = None,
        stop: tuple[str, ...] = (),
        priority: Priority = Priority.INTERACTIVE,
        deadline: float | None = None,
        request_id: str = "",
        ignore_eos: bool = False,
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=prompt,
            sampling=sampling or self.defaults,
            max_tokens=max_tokens or self.default_max_tokens,
            stop=stop,
            priority=priority,
            deadline=deadline,
            request_id=request_id,
            ignore_eos=ignore_eos,
        )

    def close(self) -> None:
        self.scheduler.stop()
        self.backend.close()


def sampling_defaults(settings: Settings) -> SamplingParams:
    s = settings.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        repeat_penalty=s.repeat_penalty,
    )


def resolve(settings: Settings, catalog: Catalog, name: str) -> tuple[ModelSpec | None, Path]:
    """A catalog id, a .gguf path, or "auto": the largest available catalog model that fits here."""
    if name == "auto":
        hardware = detect(capabilities())
        installed = available_ids(settings.models_dir, catalog)
        choice = choose_model(
            catalog,
            hardware,
            settings.engine,
            installed=set(installed),
            projectors=projector_ids(settings.models_dir, catalog),  # only installed projectors take memory
            file_mib=file_estimates(settings.models_dir, catalog, installed, settings.engine),
            tok_s=machine_estimates(settings, catalog, installed, hardware),
        )
        if choice.chosen is None:
            raise ModelMissingError(f"model = auto: no installed catalog model fits this machine. {choice.explanation}")
        log.info("model = auto: %s", choice.explanation)
        name = choice.chosen.id
    return resolve_model(settings, catalog, name)


def is_onnx_model(path: Path) -> bool:
    """ONNX Runtime GenAI models are folders (genai_config.json + model.onnx + tokenizer)."""
    return path.is_dir()


def _load_backend(
    path: Path, settings: Settings, projector: Path | None = None
) -> tuple[LlamaBackend | SequenceBackend, LoadOptions, tuple[str, str | None, str], str | None]:
    """The backend, its options, (architecture, quant, backend name) and the prefix-cache key (None: no cache)."""
    if is_onnx_model(path):
        from edgert.engine import onnx  # noqa: PLC0415 - the [onnx] extra is optional

        found = onnx.validate_model_folder(path)
        # onnxruntime-genai generators have no shared KV cache to copy prefixes within
        options = replace(load_options(settings.engine), n_seq_max=settings.engine.n_parallel)
        return (
            onnx.OnnxBackend(path, options),
            options,
            (found.architecture, None, _describe(onnx.capabilities())),
            None,
        )
    gguf = validate_gguf(path)
    options = replace(load_options(settings.engine), mmproj=projector, media_marker=MEDIA_MARKER)
    if options.drafter is not None:
        if not options.drafter.is_file():
            raise ModelMissingError(f"drafter file {options.drafter} does not exist", param="drafter")
        check_drafter_files(path, options.drafter)  # a mismatched pair would abort inside llama.cpp
    key = cache_key(path, gguf, options) if settings.engine.prefix_cache_persist else None
    return LlamaBackend(path, options), options, (gguf.architecture, gguf.file_type, _describe(capabilities())), key


def _describe(caps: BackendCapabilities) -> str:
    return f"{caps.name} {caps.version} ({'gpu offload' if caps.gpu_offload else 'cpu'})"


def open_runtime(settings: Settings, model: str | None = None, *, catalog: Catalog | None = None) -> Runtime:
    catalog = catalog or load_catalog(settings.catalog)
    spec, path = resolve(settings, catalog, model or settings.model)
    projector = resolve_projector(settings, spec, path)
    settings = with_release_drafter(settings, path, spec)  # the release's or catalog's drafter, unless configured
    if settings.engine.speculative == "on" and settings.engine.drafter is None:
        # known only now: the catalog entry or the signed release may have brought one
        raise ConfigError(
            f"speculative = 'on' needs a drafter and {path.name} has none: set engine.drafter, or speculative = 'auto'"
        )
    # memory_budget: settings that fit it (logged), or a MemoryBudgetError with the breakdown
    settings, projector = fit_settings(settings, spec, path, projector)
    started = time.perf_counter()
    backend, options, (architecture, quant, backend_name), prefix_key = _load_backend(path, settings, projector)
    try:
        info = backend.info
        formatter = formatter_for(
            spec.chat_template if spec else "gguf",
            info.chat_template,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
        )
        scheduler = Scheduler(
            backend,
            SchedulerConfig(
                n_slots=settings.engine.n_parallel,
                n_ctx=info.n_ctx_seq,
                kv_cells=info.n_ctx_seq * options.n_seq_max if not options.kv_unified else info.n_ctx,
                private_kv=not options.kv_unified,
                n_batch=options.n_batch,
                prefill_chunk=settings.engine.prefill_chunk,
                max_queue=settings.engine.max_queue,
                retry_after_s=settings.engine.retry_after_s,
                prefix_seqs=tuple(range(settings.engine.n_parallel, options.n_seq_max)),
                prefix_min_tokens=settings.engine.prefix_cache_min_tokens,
                prefix_max_tokens=settings.engine.prefix_cache_max_tokens or info.n_ctx // 2,
                prefix_store=PrefixStore(settings.state_dir / "prefix-cache", prefix_key) if prefix_key else None,
                speculative=settings.engine.speculative,
                draft_max=settings.engine.draft_max,
            ),
        )
    except BaseException:
        backend.close()
        raise
    scheduler.start()
    special = _control_tokens(backend, GEMMA4_MARKERS) if formatter.family == "gemma4" else {}
    return Runtime(
        model_id=spec.id if spec else path.name,
        spec=spec,
        path=path,
        architecture=architecture,
        quant=quant,
        backend_name=backend_name,
        backend=backend,
        scheduler=scheduler,
        formatter=formatter,
        defaults=sampling_defaults(settings),
        default_max_tokens=settings.sampling.max_tokens,
        load_seconds=time.perf_counter() - started,
        special_tokens=special,
    )


def _control_tokens(backend: LlamaBackend | SequenceBackend, markers: Sequence[str]) -> dict[str, int]:
    """Each marker that is one token of the vocabulary, by its text."""
    found = {}
    for marker in markers:
        tokens = backend.tokenize(marker, add_special=False, parse_special=True)
        if len(tokens) == 1:
            found[marker] = tokens[0]
    return found
