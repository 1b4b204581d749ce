"""Drives one device update: registry.fetch -> verify -> stage -> activate -> healthcheck -> commit | rollback.

Each step persists its phase before it starts (the phase changes are the pure transitions of
:mod:`edgert.update.state`, which refuse an illegal move; this module acts and saves), under
an exclusive file lock, so ``kill -9`` anywhere leaves a state that the next run
finishes: it resumes the download, continues a staged file, retries an
interrupted activation (bounded), or completes a commit or rollback that began.

On disk, under ``Settings.models_dir``::

    versions/<model-id>@<version>.gguf        verified, installed GGUF releases (current + previous)
    versions/<model-id>@<version>.gguf.part   a GGUF download in progress
    versions/<model-id>@<version>.onnx/       a verified, installed folder release (ONNX Runtime GenAI)
    versions/.<model-id>@<version>.staging/   a folder download in progress: verified members under
                                              their names, the one being fetched as ``<name>.part``
    current.gguf -> versions/…                the committed release, file or folder (symlink, replaced
                                              atomically; the name is kept for existing installs)

The state file is the source of truth; ``current.gguf`` is repaired from it. Names are
:func:`edgert.store.version_name` (injective: ``:`` in a model id is written ``+``); releases
installed under the earlier naming keep the name their state records, and every name read
from the state is checked before use (:func:`edgert.store.version_path`).

A folder release is installed all or nothing: every member file is fetched as
its own signed target (:func:`edgert.update.download.fetch`: resumable ``.part``,
signed length cap, hashes, fsync) into the staging folder; only when every member
is verified (and, with ``update.publisher_public_key``, the publisher's model-signing
bundle has verified the staging folder: exactly the members, nothing more, nothing
less) are the folders fsynced and the staging folder renamed to its final
name in one ``rename``. A tampered member, or a publisher signature that does not
verify, deletes the staging folder (nothing is installed, nothing blocklisted);
``kill -9`` resumes: verified members are hashed again instead of fetched, the
member in flight resumes from its ``.part``.
The old model keeps serving until the new one has loaded and passed its probe
and the ``health-check`` hooks (see :class:`~edgert.update.switch.ModelSwitch`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, TextIO

import httpx
import psutil

from edgert import __version__, store
from edgert.device import resolve_device_id
from edgert.errors import (
    DownloadError,
    EdgertError,
    HookVetoError,
    InsufficientStorageError,
    IntegrityError,
    ModelFileError,
    TargetNotFoundError,
    UntrustedMetadataError,
    UpdateBusyError,
    UpdateError,
)
from edgert.gguf_file import validate_gguf
from edgert.identity import ReleaseIdentity
from edgert.onnx_folder import validate_onnx_folder
from edgert.settings import Settings
from edgert.update import download, failures, publisher_signature
from edgert.update.hooks import HookEvent, HookRunner
from edgert.update.manifest import member_target_path, model_target_path, pointer_mismatch
from edgert.update.registry import RegistryClient, SignedTarget
from edgert.update.state import (
    Member,
    Phase,
    Recovery,
    Release,
    StateStore,
    UpdateState,
    abandoned,
    begin_activation,
    begin_commit,
    begin_health_check,
    begin_rollback,
    blocklist_key,
    choose_target,
    committed,
    incompatibility,
    manual_rollback,
    recovery_for,
    retry_activation,
    rolled_back,
    staged,
    start_download,
)
from edgert.update.switch import ModelSwitch

log = logging.getLogger(__name__)

CURRENT_LINK: Final = "current.gguf"
VERSIONS_DIR: Final = "versions"

Outcome = Literal["up-to-date", "committed", "rolled-back", "rolled-back-manually"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    channel: str
    device_id: str
    current: str | None
    #: The release this device should install now, or None.
    offered: Release | None
    reason: str


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outcome: Outcome
    release: str | None
    detail: str
    resumed_from: int = 0
    downloaded_bytes: int = 0


def release_identity(release: Release) -> ReleaseIdentity:
    """Who ``release`` is, for the serving side: from its signed metadata, never from a file name."""
    sha256 = release.hashes.get("sha256")
    return ReleaseIdentity(release.meta.model_id, release.meta.version, f"sha256:{sha256}" if sha256 else None)


def version_file_name(model_id: str, version: str, *, folder: bool = False) -> str:
    """The release's name under ``versions/`` (injective: :func:`edgert.store.version_name`)."""
    return store.version_name(model_id, version, folder=folder)


class Updater:
    """The device update path for one state directory. ``switch`` is needed by apply and rollback."""

    def __init__(
        self,
        settings: Settings,
        switch: ModelSwitch | None = None,
        *,
        progress: download.Progress | None = None,
        keep_lock: bool = False,
    ) -> None:
        self.settings = settings
        self.config = settings.update
        self.switch = switch
        self.progress = progress
        self.update_dir = settings.state_dir / "update"
        self.versions_dir = settings.models_dir / VERSIONS_DIR
        self.store = StateStore(self.update_dir)
        self.hooks = HookRunner(self.config.hooks_dir, timeout_s=self.config.hook_timeout_s)
        self.device_id = resolve_device_id(self.config.device_id)  # the same id MQTT uses (edgert.device)
        #: Set when the process stops (SIGTERM): a download in progress ends between two reads, its
        #: ``.part`` kept for the next start (DownloadCancelledError).
        self.stop = threading.Event()
        self.pace = download.Pace(self.config.download_min_bytes_per_s, self.config.download_deadline_slack_s)
        #: The daemon keeps the update lock from its first round to its exit (:meth:`hold_lock`): a CLI that
        #: finds it held and no socket answering refuses instead of driving the update beside the daemon.
        self.keep_lock = keep_lock
        self._held: TextIO | None = None
        #: one round at a time within this process (the file lock is per process once held)
        self._round_lock = threading.Lock()

    # ------------------------------------------------------------------ public

    def status(self) -> UpdateState:
        return self.store.load()

    def current_path(self) -> Path | None:
        """The committed model file (or folder), or None when the update path installed nothing yet."""
        state = self.store.load()
        return self.versions_dir / state.current.file_name if state.current else None

    def check(self) -> CheckResult:
        """Refresh the signed metadata and say what this device would install."""
        with self._round("checking for an update") as state:
            self._recover(state)
            result, _ = self._check(state, pin_version=None)
            return result

    def apply(self, *, pin_version: str | None = None) -> ApplyResult:
        """Bring the device to what its channel offers (or ``pin_version``), finishing interrupted work first."""
        with self._round("applying an update") as state:
            self._recover(state)
            fetched = download.Fetched(0, 0)
            if state.phase is Phase.IDLE:
                result, target = self._check(state, pin_version=pin_version)
                if result.offered is None or target is None:
                    return ApplyResult("up-to-date", result.current, result.reason)
                fetched = self._download(state, result.offered, target)
            elif state.phase is Phase.DOWNLOADING:
                resumed = self._resume_download(state)
                if resumed is None:
                    return ApplyResult("up-to-date", _key(state.current), "the interrupted download is not offered")
                fetched = resumed
            return self._stage_and_activate(state, fetched)

    def rollback(self) -> ApplyResult:
        """Return to the previous release kept on disk, and blocklist the current one."""
        with self._round("rolling back") as state:
            self._recover(state)
            if state.phase is not Phase.IDLE:
                raise UpdateError(f"an update is in phase {state.phase}; run `edgert update apply` to finish it")
            previous, bad = state.previous, state.current
            if previous is None or bad is None or not self._present(previous):
                raise UpdateError("no previous model version is kept on this device")
            switch = self._switch()
            try:
                switch.load_beside(self._file(previous), release_identity(previous))
                switch.probe(self.config.health_check_timeout_s)
            except EdgertError:
                switch.release()
                raise
            moved = manual_rollback(state, now=_now())
            self._point_current(previous)
            self._move(state, moved)
            switch.swap()
            switch.release()
            self._remove(bad)
            self._hook(HookEvent.ON_ROLLBACK, bad, state, reason=f"manual rollback to {previous.key}")
            return ApplyResult("rolled-back-manually", previous.key, f"{bad.key} is blocklisted on this device")

    # ------------------------------------------------------------------ check

    def _check(self, state: UpdateState, *, pin_version: str | None) -> tuple[CheckResult, SignedTarget | None]:
        if not self.config.registry_url:
            raise UpdateError("update.registry_url is not set: this device has no registry")
        client = RegistryClient(
            cache_dir=self.update_dir / "tuf",
            registry_url=self.config.registry_url,
            trusted_root=self.config.trusted_root,
        )
        client.refresh()
        state.last_check = datetime.now(UTC)
        self.store.save(state)
        pointer = client.channels().channels.get(self.config.channel)
        choice = choose_target(pointer, device_id=self.device_id, blocklist=state.blocklist, pin_version=pin_version)
        current = _key(state.current)
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
            file_name=version_file_name(target.meta.model_id, target.meta.version, folder=target.meta.is_folder),
            members=members,
        )
        if problem is not None:
            return CheckResult(self.config.channel, self.device_id, current, None, f"{release.key} {problem}"), None
        if current == release.key:
            return CheckResult(self.config.channel, self.device_id, current, None, f"{current} is current"), None
        if release.key in state.blocklist:  # what would be installed, whatever the pointer said
            reason = f"{release.key} is blocklisted on this device"
            return CheckResult(self.config.channel, self.device_id, current, None, reason), None
        _refuse_shared_name(state, release)
        return CheckResult(self.config.channel, self.device_id, current, release, choice.reason), target

    # ------------------------------------------------------------------ download

    def _download(self, state: UpdateState, release: Release, target: SignedTarget) -> download.Fetched:
        self._move(state, start_download(state, release, now=_now()))
        try:
            self._hook(HookEvent.PRE_DOWNLOAD, release, state)
        except HookVetoError as exc:
            self._abandon(state, f"pre-download hook vetoed {release.key}: {exc}")
            raise
        if release.is_folder:
            return self._fetch_folder(state, release)
        return self._fetch(state, release, target.url_path)

    def _resume_download(self, state: UpdateState) -> download.Fetched | None:
        pending = state.pending
        assert pending is not None  # phase downloading always has one
        result, target = self._check(state, pin_version=None)
        if result.offered is None or target is None or result.offered.key != pending.key:
            # The channel moved on (or blocklisted it): the old .part (or staging folder) is worthless now.
            self._part(pending).unlink(missing_ok=True)
            _discard(self._staging(pending))
            self._abandon(state, f"download of {pending.key} dropped: {result.reason}")
            if result.offered is None or target is None:
                return None
            return self._download(state, result.offered, target)
        log.info("resuming the download of %s", pending.key)
        if pending.is_folder:
            return self._fetch_folder(state, pending)
        return self._fetch(state, pending, target.url_path)

    def _fetch(self, state: UpdateState, release: Release, url_path: str) -> download.Fetched:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        job = download.Fetch(
            url=self._targets_url() + url_path,
            part=self._part(release),
            length=release.length,
            hashes=release.hashes,
        )
        with self._download_failures(state, release), self._http() as client:
            fetched = download.fetch(
                client,
                job,
                reserve_bytes=self.config.disk_reserve_bytes,
                progress=self._progress_for(release),
                pace=self.pace,
                stop=self.stop,
            )
        store.install_file(job.part, self._file(release))
        self._staged(state, release)
        return fetched

    def _fetch_folder(self, state: UpdateState, release: Release) -> download.Fetched:
        """Fetch and verify every member into the staging folder, then rename it into place at once."""
        final, staging = self._file(release), self._staging(release)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        if final.is_dir() and not staging.exists():
            # Killed after the rename but before the state said staged: check every member again.
            final.replace(staging)
        _discard(final)
        staging.mkdir(exist_ok=True)
        report = self._progress_for(release)
        resumed = received = done = 0
        # one bad member: nothing of this release is kept
        with self._download_failures(state, release, discard=staging):
            kept = sum(_kept_bytes(staging, member) for member in release.members)
            download.check_free_space(self.versions_dir, release.length - kept, self.config.disk_reserve_bytes)
            with self._http() as client:
                for member in release.members:
                    fetched = self._fetch_member(client, staging, member, _shifted(report, done, release.length))
                    resumed, received = resumed + fetched.resumed_from, received + fetched.received
                    done += member.length
        if self.config.publisher_public_key is not None:
            self._verify_folder_publisher(state, release, staging, self.config.publisher_public_key)
        # Every member is verified and fsynced: make the folders durable, then switch names at once.
        for directory in sorted((p for p in staging.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            store.fsync_dir(directory)
        store.fsync_dir(staging)
        staging.replace(final)
        store.fsync_dir(self.versions_dir)
        self._staged(state, release)
        return download.Fetched(resumed, received)

    @contextlib.contextmanager
    def _download_failures(
        self, state: UpdateState, release: Release, *, discard: Path | None = None
    ) -> Iterator[None]:
        """Bytes that can never verify or no room: abandon the release (deleting ``discard``);
        a dropped connection keeps the phase ``downloading`` so the next run resumes."""
        try:
            yield
        except (IntegrityError, InsufficientStorageError) as exc:
            if discard is not None and isinstance(exc, IntegrityError):
                _discard(discard)
            self._abandon(state, f"download of {release.key} failed: {exc}")
            raise
        except DownloadError as exc:
            self._keep_for_retry(state, exc)
            raise

    def _keep_for_retry(self, state: UpdateState, exc: DownloadError) -> None:
        """A transient failure: record it, keep the phase, so the next run resumes."""
        state.last_error = str(exc)
        self.store.save(state)

    def _verify_folder_publisher(self, state: UpdateState, release: Release, staging: Path, public_key: Path) -> None:
        """The publisher's bundle must sign exactly the verified staging folder, before it gets its final name.

        Refused (PublisherSignatureError): the staging folder is deleted and the update abandoned,
        not blocklisted, as for a GGUF. A registry that cannot be reached keeps the phase
        ``downloading``: the next run hashes the kept members again and retries.
        """
        try:
            self._verify_publisher(release, staging, public_key)
        except publisher_signature.PublisherSignatureError as exc:
            _discard(staging)
            self._abandon(state, f"{release.key} refused before staging: {exc}")
            raise
        except DownloadError as exc:
            self._keep_for_retry(state, exc)
            raise

    def _fetch_member(
        self, client: httpx.Client, staging: Path, member: Member, progress: download.Progress
    ) -> download.Fetched:
        """One member into ``staging/<path>`` (via ``<path>.part``), verified against its signed target."""
        path = staging / member.path
        path.parent.mkdir(parents=True, exist_ok=True)
        url = self._targets_url() + member.url_path
        if path.is_file() and path.stat().st_size == member.length:
            # Verified and renamed by an earlier run: hash it again (no request: the file is complete).
            try:
                job = download.Fetch(url, path, member.length, member.hashes)
                return download.fetch(client, job, stop=self.stop)
            except IntegrityError:
                log.warning("%s changed on disk since it was verified; fetching it again", path)
        path.unlink(missing_ok=True)
        job = download.Fetch(url=url, part=store.part_path(path), length=member.length, hashes=member.hashes)
        if member.length == 0:
            job.part.touch()  # nothing to fetch; fetch still checks the signed hash of no bytes
        fetched = download.fetch(
            client,
            job,
            reserve_bytes=self.config.disk_reserve_bytes,
            progress=progress,
            pace=self.pace,
            stop=self.stop,
        )
        store.install_file(job.part, path)
        return fetched

    def _staged(self, state: UpdateState, release: Release) -> None:
        # Its identity now, so a later deletion can tell the file is still this release's own.
        identity = store.file_id(self._file(release))
        installed = release.model_copy(update={"file_id": str(identity) if identity else None})
        self._move(state, staged(state, installed, now=_now()))

    # ------------------------------------------------------------------ stage, activate, commit

    def _stage_and_activate(self, state: UpdateState, fetched: download.Fetched) -> ApplyResult:
        release = state.pending
        assert release is not None and state.phase is Phase.STAGED
        path = self._file(release)
        # A folder's publisher signature was verified on its staging folder, before the rename.
        if self.config.publisher_public_key is not None and not release.is_folder:
            try:
                self._verify_publisher(release, path, self.config.publisher_public_key)
            except publisher_signature.PublisherSignatureError as exc:
                self._abandon(state, f"{release.key} refused before staging: {exc}")
                self._remove(release)
                raise
        try:
            if release.is_folder:
                validate_onnx_folder(path)
            else:
                validate_gguf(path)
        except ModelFileError as exc:
            what = "ONNX Runtime GenAI folder" if release.is_folder else "GGUF"
            return self._roll_back(state, f"{release.key} is not a loadable {what}: {exc}", fetched)
        try:
            self._hook(HookEvent.PRE_INSTALL, release, state)
        except HookVetoError as exc:
            self._abandon(state, f"pre-install hook vetoed {release.key}: {exc}")
            self._remove(release)
            raise
        self._hook(HookEvent.POST_INSTALL, release, state)
        switch = self._switch()
        self._move(state, begin_activation(state))
        try:
            switch.load_beside(path, release_identity(release))
            self._move(state, begin_health_check(state))
            switch.probe(self.config.health_check_timeout_s)
            self._hook(HookEvent.HEALTH_CHECK, release, state)
        except EdgertError as exc:
            switch.release()
            return self._roll_back(state, f"{release.key} failed its health check: {exc}", fetched)
        except OSError:
            # Not the model's verdict (a TimeoutError of a wait on the event loop, an I/O error): free the
            # candidate and fail the round; the next one retries the activation, bounded by
            # max_activation_attempts like an activation a crash interrupted.
            switch.release()
            raise
        self._move(state, begin_commit(state))
        switch.swap()
        self._finish_commit(state)
        switch.release()
        return ApplyResult(
            "committed", release.key, "installed, health-checked and serving", fetched.resumed_from, fetched.received
        )

    def _verify_publisher(self, release: Release, model: Path, public_key: Path) -> None:
        """Fetch the release's model-signing bundle (a TUF-verified companion target) and verify ``model``.

        ``model`` is the verified GGUF file, or a folder release's verified staging folder (which
        must hold exactly the release's members). PublisherSignatureError when the bundle is
        missing, altered or does not verify; a registry that cannot be reached raises as usual
        and the downloaded file(s) are kept for a retry.
        """
        client = RegistryClient(
            cache_dir=self.update_dir / "tuf",
            registry_url=self.config.registry_url or "",
            trusted_root=self.config.trusted_root,
        )
        client.refresh()
        bundle_path = publisher_signature.signature_target_path(release.target_path)
        try:
            target = client.target(bundle_path)
        except TargetNotFoundError:
            raise publisher_signature.PublisherSignatureError(
                f"no model-signing bundle {bundle_path} is published, and update.publisher_public_key requires one"
            ) from None
        if target.length > publisher_signature.MAX_BUNDLE_BYTES:
            raise publisher_signature.PublisherSignatureError(
                f"{bundle_path} is {target.length} bytes, too large for a model-signing bundle"
            )
        self.update_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".bundle-", dir=self.update_dir) as tmp:
            job = download.Fetch(
                url=self._targets_url() + target.url_path,
                part=Path(tmp) / "bundle.sig",
                length=target.length,
                hashes=target.hashes,
            )
            try:
                with self._http() as http:
                    download.fetch(http, job, pace=self.pace, stop=self.stop)
            except IntegrityError as exc:
                raise publisher_signature.PublisherSignatureError(
                    f"{bundle_path} does not match its signed metadata: {exc}"
                ) from None
            if release.is_folder:
                members = [member.path for member in release.members]
                publisher_signature.verify_folder(model, members, job.part, public_key)
            else:
                publisher_signature.verify(model, job.part, public_key, workdir=self.settings.models_dir)
        log.info("publisher signature of %s verified", release.key)

    def _finish_commit(self, state: UpdateState) -> None:
        release = state.pending
        assert release is not None
        self._point_current(release)
        self._move(state, committed(state, now=_now()))
        log.info("committed %s", release.key)
        self._collect_garbage(state)
        self._hook(HookEvent.ON_COMMIT, release, state)

    def _roll_back(self, state: UpdateState, reason: str, fetched: download.Fetched | None = None) -> ApplyResult:
        release = state.pending
        assert release is not None
        self._move(state, begin_rollback(state, reason))
        self._finish_rollback(state)
        fetched = fetched or download.Fetched(0, 0)
        return ApplyResult("rolled-back", release.key, reason, fetched.resumed_from, fetched.received)

    def _finish_rollback(self, state: UpdateState) -> None:
        release, reason = state.pending, state.rollback_reason or "rollback"
        if release is not None and release.key not in {_key(state.current), _key(state.previous)}:
            self._remove(release)
        self._move(state, rolled_back(state, now=_now()))
        log.warning("rolled back: %s", reason)
        if release is not None:
            self._hook(HookEvent.ON_ROLLBACK, release, state, reason=reason)

    def _abandon(self, state: UpdateState, reason: str) -> None:
        """Stop an update that was never activated: nothing to roll back, nothing blocklisted."""
        self._move(state, abandoned(state, reason, now=_now()))
        log.warning("%s", reason)

    # ------------------------------------------------------------------ recovery

    def _recover(self, state: UpdateState) -> None:
        action = recovery_for(state, max_activation_attempts=self.config.max_activation_attempts)
        if action is not Recovery.NOTHING:
            log.warning("recovering from an interrupted update (phase %s): %s", state.phase, action)
        if action is Recovery.FINISH_COMMIT:
            self._finish_commit(state)
        elif action is Recovery.FINISH_ROLLBACK:
            self._finish_rollback(state)
        elif action is Recovery.ROLL_BACK:
            attempts = state.activation_attempts
            self._roll_back(state, f"the process died during {attempts} activations of {_key(state.pending)}")
        elif action is Recovery.RETRY_ACTIVATION:
            self._move(state, retry_activation(state))  # the file was verified and renamed before activation began
        if state.phase is Phase.STAGED and state.pending and not self._present(state.pending):
            self._abandon(state, f"staged file of {state.pending.key} is missing")
        if state.phase is Phase.IDLE and state.current is not None:
            self._point_current(state.current)  # repair the link after a crash between state and link

    # ------------------------------------------------------------------ helpers

    def _move(self, state: UpdateState, moved: UpdateState) -> None:
        """Save the state a transition (:mod:`edgert.update.state`) returned, as the round's one state object.

        The round's ``state`` is updated in place: its failure handling (:meth:`_round`) records on it.
        """
        for name in UpdateState.model_fields:
            setattr(state, name, getattr(moved, name))
        self.store.save(state)

    @contextlib.contextmanager
    def _round(self, doing: str) -> Iterator[UpdateState]:
        """One locked run of the update path; its failure is recorded in the state and named by its class.

        The boundary of the update path: OS and subprocess errors leave as UpdateErrors
        (:func:`failures.converted`), so every caller sees edgert errors (a bug excepted).
        """
        try:
            with self._locked() as state:
                before = state.last_error
                try:
                    yield state
                except Exception as exc:
                    error = failures.converted(exc, doing)
                    # a step that gave up on the release already said why, with its context: keep that
                    said = state.last_error if state.last_error != before else None
                    self._record_failure(state, error, said)
                    if error is exc:
                        raise
                    raise error from exc
        except (OSError, subprocess.SubprocessError) as exc:  # taking the lock, reading the state
            raise failures.converted(exc, doing) from exc

    def _record_failure(self, state: UpdateState, exc: BaseException, said: str | None) -> None:
        """``last_error`` and a history line, saved if the disk lets us (the daemon also keeps it in memory)."""
        reason, message = failures.reason_of(exc), said or failures.message_of(exc)
        if reason is failures.FailureReason.CANCELLED:
            return  # edgert is stopping: not a failure, and the phase says where the next start resumes
        state.last_error = f"{reason}: {message}"
        state.remember(f"{_now()} failed ({reason}): {message}")
        try:
            self.store.save(state)
        except OSError as save_error:
            log.warning("could not record the failed update round in %s: %s", self.store.path, save_error)

    def hold_lock(self) -> None:
        """Take the update lock now and keep it (``keep_lock``); UpdateError when it cannot be had yet."""
        with self._locked():
            pass

    def release_lock(self) -> None:
        """Give up a lock kept by :meth:`hold_lock` (the daemon is stopping; its exit would release it too)."""
        held, self._held = self._held, None
        if held is not None:
            held.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[UpdateState]:
        if not self._round_lock.acquire(blocking=False):
            raise UpdateBusyError("another update is running on this device")
        try:
            if self._held is not None:
                yield self.store.load()
                return
            with contextlib.ExitStack() as stack:
                lock = self._take_lock()
                if self.keep_lock:
                    self._held = lock
                else:
                    stack.enter_context(lock)
                yield self.store.load()
        finally:
            self._round_lock.release()

    def _take_lock(self) -> TextIO:
        """``<state_dir>/update/lock``, flocked: only one process drives the update path of a state directory."""
        self.update_dir.mkdir(parents=True, exist_ok=True)
        path = self.update_dir / "lock"
        try:
            lock_file = path.open("a")
        except OSError as exc:
            raise UpdateError(
                f"cannot open the update lock {path}: {exc.strerror or exc} (left by `sudo edgert update apply`? "
                "it must belong to the user edgert runs as)",
                reason=failures.FailureReason.LOCK,
            ) from exc
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise UpdateBusyError("another update is running on this device") from None
        return lock_file

    def _switch(self) -> ModelSwitch:
        if self.switch is None:
            raise UpdateError("no model switch: this command cannot activate models")
        return self.switch

    def _hook(self, event: HookEvent, release: Release, state: UpdateState, *, reason: str = "") -> None:
        previous = state.current if state.current and state.current.key != release.key else state.previous
        env = {
            "EDGERT_MODEL_ID": release.meta.model_id,
            "EDGERT_MODEL_VERSION": release.meta.version,
            "EDGERT_MODEL_PATH": str(self._file(release)),
            "EDGERT_MODEL_FORMAT": release.meta.format,
            "EDGERT_TARGET_LENGTH": str(release.length),
            "EDGERT_TARGET_SHA256": release.hashes.get("sha256", ""),
            "EDGERT_PREVIOUS_VERSION": previous.meta.version if previous else "",
            "EDGERT_PREVIOUS_PATH": str(self._file(previous)) if previous else "",
            "EDGERT_MODELS_DIR": str(self.settings.models_dir),
            "EDGERT_STATE_DIR": str(self.settings.state_dir),
            "EDGERT_DEVICE_ID": self.device_id,
            "EDGERT_CHANNEL": self.config.channel,
            "EDGERT_REASON": reason,
        }
        self.hooks.run(event, env)

    def _progress_for(self, release: Release) -> download.Progress:
        """The caller's progress callback, plus a log line at every 10% of the download."""
        step = max(release.length // 10, 1)
        logged = [0]

        def report(done: int, total: int) -> None:
            if self.progress is not None:
                self.progress(done, total)
            if done // step > logged[0]:
                logged[0] = done // step
                log.info("downloading %s: %d%% (%d of %d bytes)", release.key, done * 100 // total, done, total)

        return report

    def _targets_url(self) -> str:
        base = self.config.targets_url or f"{(self.config.registry_url or '').rstrip('/')}/targets/"
        return base if base.endswith("/") else base + "/"

    def _file(self, release: Release) -> Path:
        """The release's file or folder; its name comes from the state file, so it is checked first."""
        return store.version_path(self.versions_dir, release.file_name)

    def _part(self, release: Release) -> Path:
        return store.part_path(self._file(release))

    def _http(self) -> httpx.Client:
        """The client every target download uses (large socket reads; see :func:`download.client`)."""
        return download.client(httpx.Timeout(self.config.download_timeout_s))

    def _staging(self, release: Release) -> Path:
        """Where a folder release is assembled until every member is verified."""
        return self.versions_dir / f".{release.file_name}.staging"

    def _present(self, release: Release) -> bool:
        """The release is installed under its final name (a folder: every member, at its signed size)."""
        path = self._file(release)
        if not release.is_folder:
            return path.is_file()
        return path.is_dir() and all(
            (path / m.path).is_file() and (path / m.path).stat().st_size == m.length for m in release.members
        )

    def _remove(self, release: Release) -> None:
        """Delete a release's file or folder and any download of it in progress.

        The file (or folder) goes only while it is the one installed for ``release`` (its identity, recorded
        when staged): what another release or someone else put under that name is left, with a warning.
        """
        path, identity = self._file(release), store.file_id(self._file(release))
        if release.file_id is not None and identity is not None and str(identity) != release.file_id:
            log.warning(
                "not deleting %s: it is no longer the file installed for %s (%s, recorded %s)",
                path,
                release.key,
                identity,
                release.file_id,
            )
        else:
            _discard(path)
        self._part(release).unlink(missing_ok=True)
        _discard(self._staging(release))

    def _point_current(self, release: Release) -> None:
        """``current.gguf`` -> ``versions/<file>``, replaced atomically (symlink + rename + dir fsync)."""
        link = self.settings.models_dir / CURRENT_LINK
        relative = f"{VERSIONS_DIR}/{release.file_name}"
        if link.is_symlink() and str(link.readlink()) == relative:
            return
        tmp = link.with_name(f".{CURRENT_LINK}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(relative)
        tmp.replace(link)
        store.fsync_dir(link.parent)

    def _collect_garbage(self, state: UpdateState) -> None:
        """Keep the current and previous releases; delete older ones and stray partial downloads."""
        keep = {r.file_name for r in (state.current, state.previous) if r is not None}
        for path in self.versions_dir.iterdir():
            if path.name not in keep:
                log.info("removing old model %s", path)
                _discard(path)
        store.fsync_dir(self.versions_dir)


def _refuse_shared_name(state: UpdateState, release: Release) -> None:
    """Names are injective now, but a release installed under the earlier naming (``:`` written ``_``) keeps
    its name, which a new release may have: installing it would overwrite that release's file."""
    for other in (state.current, state.previous, state.pending):
        if other is not None and other.key != release.key and other.file_name == release.file_name:
            raise UpdateError(
                f"{release.key} would be stored as versions/{release.file_name}, the file of {other.key}; "
                "refusing to overwrite it (install another version of either model first)"
            )


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


def _kept_bytes(staging: Path, member: Member) -> int:
    """Bytes of ``member`` already in ``staging`` (verified file or ``.part``), for the free-space check."""
    for path in (staging / member.path, store.part_path(staging / member.path)):
        with contextlib.suppress(OSError):
            return min(path.stat().st_size, member.length)
    return 0


def _shifted(report: download.Progress, offset: int, total: int) -> download.Progress:
    """One member's progress as progress of the whole folder."""

    def shifted(done: int, _length: int) -> None:
        report(offset + done, total)

    return shifted


def _discard(path: Path) -> None:
    """Delete a file or a whole folder; a folder first leaves its name in one rename (crash-safe)."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name.lstrip('.')}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        path.replace(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _key(release: Release | None) -> str | None:
    return blocklist_key(release.meta.model_id, release.meta.version) if release else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
