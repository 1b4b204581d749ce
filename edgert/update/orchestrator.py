"""Drives one device update: registry.fetch -> verify -> stage -> activate -> healthcheck -> commit | rollback.

Each step persists its phase (:mod:`edgert.update.state`) before it starts, under
an exclusive file lock, so ``kill -9`` anywhere leaves a state that the next run
finishes: it resumes the download, continues a staged file, retries an
interrupted activation (bounded), or completes a commit or rollback that began.

On disk, under ``Settings.models_dir``::

    versions/<model-id>@<version>.gguf        verified, installed releases (current + previous)
    versions/<model-id>@<version>.gguf.part   a download in progress
    current.gguf -> versions/…                the committed release (symlink, replaced atomically)

The state file is the source of truth; ``current.gguf`` is repaired from it.
The old model keeps serving until the new one has loaded and passed its probe
and the ``health-check`` hooks (see :class:`~edgert.update.switch.ModelSwitch`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import httpx
import psutil

from edgert import __version__, store
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
from edgert.settings import Settings
from edgert.update import download, publisher_signature
from edgert.update.hooks import HookEvent, HookRunner
from edgert.update.registry import RegistryClient, SignedTarget
from edgert.update.state import (
    Phase,
    Recovery,
    Release,
    StateStore,
    UpdateState,
    blocklist_key,
    choose_target,
    incompatibility,
    recovery_for,
)
from edgert.update.switch import ModelSwitch

log = logging.getLogger(__name__)

CURRENT_LINK: Final = "current.gguf"
VERSIONS_DIR: Final = "versions"
MACHINE_ID: Final = Path("/etc/machine-id")

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


def resolve_device_id(configured: str | None) -> str:
    """``update.device_id``, else the systemd machine id, else the host name."""
    if configured:
        return configured
    with contextlib.suppress(OSError):
        machine_id = MACHINE_ID.read_text().strip()
        if machine_id:
            return machine_id
    return socket.gethostname()


def version_file_name(model_id: str, version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", f"{model_id}@{version}") + ".gguf"


class Updater:
    """The device update path for one state directory. ``switch`` is needed by apply and rollback."""

    def __init__(
        self,
        settings: Settings,
        switch: ModelSwitch | None = None,
        *,
        progress: download.Progress | None = None,
    ) -> None:
        self.settings = settings
        self.config = settings.update
        self.switch = switch
        self.progress = progress
        self.update_dir = settings.state_dir / "update"
        self.versions_dir = settings.models_dir / VERSIONS_DIR
        self.store = StateStore(self.update_dir)
        self.hooks = HookRunner(self.config.hooks_dir, timeout_s=self.config.hook_timeout_s)
        self.device_id = resolve_device_id(self.config.device_id)

    # ------------------------------------------------------------------ public

    def status(self) -> UpdateState:
        return self.store.load()

    def current_path(self) -> Path | None:
        """The committed model file, or None when the update path installed nothing yet."""
        state = self.store.load()
        return self.versions_dir / state.current.file_name if state.current else None

    def check(self) -> CheckResult:
        """Refresh the signed metadata and say what this device would install."""
        with self._locked() as state:
            self._recover(state)
            result, _ = self._check(state, pin_version=None)
            return result

    def apply(self, *, pin_version: str | None = None) -> ApplyResult:
        """Bring the device to what its channel offers (or ``pin_version``), finishing interrupted work first."""
        with self._locked() as state:
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
        with self._locked() as state:
            self._recover(state)
            if state.phase is not Phase.IDLE:
                raise UpdateError(f"an update is in phase {state.phase}; run `edgert update apply` to finish it")
            previous, bad = state.previous, state.current
            if previous is None or bad is None or not self._file(previous).is_file():
                raise UpdateError("no previous model version is kept on this device")
            switch = self._switch()
            try:
                switch.load_beside(self._file(previous))
                switch.probe(self.config.health_check_timeout_s)
            except EdgertError:
                switch.release()
                raise
            state.blocklist = sorted({*state.blocklist, bad.key})
            state.current, state.previous = previous, None
            state.remember(f"{_now()} manual rollback {bad.key} -> {previous.key}")
            self._point_current(previous)
            self.store.save(state)
            switch.swap()
            switch.release()
            self._file(bad).unlink(missing_ok=True)
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
        target = client.target(choice.target)
        if target.meta is None:
            raise UntrustedMetadataError(f"{target.path} carries no signed edgert model metadata")
        problem = incompatibility(
            target.meta,
            edgert_version=__version__,
            ram_mib=psutil.virtual_memory().total // 2**20,
            max_bytes=self.config.max_target_bytes,
            length=target.length,
        )
        release = Release(
            meta=target.meta,
            target_path=target.path,
            length=target.length,
            hashes=target.hashes,
            file_name=version_file_name(target.meta.model_id, target.meta.version),
        )
        if problem is not None:
            return CheckResult(self.config.channel, self.device_id, current, None, f"{release.key} {problem}"), None
        if current == release.key:
            return CheckResult(self.config.channel, self.device_id, current, None, f"{current} is current"), None
        return CheckResult(self.config.channel, self.device_id, current, release, choice.reason), target

    # ------------------------------------------------------------------ download

    def _download(self, state: UpdateState, release: Release, target: SignedTarget) -> download.Fetched:
        state.phase, state.pending, state.activation_attempts = Phase.DOWNLOADING, release, 0
        state.remember(f"{_now()} downloading {release.key}")
        self.store.save(state)
        try:
            self._hook(HookEvent.PRE_DOWNLOAD, release, state)
        except HookVetoError as exc:
            self._abandon(state, f"pre-download hook vetoed {release.key}: {exc}")
            raise
        return self._fetch(state, release, target.url_path)

    def _resume_download(self, state: UpdateState) -> download.Fetched | None:
        pending = state.pending
        assert pending is not None  # phase downloading always has one
        result, target = self._check(state, pin_version=None)
        if result.offered is None or target is None or result.offered.key != pending.key:
            # The channel moved on (or blocklisted it): the old .part is worthless now.
            self._part(pending).unlink(missing_ok=True)
            self._abandon(state, f"download of {pending.key} dropped: {result.reason}")
            if result.offered is None or target is None:
                return None
            return self._download(state, result.offered, target)
        log.info("resuming the download of %s", pending.key)
        return self._fetch(state, pending, target.url_path)

    def _fetch(self, state: UpdateState, release: Release, url_path: str) -> download.Fetched:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        job = download.Fetch(
            url=self._targets_url() + url_path,
            part=self._part(release),
            length=release.length,
            hashes=release.hashes,
        )
        timeout = httpx.Timeout(self.config.download_timeout_s)
        try:
            with httpx.Client(timeout=timeout, follow_redirects=True) as client:
                fetched = download.fetch(
                    client, job, reserve_bytes=self.config.disk_reserve_bytes, progress=self._progress_for(release)
                )
        except (IntegrityError, InsufficientStorageError) as exc:
            self._abandon(state, f"download of {release.key} failed: {exc}")
            raise
        except DownloadError as exc:
            state.last_error = str(exc)  # phase stays downloading: the next run resumes the .part
            self.store.save(state)
            raise
        store.install_file(job.part, self._file(release))
        state.phase = Phase.STAGED
        state.remember(f"{_now()} verified {release.key} ({release.length} bytes)")
        self.store.save(state)
        return fetched

    # ------------------------------------------------------------------ stage, activate, commit

    def _stage_and_activate(self, state: UpdateState, fetched: download.Fetched) -> ApplyResult:
        release = state.pending
        assert release is not None and state.phase is Phase.STAGED
        path = self._file(release)
        if self.config.publisher_public_key is not None:
            try:
                self._verify_publisher(release, self.config.publisher_public_key)
            except publisher_signature.PublisherSignatureError as exc:
                self._abandon(state, f"{release.key} refused before staging: {exc}")
                path.unlink(missing_ok=True)
                raise
        try:
            validate_gguf(path)
        except ModelFileError as exc:
            return self._roll_back(state, f"{release.key} is not a loadable GGUF: {exc}", fetched)
        try:
            self._hook(HookEvent.PRE_INSTALL, release, state)
        except HookVetoError as exc:
            self._abandon(state, f"pre-install hook vetoed {release.key}: {exc}")
            path.unlink(missing_ok=True)
            raise
        self._hook(HookEvent.POST_INSTALL, release, state)
        switch = self._switch()
        state.phase = Phase.ACTIVATING
        state.activation_attempts += 1
        self.store.save(state)
        try:
            switch.load_beside(path)
            state.phase = Phase.HEALTH_CHECK
            self.store.save(state)
            switch.probe(self.config.health_check_timeout_s)
            self._hook(HookEvent.HEALTH_CHECK, release, state)
        except EdgertError as exc:
            switch.release()
            return self._roll_back(state, f"{release.key} failed its health check: {exc}", fetched)
        state.phase = Phase.COMMITTING
        self.store.save(state)
        switch.swap()
        self._finish_commit(state)
        switch.release()
        return ApplyResult(
            "committed", release.key, "installed, health-checked and serving", fetched.resumed_from, fetched.received
        )

    def _verify_publisher(self, release: Release, public_key: Path) -> None:
        """Fetch the release's model-signing bundle (a TUF-verified companion target) and verify the file.

        PublisherSignatureError when the bundle is missing, altered or does not verify; a
        registry that cannot be reached raises as usual and the staged file is kept for a retry.
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
                with httpx.Client(timeout=httpx.Timeout(self.config.download_timeout_s)) as http:
                    download.fetch(http, job)
            except IntegrityError as exc:
                raise publisher_signature.PublisherSignatureError(
                    f"{bundle_path} does not match its signed metadata: {exc}"
                ) from None
            publisher_signature.verify(self._file(release), job.part, public_key, workdir=self.settings.models_dir)
        log.info("publisher signature of %s verified", release.key)

    def _finish_commit(self, state: UpdateState) -> None:
        release = state.pending
        assert release is not None
        self._point_current(release)
        state.previous = state.current if state.current and state.current.key != release.key else state.previous
        state.current, state.pending = release, None
        state.phase, state.activation_attempts, state.last_error = Phase.IDLE, 0, None
        state.remember(f"{_now()} committed {release.key}")
        self.store.save(state)
        log.info("committed %s", release.key)
        self._collect_garbage(state)
        self._hook(HookEvent.ON_COMMIT, release, state)

    def _roll_back(self, state: UpdateState, reason: str, fetched: download.Fetched | None = None) -> ApplyResult:
        release = state.pending
        assert release is not None
        state.phase, state.rollback_reason = Phase.ROLLING_BACK, reason
        state.blocklist = sorted({*state.blocklist, release.key})
        self.store.save(state)
        self._finish_rollback(state)
        fetched = fetched or download.Fetched(0, 0)
        return ApplyResult("rolled-back", release.key, reason, fetched.resumed_from, fetched.received)

    def _finish_rollback(self, state: UpdateState) -> None:
        release, reason = state.pending, state.rollback_reason or "rollback"
        if release is not None and release.key not in {_key(state.current), _key(state.previous)}:
            self._file(release).unlink(missing_ok=True)
            self._part(release).unlink(missing_ok=True)
        state.pending, state.phase, state.activation_attempts = None, Phase.IDLE, 0
        state.rollback_reason, state.last_error = None, reason
        state.remember(f"{_now()} rolled back: {reason}")
        self.store.save(state)
        log.warning("rolled back: %s", reason)
        if release is not None:
            self._hook(HookEvent.ON_ROLLBACK, release, state, reason=reason)

    def _abandon(self, state: UpdateState, reason: str) -> None:
        """Stop an update that was never activated: nothing to roll back, nothing blocklisted."""
        state.pending, state.phase, state.activation_attempts, state.last_error = None, Phase.IDLE, 0, reason
        state.remember(f"{_now()} abandoned: {reason}")
        self.store.save(state)
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
            state.phase = Phase.STAGED  # the file was verified and renamed before activation began
            self.store.save(state)
        if state.phase is Phase.STAGED and state.pending and not self._file(state.pending).is_file():
            self._abandon(state, f"staged file of {state.pending.key} is missing")
        if state.phase is Phase.IDLE and state.current is not None:
            self._point_current(state.current)  # repair the link after a crash between state and link

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _locked(self) -> Iterator[UpdateState]:
        self.update_dir.mkdir(parents=True, exist_ok=True)
        with (self.update_dir / "lock").open("a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateBusyError("another update is running on this device") from None
            yield self.store.load()

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
        return self.versions_dir / release.file_name

    def _part(self, release: Release) -> Path:
        return store.part_path(self._file(release))

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
                log.info("removing old model file %s", path)
                path.unlink(missing_ok=True)
        store.fsync_dir(self.versions_dir)


def _key(release: Release | None) -> str | None:
    return blocklist_key(release.meta.model_id, release.meta.version) if release else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
