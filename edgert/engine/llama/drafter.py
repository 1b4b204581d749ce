"""Gemma 4's multi-token-prediction drafter (llama.cpp ``gemma4-assistant``): the only user of the MTP context.

The drafter is a small Q-only transformer shipped beside each Gemma 4 model. It has no KV cache of its own:
its context is created with ``ctx_type = LLAMA_CONTEXT_TYPE_MTP`` and ``ctx_other = <the target context>``, and
attends over the target's cached keys and values (the target's last sliding-window and last full-attention
layer). One draft step takes, per sequence, the last token and a hidden state, and gives logits for the next
token plus the hidden state for the step after. The first step's hidden state is the target's own
(``h_nextn``: the last hidden state before the output norm) at the last position the target accepted; every
draft token of one round sits at the same position (``pos0``, where the last token will be written), as
llama.cpp's ``common_speculative_impl_draft_mtp`` drives it for Gemma 4.

So the drafter's state per sequence is one row of floats, set by :meth:`MtpDrafter.keep` from the target's
last decode and never invalidated by the target removing rejected positions (the draft reads the target KV
only up to ``pos0``). llama.cpp's staging API for the target's hidden states (``llama_set_embeddings_nextn``,
``llama_get_embeddings_nextn_ith``, ``llama_get_ctx_other``) is exported by libllama.so as C++ symbols only;
they are bound here by their mangled names, so a missing symbol fails the load with its name.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from edgert.engine.base import DraftRequest, LoadOptions
from edgert.engine.llama.process import log_reason
from edgert.errors import EngineError, ModelLoadError

_SET_NEXTN = "_Z26llama_set_embeddings_nextnP13llama_contextbb"
_GET_NEXTN_ITH = "_Z30llama_get_embeddings_nextn_ithP13llama_contexti"
_GET_CTX_OTHER = "_Z19llama_get_ctx_otherP13llama_context"
_INT32_P = ctypes.POINTER(ctypes.c_int32)


class _NextnApi:
    """The three staging functions, bound once from the already loaded libllama."""

    def __init__(self) -> None:
        path = Path(llama_cpp.__file__).parent / "lib" / "libllama.so"
        try:
            lib = ctypes.CDLL(str(path))  # the same handle llama_cpp loaded (dlopen counts references)
        except OSError as exc:
            raise ModelLoadError(f"cannot open {path} for the MTP drafter: {exc}") from None
        try:
            self.set_nextn = getattr(lib, _SET_NEXTN)
            self.get_nextn_ith = getattr(lib, _GET_NEXTN_ITH)
            self.get_ctx_other = getattr(lib, _GET_CTX_OTHER)
        except AttributeError as exc:
            raise ModelLoadError(f"this llama.cpp build cannot drive an MTP drafter: missing {exc}") from None
        self.set_nextn.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool]
        self.set_nextn.restype = None
        self.get_nextn_ith.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        self.get_nextn_ith.restype = ctypes.POINTER(ctypes.c_float)
        self.get_ctx_other.argtypes = [ctypes.c_void_p]
        self.get_ctx_other.restype = ctypes.c_void_p


class MtpDrafter:
    """A ``gemma4-assistant`` model and its MTP context against one target context; one engine thread drives it."""

    def __init__(self, path: Path, target_ctx: Any, options: LoadOptions, kv_type: int) -> None:
        """``options`` and ``kv_type`` (a ggml type id) are the ones the target context was created with."""
        self._api = _NextnApi()
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._target_ctx = target_ctx
        try:
            self._model = self._load(path)
            self._ctx = self._new_context(path, target_ctx, options, kv_type)
            self._batch = llama_cpp.llama_batch_ext_init(self._ctx)
        except BaseException:
            self.close()
            raise
        if not self._batch:
            self.close()
            raise ModelLoadError(f"{path}: could not allocate the draft batch")
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(self._model))
        target_embd = int(llama_cpp.llama_model_n_embd_out(llama_cpp.llama_get_model(target_ctx)))
        if self.n_embd != target_embd:
            self.close()
            raise ModelLoadError(
                f"{path}: the drafter reads hidden states of width {self.n_embd}, the model has {target_embd}"
            )
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model)))
        # the target keeps h_nextn for rows that ask for logits only ("masked"): the rows we sample from
        self._api.set_nextn(target_ctx, True, True)
        self._api.set_nextn(self._ctx, True, True)
        self._state = np.zeros((options.n_seq_max, self.n_embd), dtype=np.float32)
        self._pos = np.zeros(1, dtype=np.int32)

    def _load(self, path: Path) -> Any:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelLoadError(f"{path}: llama.cpp could not load the drafter: {log_reason()}")
        if int(llama_cpp.llama_model_n_layer_nextn(model)) <= 0:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"{path}: not an MTP drafter (no nextn layers; want a gemma4-assistant GGUF)")
        return model

    def _new_context(self, path: Path, target_ctx: Any, options: LoadOptions, kv_type: int) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
        params.ctx_other = target_ctx
        # the drafter views the target's KV cells, so it takes the same size and layout
        # (its views of the target's K/V tensors are computed from these: a mismatch reads out of bounds)
        params.n_ctx = llama_cpp.llama_n_ctx(target_ctx)
        params.kv_unified = options.kv_unified
        params.swa_full = options.swa_full
        params.type_k = params.type_v = kv_type
        params.n_seq_max = options.n_seq_max
        params.n_batch = params.n_ubatch = options.n_seq_max  # one token per drafting sequence per step
        params.n_threads = params.n_threads_batch = options.n_threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise ModelLoadError(f"{path}: llama.cpp could not create the MTP draft context: {log_reason()}")
        if self._api.get_ctx_other(ctx) != ctypes.cast(target_ctx, ctypes.c_void_p).value:
            llama_cpp.llama_free(ctx)
            raise ModelLoadError(f"{path}: the drafter does not share the model's KV cache (not a gemma4-assistant?)")
        return ctx

    def keep(self, seq: int, batch_index: int) -> None:
        """Take the target's hidden state at ``batch_index`` of its last decode as ``seq``'s next draft input."""
        row = self._api.get_nextn_ith(self._target_ctx, batch_index)
        if not row:
            raise EngineError(f"the model gave no hidden state for batch position {batch_index}")
        self._state[seq] = np.ctypeslib.as_array(row, (self.n_embd,))

    def draft(self, requests: list[DraftRequest]) -> list[list[int]]:
        """Greedy drafts, one list per request (possibly shorter than asked); one MTP decode per draft step."""
        drafts: list[list[int]] = [[] for _ in requests]
        live = [i for i, r in enumerate(requests) if r.n_max > 0]
        tokens = {i: requests[i].last_token for i in live}
        while live:
            llama_cpp.llama_batch_ext_clear(self._batch)
            rows: list[int] = []
            for i in live:
                r = requests[i]
                idx = llama_cpp.llama_batch_ext_add_token(self._batch, r.seq, tokens[i])
                if idx < 0:
                    raise EngineError(f"draft batch rejected a token ({idx})")
                self._pos[0] = r.pos  # every step of one round at pos0, as llama.cpp drives Gemma 4 (module doc)
                llama_cpp.llama_batch_ext_set_pos(self._batch, idx, self._pos.ctypes.data_as(_INT32_P))
                embd = llama_cpp.llama_embd(
                    self._state[r.seq].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd
                )
                llama_cpp.llama_batch_ext_set_embd_token(self._batch, idx, embd)
                llama_cpp.llama_batch_ext_set_output_logits(self._batch, idx, True)
                rows.append(idx)
            rc = llama_cpp.llama_process(self._ctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, self._batch)
            if rc != 0:
                raise EngineError(f"the MTP draft step failed with status {rc}")
            still: list[int] = []
            for i, idx in zip(live, rows, strict=True):
                logits = llama_cpp.llama_get_logits_ith(self._ctx, idx)
                if not logits:
                    raise EngineError(f"the drafter gave no logits for row {idx}")
                token = int(np.ctypeslib.as_array(logits, (self._n_vocab,)).argmax())
                drafts[i].append(token)
                seq = requests[i].seq
                h = self._api.get_nextn_ith(self._ctx, idx)
                if not h:
                    raise EngineError(f"the drafter gave no hidden state for row {idx}")
                # the next step's input; keep() overwrites it from the target once the round is verified
                self._state[seq] = np.ctypeslib.as_array(h, (self.n_embd,))
                tokens[i] = token
                if len(drafts[i]) < requests[i].n_max:
                    still.append(i)
            live = still
        return drafts

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_ext_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None
