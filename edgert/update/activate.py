"""Step 3 of an update round: validate the staged release, load it beside the serving model, probe it, swap.

A release with a projector must first pair (:func:`edgert.projector.check_pair_files`: a Gemma 4
GGUF and a projector projecting into its embedding width), and one with an MTP drafter must fit it
(:func:`edgert.drafter_file.check_drafter_files`), else it is rolled back and blocklisted before anything
loads. A release with an evaluation set (:mod:`edgert.evalset`) runs it on the loaded
candidate after the probe; a score under the release's signed threshold fails the health check (the
reason names the score and the first failing case), and the score is kept in the state either way.
Then commit (``current`` link, GC of older releases, the ``on-commit`` hook) or roll back and
blocklist it. The old model keeps serving until the new one has loaded and passed its probe and the
``health-check`` hooks (see :class:`~edgert.update.switch.ModelSwitch`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from edgert import store
from edgert.drafter_file import check_drafter_files
from edgert.errors import (
    EdgertError,
    EvalSetError,
    EvaluationFailedError,
    HookVetoError,
    IntegrityError,
    ModelFileError,
)
from edgert.evalset.cases import EvalSet, parse_eval_set
from edgert.gguf_file import validate_gguf
from edgert.onnx_folder import validate_onnx_folder
from edgert.projector import check_pair_files
from edgert.update import download, publisher_signature
from edgert.update.core import key_of, release_identity, utc_now
from edgert.update.fetch import Fetching
from edgert.update.hooks import HookEvent
from edgert.update.state import (
    EvalRecord,
    Phase,
    Release,
    UpdateState,
    begin_activation,
    begin_commit,
    begin_health_check,
    begin_rollback,
    committed,
    rolled_back,
)
from edgert.update.switch import ModelSwitch

log = logging.getLogger(__name__)

Outcome = Literal["up-to-date", "committed", "rolled-back", "rolled-back-manually"]
#: What each release format must be to load, for the rollback reason.
_KINDS: Final = {
    "gguf": "GGUF",
    "onnx-genai": "ONNX Runtime GenAI folder",
    "gguf-mmproj": "GGUF with its multimodal projector / MTP drafter",
}


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outcome: Outcome
    release: str | None
    detail: str
    resumed_from: int = 0
    downloaded_bytes: int = 0


def _check_loadable(model_format: str, files: tuple[str, ...], path: Path) -> None:
    """Raise :class:`ModelFileError` unless the staged release at ``path`` will load (header checks only)."""
    if model_format == "gguf-mmproj":
        # a projector for another model would be refused by llama.cpp only after loading both,
        # and a drafter for another model aborts the process inside llama.cpp
        if store.PAIR_PROJECTOR in files:
            check_pair_files(path / store.PAIR_MODEL, path / store.PAIR_PROJECTOR)
        if store.PAIR_DRAFTER in files:
            check_drafter_files(path / store.PAIR_MODEL, path / store.PAIR_DRAFTER)
        validate_gguf(path / store.PAIR_MODEL)
    elif model_format == "onnx-genai":
        validate_onnx_folder(path)
    else:
        validate_gguf(path)


class Activating(Fetching):
    """Stage, activate, health-check, then commit or roll back."""

    def _stage_and_activate(self, state: UpdateState, fetched: download.Fetched) -> ApplyResult:
        release = state.pending
        assert release is not None and state.phase is Phase.STAGED
        path = self._file(release)
        # A folder's publisher signature was verified on its staging folder, before the rename.
        if self.config.publisher_public_key is not None and not release.is_folder:
            try:
                self._verify_publisher(release, path, self.config.publisher_public_key)
            except publisher_signature.PublisherSignatureError as exc:
                self._abandon(state, f"{release.key} refused before staging: {exc}", refused=True)
                self._remove(release)
                raise
        try:
            _check_loadable(release.meta.format, release.meta.files, path)
        except ModelFileError as exc:
            what = _KINDS[release.meta.format]
            return self._roll_back(state, f"{release.key} is not a loadable {what}: {exc}", fetched)
        try:
            self._hook(HookEvent.PRE_INSTALL, release, state)
        except HookVetoError as exc:
            self._abandon(state, f"pre-install hook vetoed {release.key}: {exc}", refused=True)
            self._remove(release)
            raise
        self._hook(HookEvent.POST_INSTALL, release, state)
        try:
            eval_set = self._evaluation_set(state, release)
        except EvalSetError as exc:
            return self._roll_back(state, f"{release.key} carries an invalid evaluation set: {exc}", fetched)
        switch = self._switch()
        self._move(state, begin_activation(state))
        try:
            switch.load_beside(path, release_identity(release))
            self._move(state, begin_health_check(state))
            switch.probe(self.config.health_check_timeout_s)
            if eval_set is not None:
                self._evaluate(state, release, switch, eval_set)
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

    def _evaluation_set(self, state: UpdateState, release: Release) -> EvalSet | None:
        """The release's verified evaluation set (hashed again; fetched again only if it went missing), parsed.

        Bytes that no longer verify abandon the release (its model deleted too, as a refused release's);
        a registry out of reach keeps it staged for the next round. EvalSetError: not a valid set.
        """
        if release.evaluation is None:
            return None
        try:
            with self._download_failures(state, release), self._http() as client:
                path = self._fetch_evaluation(release, client)
        except IntegrityError:
            self._remove(release)
            raise
        assert path is not None
        return parse_eval_set(path.read_bytes(), path.name)

    def _evaluate(self, state: UpdateState, release: Release, switch: ModelSwitch, eval_set: EvalSet) -> None:
        """Run the set on the loaded candidate and keep its score; EvaluationFailedError under the threshold."""
        assert release.meta.evaluation is not None  # a release has an evaluation set only with its gate
        threshold = release.meta.evaluation.threshold
        report = switch.evaluate(
            eval_set,
            threshold=threshold,
            budget_s=self.config.eval_timeout_s,
            max_tokens=self.config.eval_max_tokens,
        )
        state.evaluation = EvalRecord(
            release=release.key, passed=report.passed, total=report.total, threshold=threshold, ts=time.time()
        )
        self.store.save(state)
        log.info("%s: %s", release.key, report.summary())
        if not report.ok:
            raise EvaluationFailedError(report.summary())

    def _finish_commit(self, state: UpdateState) -> None:
        release = state.pending
        assert release is not None
        self._point_current(release)
        self._move(state, committed(state, now=utc_now()))
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
        if release is not None and release.key not in {key_of(state.current), key_of(state.previous)}:
            self._remove(release)
        self._move(state, rolled_back(state, now=utc_now()))
        log.warning("rolled back: %s", reason)
        if release is not None:
            self._hook(HookEvent.ON_ROLLBACK, release, state, reason=reason)
