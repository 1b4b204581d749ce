"""Does a GGUF fit a model as its MTP drafter? Header checks before llama.cpp sees the pair (no llama.cpp import).

llama.cpp builds the drafter's context as views of the model's KV cache and feeds it the model's hidden
states and token embeddings; a drafter made for another model does not fail politely there, it trips an
assertion that aborts the process. So the pair is checked from the two headers first, and a mismatch is a
:class:`~edgert.errors.ModelFileError` naming the drafter, the model and the value that differs.
"""

from __future__ import annotations

from pathlib import Path

from edgert.errors import ModelFileError
from edgert.gguf_file import GGUFLayout, read_layout

#: llama.cpp's architecture of Gemma 4's multi-token-prediction assistant
DRAFTER_ARCHITECTURE = "gemma4-assistant"
#: the models such a drafter serves
DRAFTED_ARCHITECTURES = frozenset({"gemma4"})

#: drafter key (under ``gemma4-assistant.``) -> model key (under ``gemma4.``) that must hold the same value
_MATCHING_KEYS = {
    "embedding_length_out": "embedding_length",  # the hidden state it reads and writes back
    "attention.head_count_kv": "attention.head_count_kv",  # the model's K/V it attends over
    "attention.key_length": "attention.key_length",
    "attention.key_length_swa": "attention.key_length_swa",
}


def check_drafter_files(model: Path, drafter: Path) -> None:
    """Raise :class:`ModelFileError` (``param="drafter"``) unless ``drafter`` is a Gemma 4 MTP drafter for ``model``."""
    try:
        draft = read_layout(drafter, architectures=frozenset({DRAFTER_ARCHITECTURE}))
    except ModelFileError as exc:
        raise ModelFileError(f"not a Gemma 4 MTP drafter: {exc.message}", param="drafter") from None
    target = read_layout(model)
    if target.info.architecture not in DRAFTED_ARCHITECTURES:
        raise ModelFileError(
            f"{model.name}: architecture {target.info.architecture!r}; an MTP drafter serves gemma4 models only",
            param="drafter",
        )
    for draft_key, model_key in _MATCHING_KEYS.items():
        ours = draft.metadata.get(f"{DRAFTER_ARCHITECTURE}.{draft_key}")
        theirs = target.metadata.get(f"{target.info.architecture}.{model_key}")
        if ours != theirs:
            raise ModelFileError(
                f"drafter {drafter.name} does not fit model {model.name}: its {draft_key} is {ours}, "
                f"the model's {model_key} is {theirs}",
                param="drafter",
            )
    if _vocab(draft) != _vocab(target):
        raise ModelFileError(
            f"drafter {drafter.name} does not fit model {model.name}: a vocabulary of {_vocab(draft)} tokens, "
            f"the model's has {_vocab(target)}",
            param="drafter",
        )


def _vocab(layout: GGUFLayout) -> int | None:
    """Rows of ``token_embd`` (ggml's second dimension)."""
    for tensor in layout.tensors:
        if tensor.name == "token_embd.weight" and len(tensor.dims) == 2:
            return tensor.dims[1]
    return None
