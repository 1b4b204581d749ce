"""The llama.cpp backend: one model, one multi-sequence context, its samplers and their JSON grammars.

It owns one model, one context with ``n_seq_max`` sequence slots in a unified KV cache
(so a shared prompt prefix can be copied between sequences without moving data), and
one reusable ``llama_batch``. It converts every llama.cpp failure into an edgert error.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_grammar

from edgert.engine.base import (
    BatchToken,
    DraftRequest,
    LoadOptions,
    MediaItem,
    MediaSpan,
    ModelInfo,
    Sampler,
    SamplingParams,
)
from edgert.engine.llama.drafter import MtpDrafter
from edgert.engine.llama.media import Projector
from edgert.engine.llama.process import ensure_initialised, log_reason
from edgert.errors import BadRequestError, EngineError, ModelLoadError

_KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml_type ids
_LAZY_MODES = {
    "off": llama_cpp.LLAMA_LAZY_MODE_OFF,
    "auto": llama_cpp.LLAMA_LAZY_MODE_AUTO,
    "on": llama_cpp.LLAMA_LAZY_MODE_ON,
}


class LlamaSampler:
    """A llama.cpp sampler chain for one request, an optional grammar beside it, or neither.

    Plain greedy (temperature 0, no grammar, no penalty) needs no chain: the backend
    takes the argmax of the logits itself, which skips llama.cpp building a candidate
    array of the whole vocabulary (262 144 entries for Gemma) for every token.

    The grammar is kept out of the chain and checked after sampling, as llama.cpp's own
    common sampler does: the token picked without it is tested alone, and only when the
    grammar rejects it is the grammar applied to the whole vocabulary and the token
    picked again. Applying a grammar to 262 144 candidates on every step would cost more
    than the decode of a small model.

    Picking again first tries the :data:`_SHORTLIST` most likely tokens: when at least
    ``shortlist_need`` of them are allowed, the chain's pick among them is the pick among
    all allowed tokens (every token outside has a lower logit), so the grammar pass over the
    whole vocabulary is skipped. ``shortlist_need`` is 1 for greedy, the chain's top-k when
    sampling, and 0 (never) when a stage could reorder tokens outside (penalties, no top-k).
    """

    def __init__(self, handle: Any, grammar: Any = None, banned: tuple[int, ...] = (), shortlist_need: int = 0) -> None:
        self.handle = handle
        self.grammar = grammar
        self.banned = list(banned)
        self.shortlist_need = shortlist_need

    @property
    def plain_greedy(self) -> bool:
        return self.handle is None and self.grammar is None

    def reset(self) -> None:
        for stage in (self.handle, self.grammar):
            if stage is not None:
                llama_cpp.llama_sampler_reset(stage)

    def close(self) -> None:
        for stage in (self.handle, self.grammar):
            if stage is not None:
                llama_cpp.llama_sampler_free(stage)
        self.handle = self.grammar = None


def _add_stage(chain: Any, stage: Any) -> None:
    if not stage:  # llama.cpp returns NULL for a grammar it cannot parse
        raise EngineError("llama.cpp rejected a sampler stage (invalid grammar?)")
    llama_cpp.llama_sampler_chain_add(chain, stage)


#: llama_token_data as numpy sees it, so a candidate array is filled from the logits without a Python loop
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
#: how many of the most likely tokens a rejected pick is retried among before the whole vocabulary
_SHORTLIST = 256


class LlamaBackend:
    """One model + one multi-sequence context, driven from a single thread."""

    def __init__(self, path: Path, options: LoadOptions) -> None:
        log = ensure_initialised()
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._piece_cache: dict[int, bytes] = {}
        log.mark()
        self._projector: Projector | None = None
        self._drafter: MtpDrafter | None = None
        try:
            self._model = self._load_model(path, options)
            self._ctx = self._new_context(path, options)
            if options.drafter is not None:
                self._drafter = MtpDrafter(options.drafter, self._ctx, options, _KV_TYPES[options.kv_cache_type])
            if options.mmproj is not None:
                self._projector = Projector(
                    options.mmproj,
                    self._model,
                    n_threads=options.n_threads_batch,
                    use_gpu=options.n_gpu_layers != 0,
                    marker=options.media_marker,
                )
        except BaseException:
            self.close()  # nothing half-loaded stays in memory
            raise
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._token_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._batch_capacity = options.n_batch
        self._n_ubatch = min(options.n_ubatch, options.n_batch)
        self._batch = llama_cpp.llama_batch_init(options.n_batch, 0, 1)
        self.info = self._read_info(path, options)

    # ----------------------------------------------------------------- loading
    def _load_model(self, path: Path, options: LoadOptions) -> Any:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = options.n_gpu_layers if options.n_gpu_layers >= 0 else 999
        # llama_model_params has no use_mmap field (a ctypes structure takes any attribute silently):
        # mapping is the load mode. "auto" maps unless a device cannot.
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_AUTO if options.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        # A lazy table is mapped whatever the load mode: llama.cpp maps the file for it even when
        # the other weights are read into memory.
        params.lazy_mode = _LAZY_MODES[options.lazy_embeddings]
        params.use_extra_bufts = options.weight_repack
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelLoadError(f"{path}: llama.cpp could not load the model: {log_reason()}")
        return model

    def _new_context(self, path: Path, options: LoadOptions) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = options.n_batch
        params.n_ubatch = min(options.n_ubatch, options.n_batch)
        params.n_seq_max = options.n_seq_max
        params.n_threads = options.n_threads
        params.n_threads_batch = options.n_threads_batch
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.swa_full = options.swa_full
        # One KV pool for all slots (the default): any sequence may use the whole context, and
        # copying a cached prefix to another sequence only tags cells instead of moving data.
        # Private per-sequence cells make attention cheaper with many streams (each attends only
        # over its own cells) at the price of a per-request context of n_ctx / n_seq_max.
        params.kv_unified = options.kv_unified
        params.type_k = _KV_TYPES[options.kv_cache_type]
        params.type_v = _KV_TYPES[options.kv_cache_type]
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise ModelLoadError(f"{path}: llama.cpp could not create a context: {log_reason()}")
        return ctx

    def _meta(self, key: str) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _read_info(self, path: Path, options: LoadOptions) -> ModelInfo:
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, desc, 256)
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return ModelInfo(
            path=path,
            architecture=self._meta("general.architecture") or "unknown",
            n_ctx=llama_cpp.llama_n_ctx(self._ctx),
            n_ctx_seq=llama_cpp.llama_n_ctx_seq(self._ctx),
            n_ctx_train=llama_cpp.llama_model_n_ctx_train(self._model),
            n_seq_max=options.n_seq_max,
            n_swa=llama_cpp.llama_model_n_swa(self._model),
            n_vocab=llama_cpp.llama_vocab_n_tokens(self._vocab),
            n_params=llama_cpp.llama_model_n_params(self._model),
            size_bytes=llama_cpp.llama_model_size(self._model),
            description=desc.value.decode("utf-8", errors="replace"),
            bos_token=self._special_text(bos),
            eos_token=self._special_text(eos),
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)),
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            modalities=("text", *(self._projector.modalities if self._projector is not None else ())),
        )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    # ------------------------------------------------------------ tokenizing
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), tokens, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), tokens, capacity, add_special, parse_special)
        if n < 0:
            raise EngineError(f"tokenization failed ({n})")
        return list(tokens[:n])

    def token_bytes(self, token: int) -> bytes:
        cached = self._piece_cache.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        piece = buf.raw[:n]
        self._piece_cache[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -------------------------------------------------------------- sampling
    def new_sampler(self, params: SamplingParams) -> LlamaSampler:
        grammar = self._grammar(params)
        try:
            plain = params.temperature <= 0.0 and params.repeat_penalty == 1.0
            # Greedy with a grammar still needs no chain: the argmax is taken over what the grammar allows.
            chain = None if plain else self._chain(params)
        except BaseException:
            if grammar is not None:
                llama_cpp.llama_sampler_free(grammar)
            raise
        if params.repeat_penalty != 1.0:
            need = 0  # penalties lower some logits: a token outside the shortlist may end up on top
        elif params.temperature <= 0.0:
            need = 1
        else:
            need = params.top_k if 0 < params.top_k <= _SHORTLIST else 0
        return LlamaSampler(chain, grammar, params.banned_tokens, shortlist_need=need)

    def _grammar(self, params: SamplingParams) -> Any:
        if params.json_mode is not None:
            gbnf = json_grammar(params.json_schema if params.json_mode == "schema" else None)
        elif params.grammar is not None:
            gbnf = params.grammar
        else:
            return None
        if params.grammar_lazy:
            tokens = (llama_cpp.llama_token * len(params.grammar_trigger_tokens))(*params.grammar_trigger_tokens)
            patterns = (ctypes.c_char_p * 0)()
            grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                self._vocab, gbnf.encode(), b"root", patterns, 0, tokens, len(params.grammar_trigger_tokens)
            )
        else:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not grammar:  # llama.cpp returns NULL for a grammar it cannot parse
            raise EngineError(f"llama.cpp rejected the grammar: {log_reason()}")
        return grammar

    def _chain(self, params: SamplingParams) -> Any:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(chain_params)
        try:
            for stage in self._sampler_stages(params):
                _add_stage(chain, stage)
        except BaseException:
            llama_cpp.llama_sampler_free(chain)
            raise
        return chain

    def _sampler_stages(self, params: SamplingParams) -> list[Any]:
        stages: list[Any] = []
        if params.banned_tokens:
            biases = (llama_cpp.llama_logit_bias * len(params.banned_tokens))(
                *(llama_cpp.llama_logit_bias(token, -np.inf) for token in params.banned_tokens)
            )
            stages.append(llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases))
        if params.repeat_penalty != 1.0:
            stages.append(
                llama_cpp.llama_sampler_init_penalties(
                    self._n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0
                )
            )
        if params.temperature <= 0.0:
            stages.append(llama_cpp.llama_sampler_init_greedy())
            return stages
        if params.top_k > 0:
            stages.append(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            stages.append(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            stages.append(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        stages.append(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        stages.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return stages

    def _logits(self, batch_index: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        row = llama_cpp.llama_get_logits_ith(self._ctx, batch_index)
        if not row:
            raise EngineError(f"no logits for batch position {batch_index}")
        return np.ctypeslib.as_array(row, (self._n_vocab,))

    def sample(self, sampler: Sampler, batch_index: int) -> int:
        assert isinstance(sampler, LlamaSampler)
        if sampler.grammar is None and sampler.handle is not None:
            return int(llama_cpp.llama_sampler_sample(sampler.handle, self._ctx, batch_index))
        logits = self._logits(batch_index)
        if sampler.handle is None and sampler.banned:
            # A chain bans through its logit-bias stage; greedy without one edits this step's logits
            # (the next decode overwrites them).
            logits[sampler.banned] = -np.inf
        if sampler.plain_greedy:
            return int(logits.argmax())  # the first maximum, as llama.cpp's greedy sampler picks it
        token = self._pick(sampler, logits, grammar=False)
        if sampler.grammar is not None and not self._grammar_allows(sampler.grammar, token):
            shortlisted = self._pick_from_shortlist(sampler, logits)
            token = self._pick(sampler, logits, grammar=True) if shortlisted is None else shortlisted
        if sampler.grammar is not None:
            llama_cpp.llama_sampler_accept(sampler.grammar, token)
        if sampler.handle is not None:
            llama_cpp.llama_sampler_accept(sampler.handle, token)
        return token

    def _pick(self, sampler: LlamaSampler, logits: np.ndarray[Any, np.dtype[np.float32]], *, grammar: bool) -> int:
        """One token from ``logits`` through the chain (argmax without one), under the grammar or not."""
        if not grammar and sampler.handle is None:
            return int(logits.argmax())
        candidates = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        candidates["id"] = self._token_ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=self._n_vocab,
            selected=-1,
            sorted=False,
        )
        if grammar:
            llama_cpp.llama_sampler_apply(sampler.grammar, ctypes.byref(array))
        if sampler.handle is None:
            return int(candidates["id"][int(candidates["logit"].argmax())])
        llama_cpp.llama_sampler_apply(sampler.handle, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise EngineError("the sampler chain selected no token")
        return int(array.data[array.selected].id)  # samplers may reorder the candidates in place

    def _pick_from_shortlist(self, sampler: LlamaSampler, logits: np.ndarray[Any, np.dtype[np.float32]]) -> int | None:
        """The pick under the grammar among the most likely tokens, or None when that could differ from the
        pick among all tokens (too few of them allowed)."""
        if sampler.shortlist_need == 0 or self._n_vocab <= _SHORTLIST:
            return None
        top = np.argpartition(logits, -_SHORTLIST)[-_SHORTLIST:]
        candidates = np.empty(_SHORTLIST, dtype=_TOKEN_DATA)
        candidates["id"] = top
        candidates["logit"] = logits[top]
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=_SHORTLIST, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(sampler.grammar, ctypes.byref(array))
        if int(np.isfinite(candidates["logit"]).sum()) < sampler.shortlist_need:
            return None
        if sampler.handle is None:
            return int(candidates["id"][int(candidates["logit"].argmax())])
        llama_cpp.llama_sampler_apply(sampler.handle, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise EngineError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def _grammar_allows(self, grammar: Any, token: int) -> bool:
        single = np.array([(token, 0.0, 0.0)], dtype=_TOKEN_DATA)
        array = llama_cpp.llama_token_data_array(
            data=single.ctypes.data_as(llama_cpp.llama_token_data_p), size=1, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return bool(np.isfinite(single["logit"][0]))

    # -------------------------------------------------------------- decoding
    def decode(self, batch: list[BatchToken]) -> None:
        if not batch:
            return
        if len(batch) > self._batch_capacity:
            raise EngineError(f"batch of {len(batch)} tokens exceeds n_batch {self._batch_capacity}")
        b = self._batch
        for i, item in enumerate(batch):
            b.token[i] = item.token
            b.pos[i] = item.pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = item.seq
            b.logits[i] = item.logits
        b.n_tokens = len(batch)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc == 1:
            raise EngineError("KV cache full: no room for this batch (lower n_parallel or raise n_ctx)")
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc}")

    # -------------------------------------------------------------- media
    def tokenize_media(
        self, text: str, media: list[MediaItem], *, add_special: bool, max_audio_seconds: float
    ) -> tuple[list[int], list[MediaSpan]]:
        if self._projector is None:
            raise BadRequestError("messages: this model is served without a projector: text only", param="messages")
        return self._projector.tokenize(text, media, add_special=add_special, max_audio_seconds=max_audio_seconds)

    def encode_media(self, span: MediaSpan) -> None:
        assert self._projector is not None
        span.encoded = self._projector.encode(span, int(llama_cpp.llama_model_n_embd_inp(self._model)))

    def decode_media(self, seq: int, span: MediaSpan, pos: int) -> None:
        assert self._projector is not None
        embeddings = span.encoded
        if not isinstance(embeddings, np.ndarray):
            raise EngineError(f"the {span.kind} was not encoded")
        self._projector.decode(
            self._ctx, seq, span, pos, embeddings, n_batch=self._batch_capacity, n_ubatch=self._n_ubatch
        )

    def release_media(self, span: MediaSpan) -> None:
        span.encoded = None
        if self._projector is not None:
            self._projector.release(span)

    # ---------------------------------------------------------- speculation
    @property
    def can_draft(self) -> bool:
        return self._drafter is not None

    def draft(self, requests: list[DraftRequest]) -> list[list[int]]:
        if self._drafter is None:
            raise EngineError("this model is served without a drafter")
        return self._drafter.draft(requests)

    def keep_draft_state(self, seq: int, batch_index: int) -> None:
        if self._drafter is not None:
            self._drafter.keep(seq, batch_index)

    # ------------------------------------------------------- sequence memory
    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq, p0, p1)

    def seq_copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq))

    def seq_pos_min(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self._memory, seq))

    def save_seq_state(self, seq: int, path: Path, tokens: list[int]) -> None:
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        written = llama_cpp.llama_state_seq_save_file(self._ctx, str(path).encode(), seq, array, len(tokens))
        if written == 0:
            raise EngineError(f"could not save sequence state to {path}")

    def load_seq_state(self, seq: int, path: Path, max_tokens: int) -> list[int]:
        array = (llama_cpp.llama_token * max_tokens)()
        count = ctypes.c_size_t(0)
        read = llama_cpp.llama_state_seq_load_file(
            self._ctx, str(path).encode(), seq, array, max_tokens, ctypes.byref(count)
        )
        if read == 0:
            raise EngineError(f"could not load sequence state from {path}")
        return list(array[: count.value])

    # -------------------------------------------------------------- teardown
    def close(self) -> None:
        if self._drafter is not None:  # its context views the model's KV cache: free it first
            self._drafter.close()
            self._drafter = None
        if self._projector is not None:
            self._projector.close()
            self._projector = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None


@functools.lru_cache(maxsize=32)
def json_grammar(json_schema: str | None) -> str:
    """GBNF for any JSON object (``json_schema`` None) or for values matching a JSON Schema (JSON text).

    Cached: kiosk apps send the same schema with every request, and the conversion is pure Python.
    """
    if json_schema is None:
        return str(llama_grammar.JSON_GBNF)
    try:
        return str(llama_grammar.json_schema_to_gbnf(json_schema))
    # llama-cpp-python's converter reports unsupported schemas with assert statements
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadRequestError(
            f"response_format.json_schema: unsupported schema: {exc}", param="response_format"
        ) from None
