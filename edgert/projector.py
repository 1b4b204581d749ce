"""Whether a multimodal projector pairs with a language model: pure rules on two GGUF headers.

libmtmd refuses a projector whose output width differs from the language model's embedding width,
but only with a NULL from ``mtmd_init_from_file`` and a line in llama.cpp's log. Checked here first, the
refusal names both files and both widths, before llama.cpp loads gigabytes (``serve --mmproj``, the
installed catalog projector, and a signed release's projector before it is staged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from edgert.errors import ModelFileError
from edgert.gguf_file import GGUFInfo, validate_gguf

#: ``general.architecture`` of a projector GGUF (llama.cpp's clip loader).
PROJECTOR_ARCHITECTURE: Final = "clip"
#: Architectures whose GGUF carries the Gemma 4 projectors' partner (gemma4v / gemma4a encoders).
PAIRED_ARCHITECTURES: Final = frozenset({"gemma4"})


def check_pair(projector: GGUFInfo, model: GGUFInfo) -> None:
    """Raise :class:`ModelFileError` unless ``projector`` can feed ``model``.

    The projector must be a clip GGUF with at least one encoder, and each encoder must project into the
    model's ``<arch>.embedding_length`` (what mtmd compares, as the rows of ``mm.input_projection``).
    """
    if projector.architecture != PROJECTOR_ARCHITECTURE:
        raise ModelFileError(f"{projector.path}: architecture {projector.architecture!r}, not a multimodal projector")
    if not projector.projector_modalities:
        raise ModelFileError(f"{projector.path}: a projector with neither a vision nor an audio encoder")
    if model.embedding_length is None:
        raise ModelFileError(f"{model.path}: no {model.architecture}.embedding_length to pair a projector with")
    wrong = sorted({dim for dim in projector.projection_dims if dim != model.embedding_length})
    if wrong or len(projector.projection_dims) != len(projector.projector_modalities):
        widths = ", ".join(str(dim) for dim in projector.projection_dims) or "none"
        raise ModelFileError(
            f"projector {projector.path.name} does not pair with model {model.path.name}: it projects to "
            f"{widths}, the model's embedding length ({model.architecture}) is {model.embedding_length}"
        )


def check_pair_files(model: Path, projector: Path) -> None:
    """Both headers valid, the model a Gemma 4 GGUF, and :func:`check_pair`: what a release with a projector
    must pass before it is staged (the registry's ``add --mmproj`` and the device, before activating it)."""
    model_info = validate_gguf(model)
    if model_info.architecture not in PAIRED_ARCHITECTURES:
        known = ", ".join(sorted(PAIRED_ARCHITECTURES))
        raise ModelFileError(f"{model}: architecture {model_info.architecture!r}; a projector pairs with {known} only")
    try:
        projector_info = validate_gguf(projector, architectures=frozenset({PROJECTOR_ARCHITECTURE}))
    except ModelFileError as exc:
        raise ModelFileError(f"not a multimodal projector: {exc.message}") from None
    check_pair(projector_info, model_info)
