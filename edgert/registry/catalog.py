"""What a targets metadata lists: the model versions (targets carrying a ModelMeta) and the channels.

Pure reads of a :class:`~tuf.api.metadata.Targets`, staged or published; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuf.api.metadata import Targets

from edgert.update.manifest import CHANNELS_KEY, CHANNELS_TARGET, MODEL_KEY, Channels, ModelMeta


@dataclass(frozen=True, slots=True)
class PublishedModel:
    """One model version: the target carrying its ModelMeta; ``length`` counts every file of a folder."""

    target_path: str
    length: int
    sha256: str
    meta: ModelMeta


def models_of(targets: Targets) -> list[PublishedModel]:
    """Every model version: the targets that carry a ModelMeta (a folder's length is all its members')."""
    models = []
    for path, target in sorted(targets.targets.items()):
        custom = target.custom
        if isinstance(custom, dict) and MODEL_KEY in custom:
            meta = ModelMeta.model_validate(custom[MODEL_KEY])
            length = target.length
            if meta.is_folder:
                length = sum(targets.targets[p].length for p in meta.target_paths() if p in targets.targets)
            models.append(PublishedModel(path, length, target.hashes["sha256"], meta))
    return models


def channels_of(targets: Targets) -> Channels:
    target = targets.targets.get(CHANNELS_TARGET)
    if target is None or not isinstance(target.custom, dict):
        return Channels()
    return Channels.model_validate(target.custom.get(CHANNELS_KEY, {}))
