"""The parts every step of a device update shares: the lock, the round, saving a transition, hooks, paths.

Read in order: :mod:`~edgert.update.check` (what to install) -> :mod:`~edgert.update.fetch`
(download and verify into ``versions/``) -> :mod:`~edgert.update.activate` (load, probe, swap,
commit or roll back) -> :mod:`~edgert.update.orchestrator` (the public Updater: apply, rollback,
recovery after a crash). Each is a layer of one class; the phase changes are the pure transitions
of :mod:`edgert.update.state`, the disk layout is :mod:`edgert.store`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import httpx

from edgert import store
from edgert.device import resolve_device_id
from edgert.errors import (
    UpdateBusyError,
    UpdateError,
)
from edgert.identity import ReleaseIdentity
from edgert.settings import Settings
from edgert.update import download, failures
from edgert.update.hooks import HookEvent, HookRunner
from edgert.update.registry import RegistryClient
from edgert.update.state import (
    Release,
    StateStore,
    UpdateState,
    abandoned,
    blocklist_key,
)
from edgert.update.switch import ModelSwitch

log = logging.getLogger(__name__)

#: An evaluation set's name beside its release under ``versions/``.
EVAL_SUFFIX = ".eval.jsonl"

#: Told every saved move of the update path, with a copy of the state saved (on the round's worker thread).
PhaseListener = Callable[[UpdateState], None]


def release_identity(release: Release) -> ReleaseIdentity:
    """Who ``release`` is, for the serving side: from its signed metadata, never from a file name."""
    sha256 = release.hashes.get("sha256")
    return ReleaseIdentity(release.meta.model_id, release.meta.version, f"sha256:{sha256}" if sha256 else None)


def version_file_name(model_id: str, version: str, *, folder: bool = False, pair: bool = False) -> str:
    """The release's name under ``versions/`` (injective: :func:`edgert.store.version_name`)."""
    return store.version_name(model_id, version, folder=folder, pair=pair)


class UpdaterCore:
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
        self.versions_dir = settings.models_dir / store.VERSIONS_DIR
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

        #: the round's one registry client (refreshed once per round; :meth:`_registry`)
        self._client: RegistryClient | None = None
        #: told each move once it is saved (the daemon publishes it to the fleet at once); plain data only, so
        #: the update path knows nothing of who listens
        self.on_phase: PhaseListener | None = None

    def _move(self, state: UpdateState, moved: UpdateState) -> None:
        """Save the state a transition (:mod:`edgert.update.state`) returned, as the round's one state object.

        The round's ``state`` is updated in place: its failure handling (:meth:`_round`) records on it.
        """
        if moved.phase is not state.phase or state.phase_since is None:
            moved.phase_since = time.time()
        for name in UpdateState.model_fields:
            setattr(state, name, getattr(moved, name))
        self.store.save(state)
        if self.on_phase is not None:
            try:
                self.on_phase(state.model_copy(deep=True))  # the round goes on changing its own object
            except Exception:  # a listener's bug never stops an update half-way
                log.exception("the update phase listener failed")

    @contextlib.contextmanager
    def _round(self, doing: str) -> Iterator[UpdateState]:
        """One locked run of the update path; its failure is recorded in the state and named by its class.

        The boundary of the update path: OS and subprocess errors leave as UpdateErrors
        (:func:`failures.converted`), so every caller sees edgert errors (a bug excepted).
        """
        try:
            with self._locked() as state:
                self._client = None  # metadata is refreshed once per round, by the round's first use
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
        state.remember(f"{utc_now()} failed ({reason}): {message}")
        try:
            self.store.save(state)
        except OSError as save_error:
            log.warning("could not record the failed update round in %s: %s", self.store.path, save_error)

    def hold_lock(self) -> None:
        """Take the update lock now and keep it (``keep_lock``); UpdateError when it cannot be had yet."""
        if not self._round_lock.acquire(blocking=False):
            raise UpdateBusyError("another update is running on this device")
        try:
            if self._held is None:
                self._held = self._take_lock()
        finally:
            self._round_lock.release()

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

    def _abandon(self, state: UpdateState, reason: str, *, refused: bool = False) -> None:
        """Stop an update that was never activated: nothing to roll back, nothing blocklisted.

        ``refused``: the device refused the release itself (hook veto, publisher signature); reported as undone.
        """
        self._move(state, abandoned(state, reason, now=utc_now(), refused=refused))
        log.warning("%s", reason)

    def _registry(self) -> RegistryClient:
        """The round's one registry client: created and refreshed on first use, then shared by its steps."""
        if self._client is None:
            if not self.config.registry_url:
                raise UpdateError("update.registry_url is not set: this device has no registry")
            client = RegistryClient(
                cache_dir=self.update_dir / "tuf",
                registry_url=self.config.registry_url,
                trusted_root=self.config.trusted_root,
            )
            client.refresh()
            self._client = client
        return self._client

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

    def _evaluation_file(self, release: Release) -> Path:
        """Where the release's evaluation set waits for its activation: ``versions/<file>.eval.jsonl`` (the next
        commit's garbage collection deletes it, as every name but the kept releases')."""
        return store.version_path(self.versions_dir, release.file_name + EVAL_SUFFIX)

    def _http(self) -> httpx.Client:
        """The client every target download uses (large socket reads; see :func:`download.client`)."""
        return download.client(httpx.Timeout(self.config.download_timeout_s))

    def _staging(self, release: Release) -> Path:
        """Where a folder release is assembled until every member is verified."""
        return store.staging_path(self.versions_dir, release.file_name)

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
            store.discard(path)
        self._part(release).unlink(missing_ok=True)
        store.discard(self._staging(release))
        for evaluation in (self._evaluation_file(release), store.part_path(self._evaluation_file(release))):
            evaluation.unlink(missing_ok=True)

    def _point_current(self, release: Release) -> None:
        store.point_current(self.settings.models_dir, release.file_name)

    def _collect_garbage(self, state: UpdateState) -> None:
        """Keep the current and previous releases; delete older ones and stray partial downloads."""
        keep = {r.file_name for r in (state.current, state.previous) if r is not None}
        for path in store.collect_garbage(self.versions_dir, keep):
            log.info("removed old model %s", path)


def key_of(release: Release | None) -> str | None:
    return blocklist_key(release.meta.model_id, release.meta.version) if release else None


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
