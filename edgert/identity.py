"""Who a model release is, as signed: the one value the update path hands the serving side with a path.

A leaf module (no edgert imports) so both paths may use it without importing each other: the
update path builds it from the verified :class:`~edgert.update.state.Release`, the model host
serves it (:class:`~edgert.serving.host.ServedModel`). A file name is never parsed for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReleaseIdentity:
    model_id: str
    version: str
    #: ``sha256:<hex>`` of the signed file (of a folder model: of its ``genai_config.json``)
    digest: str | None = None
