"""Step 2 of an update round: download the offered release, verify it, and install it under ``versions/``.

A GGUF goes through ``<name>.part`` (resumable, signed length cap, hashes, fsync); a folder release
is assembled all or nothing in its staging folder (:func:`edgert.store.staging_path`) and renamed
into place once every member (and, when required, the publisher's bundle) has verified. Ends in
phase ``staged``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from edgert import store
from edgert.errors import (
    DownloadError,
    HookVetoError,
    InsufficientStorageError,
    IntegrityError,
    TargetNotFoundError,
)
from edgert.update import download, publisher_signature
from edgert.update.check import Checking
from edgert.update.core import utc_now
from edgert.update.hooks import HookEvent
from edgert.update.registry import SignedTarget
from edgert.update.state import (
    Member,
    Release,
    UpdateState,
    staged,
    start_download,
)

log = logging.getLogger(__name__)


class Fetching(Checking):
    """Download, verify and install a release's bytes."""

    def _download(self, state: UpdateState, release: Release, target: SignedTarget) -> download.Fetched:
        self._move(state, start_download(state, release, now=utc_now()))
        try:
            self._hook(HookEvent.PRE_DOWNLOAD, release, state)
        except HookVetoError as exc:
            self._abandon(state, f"pre-download hook vetoed {release.key}: {exc}", refused=True)
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
            store.discard(self._staging(pending))
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
            self._fetch_evaluation(release, client)
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
        store.discard(final)
        staging.mkdir(exist_ok=True)
        report = self._progress_for(release)
        resumed = received = done = 0
        # one bad member: nothing of this release is kept
        with self._download_failures(state, release, discard=staging):
            kept = sum(_kept_bytes(staging, member) for member in release.members)
            download.check_free_space(self.versions_dir, release.length - kept, self.config.disk_reserve_bytes)
            with self._http() as client:
                self._fetch_evaluation(release, client)
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
                store.discard(discard)
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
            store.discard(staging)
            self._abandon(state, f"{release.key} refused before staging: {exc}", refused=True)
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

    def _fetch_evaluation(self, release: Release, client: httpx.Client) -> Path | None:
        """The release's evaluation set (none: None), verified against its signed target, beside its model.

        Fetched with the release; at activation it is only hashed again (fetched again if it went missing).
        """
        if release.evaluation is None:
            return None
        path = self._evaluation_file(release)
        self._fetch_member(client, path.parent, release.evaluation.model_copy(update={"path": path.name}), _no_progress)
        return path

    def _staged(self, state: UpdateState, release: Release) -> None:
        # Its identity now, so a later deletion can tell the file is still this release's own.
        identity = store.file_id(self._file(release))
        installed = release.model_copy(update={"file_id": str(identity) if identity else None})
        self._move(state, staged(state, installed, now=utc_now()))

    def _verify_publisher(self, release: Release, model: Path, public_key: Path) -> None:
        """Fetch the release's model-signing bundle (a TUF-verified companion target) and verify ``model``.

        ``model`` is the verified GGUF file, or a folder release's verified staging folder (which
        must hold exactly the release's members). PublisherSignatureError when the bundle is
        missing, altered or does not verify; a registry that cannot be reached raises as usual
        and the downloaded file(s) are kept for a retry.
        """
        client = self._registry()
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


def _no_progress(_done: int, _total: int) -> None:
    """An evaluation set is a few KiB: its download is not the release's progress."""


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
