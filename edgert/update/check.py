"""Step 1 of an update round: refresh the signed metadata and decide what this device installs (no download).

The decisions themselves are pure (:func:`~edgert.update.state.choose_target`,
:func:`~edgert.update.state.incompatibility`); this step asks the registry and applies them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import psutil

from edgert import __version__
from edgert.errors import (
    TargetNotFoundError,
    UntrustedMetadataError,
    UpdateError,
)
from edgert.evalset.cases import MAX_EVAL_BYTES
from edgert.update.core import UpdaterCore, key_of, version_file_name
from edgert.update.manifest import EVAL_FILE, member_target_path, model_target_path, pointer_mismatch
from edgert.update.registry import RegistryClient, SignedTarget
from edgert.update.state import (
    Member,
    Release,
    UpdateState,
    choose_target,
    incompatibility,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckResult:
    channel: str
    device_id: str
    current: str | None
    #: The release this device should install now, or None.
    offered: Release | None
    reason: str


class Checking(UpdaterCore):
    """What the channel offers this device now."""

    def _check(self, state: UpdateState, *, pin_version: str | None) -> tuple[CheckResult, SignedTarget | None]:
        client = self._registry()
        state.last_check = datetime.now(UTC)
        self.store.save(state)
        pointer = client.channels().channels.get(self.config.channel)
        choice = choose_target(pointer, device_id=self.device_id, blocklist=state.blocklist, pin_version=pin_version)
        current = key_of(state.current)
        if choice.target is None:
            return CheckResult(self.config.channel, self.device_id, current, None, choice.reason), None
        try:
            target = client.target(choice.target)
        except TargetNotFoundError:
            if choice.fallback is None:
                raise
            target = client.target(choice.fallback)  # a pinned version that is a folder model
        if target.meta is None:
            raise UntrustedMetadataError(f"{target.path} carries no signed edgert model metadata")
        assert pointer is not None  # choose_target offers nothing without one
        mismatch = pointer_mismatch(pointer, target.meta, target.path, pin_version=pin_version)
        if mismatch is not None:  # a pointer naming an allowed version must not lead to another (blocklisted) one
            raise UntrustedMetadataError(f"refusing the channel's offer: {mismatch}")
        members = _members(client, target) if target.meta.is_folder else ()
        length = sum(member.length for member in members) if members else target.length
        problem = incompatibility(
            target.meta,
            edgert_version=__version__,
            ram_mib=psutil.virtual_memory().total // 2**20,
            max_bytes=self.config.max_target_bytes,
            length=length,
        )
        release = Release(
            meta=target.meta,
            target_path=target.path,
            length=length,
            hashes=target.hashes,
            file_name=version_file_name(
                target.meta.model_id,
                target.meta.version,
                folder=target.meta.format == "onnx-genai",
                pair=target.meta.format == "gguf-mmproj",
            ),
            members=members,
            evaluation=_evaluation(client, target),
        )
        if problem is None and release.evaluation is not None and release.evaluation.length > MAX_EVAL_BYTES:
            problem = f"has an evaluation set of {release.evaluation.length} bytes (at most {MAX_EVAL_BYTES})"
        if problem is not None:
            return CheckResult(self.config.channel, self.device_id, current, None, f"{release.key} {problem}"), None
        if current == release.key:
            return CheckResult(self.config.channel, self.device_id, current, None, f"{current} is current"), None
        if release.key in state.blocklist:  # what would be installed, whatever the pointer said
            reason = f"{release.key} is blocklisted on this device"
            return CheckResult(self.config.channel, self.device_id, current, None, reason), None
        _refuse_shared_name(state, release)
        return CheckResult(self.config.channel, self.device_id, current, release, choice.reason), target


def _refuse_shared_name(state: UpdateState, release: Release) -> None:
    """Names are injective now, but a release installed under the earlier naming (``:`` written ``_``) keeps
    its name, which a new release may have: installing it would overwrite that release's file."""
    for other in (state.current, state.previous, state.pending):
        if other is not None and other.key != release.key and other.file_name == release.file_name:
            raise UpdateError(
                f"{release.key} would be stored as versions/{release.file_name}, the file of {other.key}; "
                "refusing to overwrite it (install another version of either model first)"
            )


def _evaluation(client: RegistryClient, target: SignedTarget) -> Member | None:
    """The signed target of the release's evaluation set, when its ModelMeta says it has one."""
    meta = target.meta
    assert meta is not None
    path = meta.evaluation_target()
    if path is None:
        return None
    try:
        signed = client.target(path)
    except TargetNotFoundError:
        raise UntrustedMetadataError(
            f"{meta.model_id}@{meta.version} has an evaluation gate, but {path} is not a signed target"
        ) from None
    return Member(path=EVAL_FILE, length=signed.length, hashes=signed.hashes, url_path=signed.url_path)


def _members(client: RegistryClient, target: SignedTarget) -> tuple[Member, ...]:
    """Every member of a folder release, each described by its own signed target."""
    meta = target.meta
    assert meta is not None and meta.is_folder
    if target.path != model_target_path(meta.model_id, meta.version, meta.format):
        raise UntrustedMetadataError(f"{target.path}: signed folder model metadata is on the wrong target")
    members = []
    for name in meta.files:
        path = member_target_path(meta.model_id, meta.version, name)
        try:
            signed = client.target(path)
        except TargetNotFoundError:
            raise UntrustedMetadataError(
                f"{meta.model_id}@{meta.version} lists the file {name}, but {path} is not a signed target"
            ) from None
        members.append(Member(path=name, length=signed.length, hashes=signed.hashes, url_path=signed.url_path))
    return tuple(members)
