"""The baseline the engine is measured against: greedy runs of llama-cpp-python's own ``Llama`` class.

Parity tests and ``edgert bench`` compare :class:`~edgert.engine.llama.backend.LlamaBackend`
with these runs; nothing on the serving path uses them.
"""

from __future__ import annotations

import time
from pathlib import Path

import llama_cpp

from edgert.engine.base import LoadOptions
from edgert.engine.llama.process import ensure_initialised


class ReferenceRun:
    """Greedy tokens and timings from llama-cpp-python's own high-level ``Llama`` class.

    The baseline that parity tests and ``edgert bench`` compare the engine against.
    """

    def __init__(self, tokens: list[int], ttft_s: float, decode_s: float, load_s: float) -> None:
        self.tokens = tokens
        self.ttft_s = ttft_s
        #: seconds from the first to the last generated token
        self.decode_s = decode_s
        self.load_s = load_s

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else 0.0


def reference_generate(
    path: Path, options: LoadOptions, prompt: list[int], max_tokens: int, *, ignore_eos: bool = False
) -> ReferenceRun:
    """Greedy generation with a plain ``llama_cpp.Llama`` (one sequence, same threads and context)."""
    ensure_initialised()
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=options.n_ctx,
        n_batch=options.n_batch,
        n_ubatch=options.n_ubatch,
        n_threads=options.n_threads,
        n_threads_batch=options.n_threads_batch,
        n_gpu_layers=options.n_gpu_layers if options.n_gpu_layers >= 0 else -1,
        flash_attn=options.flash_attn,
        swa_full=options.swa_full,
        use_mmap=options.use_mmap,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    try:
        tokens: list[int] = []
        t0 = time.perf_counter()
        first = last = t0
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            now = time.perf_counter()
            if not tokens:
                first = now
            last = now
            if not ignore_eos and llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            tokens.append(int(token))
            if len(tokens) >= max_tokens:
                break
        return ReferenceRun(tokens, first - t0, last - first, load_s)
    finally:
        llm.close()
