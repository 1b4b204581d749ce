"""Drives one device update: registry.fetch -> verify -> stage -> activate -> healthcheck -> commit | rollback.

Each step persists its phase before it starts (the phase changes are the pure transitions of
:mod:`edgert.update.state`, which refuse an illegal move; this module acts and saves), under
an exclusive file lock, so ``kill -9`` anywhere leaves a state that the next run
finishes: it resumes the download, continues a staged file, retries an
interrupted activation (bounded), or completes a commit or rollback that began.

Read the steps in order: :mod:`~edgert.update.check` (what to install, one registry client per
round) -> :mod:`~edgert.update.fetch` (download and verify into ``versions/``) ->
:mod:`~edgert.update.activate` (load, probe, swap, commit or roll back); :mod:`~edgert.update.core`
holds what they share (the lock, the round, saving a transition, hooks), :mod:`edgert.store` the
disk layout below. This module is the public :class:`Updater` and the recovery after a crash.

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

import logging
from pathlib import Path

from edgert.errors import (
    EdgertError,
    UpdateError,
)
from edgert.store import CURRENT_LINK, VERSIONS_DIR
from edgert.update import download
from edgert.update.activate import Activating, ApplyResult
from edgert.update.check import CheckResult
from edgert.update.core import key_of, release_identity, utc_now, version_file_name
from edgert.update.hooks import HookEvent
from edgert.update.state import (
    Phase,
    Recovery,
    UpdateState,
    manual_rollback,
    recovery_for,
    retry_activation,
)

log = logging.getLogger(__name__)

#: what callers of the update path import from here (the steps live in check, fetch, activate)
__all__ = [
    "CURRENT_LINK",
    "VERSIONS_DIR",
    "ApplyResult",
    "CheckResult",
    "Updater",
    "release_identity",
    "version_file_name",
]


class Updater(Activating):
    """The device update path for one state directory: check, apply, rollback, status."""

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
                    return ApplyResult("up-to-date", key_of(state.current), "the interrupted download is not offered")
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
            moved = manual_rollback(state, now=utc_now())
            self._point_current(previous)
            self._move(state, moved)
            switch.swap()
            switch.release()
            self._remove(bad)
            self._hook(HookEvent.ON_ROLLBACK, bad, state, reason=f"manual rollback to {previous.key}")
            return ApplyResult("rolled-back-manually", previous.key, f"{bad.key} is blocklisted on this device")

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
            self._roll_back(state, f"the process died during {attempts} activations of {key_of(state.pending)}")
        elif action is Recovery.RETRY_ACTIVATION:
            self._move(state, retry_activation(state))  # the file was verified and renamed before activation began
        if state.phase is Phase.STAGED and state.pending and not self._present(state.pending):
            self._abandon(state, f"staged file of {state.pending.key} is missing")
        if state.phase is Phase.IDLE and state.current is not None:
            self._point_current(state.current)  # repair the link after a crash between state and link
