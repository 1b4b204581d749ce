"""``registry add --eval``: a release's evaluation set, validated as the device will read it, staged as its target.

The set becomes the target ``models/<id>/<version>/eval.jsonl`` (TUF length + sha256, like every member
of a release) and the release's ModelMeta carries ``evaluation = {threshold, cases}``, so the signed
metadata pins both the set and the score a device must reach before it commits (see
:mod:`edgert.update.manifest`). Every case is checked now, with the chat request it will make, so a set
that a device would refuse is never signed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import TargetFile

from edgert.errors import EvalSetError, RegistryError
from edgert.evalset.cases import load_eval_set
from edgert.evalset.request import check_requests
from edgert.update.manifest import EvalMeta, ModelMeta


@dataclass(frozen=True, slots=True)
class EvalAttachment:
    """A validated evaluation set to publish with a release."""

    source: Path
    meta: EvalMeta


def eval_attachment(path: Path, threshold: float) -> EvalAttachment:
    """Validate ``path`` (every case, with its line on error) and the threshold; RegistryError when either is bad."""
    percent = round(threshold * 100)
    if not 0.0 <= threshold <= 1.0 or abs(percent - threshold * 100) > 1e-6:
        raise RegistryError(
            f"--eval-threshold must be 0..1 in steps of 0.01 (the least fraction of cases that pass), not {threshold}"
        )
    try:
        eval_set = load_eval_set(path)
        check_requests(eval_set)
    except EvalSetError as exc:
        raise RegistryError(f"--eval: {exc.message}") from None
    return EvalAttachment(path, EvalMeta(threshold_pct=percent, cases=len(eval_set.cases)))


def eval_target(attachment: EvalAttachment, meta: ModelMeta) -> TargetFile:
    """The evaluation set's target for the release ``meta`` (which must carry the attachment's gate)."""
    path = meta.evaluation_target()
    assert path is not None and meta.evaluation == attachment.meta
    return TargetFile.from_file(path, str(attachment.source), ["sha256"])
