"""The device's update state machine: pure decisions plus one persisted JSON file.

Phases, each persisted *before* the step that it names starts::

    idle -> downloading -> staged -> activating -> health_check -> committing -> idle
                 |            |           |             |
                 +------------+-----------+-------------+--> rolling_back -> idle (+ blocklist)

After ``kill -9`` the file says where the work stopped, and :func:`recovery_for`
says what to do about it: a download resumes from its ``.part`` (a folder model's
from its staging folder: members verified before the crash are hashed again, not
fetched), a staged file or folder is re-checked and continues, an interrupted activation is retried until
``max_activation_attempts`` and then rolled back, and a commit or rollback that
began is finished. Nothing in this module does I/O except :class:`StateStore`.

Every phase change is one pure function below (:func:`start_download` … :func:`rolled_back`):
it takes the state and returns the next one, and refuses a move :data:`TRANSITIONS` does not
list with :class:`~edgert.errors.IllegalTransitionError`. The orchestrator acts (downloads,
loads, swaps) and saves what these functions return; it never sets a phase itself.

Over ~400 lines on purpose: the persisted model, the pure decisions and every transition are the
rules of the update path, read in one place; the I/O lives elsewhere (StateStore is its one file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgert import store
from edgert.errors import IllegalTransitionError, UpdateStateError
from edgert.log import scrub_urls
from edgert.update.manifest import ChannelPointer, ModelMeta, model_target_paths, version_key

STATE_FILE: Final = "state.json"
#: ``state.json.corrupt-<UTC time>``: an unreadable state file, moved aside
CORRUPT_SUFFIX: Final = ".corrupt-"
SCHEMA: Final = 1
#: Entries kept in the state's history list (the newest last).
HISTORY_LIMIT: Final = 20


class Phase(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    STAGED = "staged"
    ACTIVATING = "activating"
    HEALTH_CHECK = "health_check"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling_back"


class Member(BaseModel):
    """One file of a folder model, as its own signed target describes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Path relative to the model folder (validated by ModelMeta.files).
    path: str
    length: int = Field(ge=0)
    hashes: dict[str, str]
    #: The name to fetch under the targets URL (hash-prefixed: consistent snapshots).
    url_path: str


class Release(BaseModel):
    """One signed model version as the device knows it (what was verified, and where it lives)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    meta: ModelMeta
    #: The target carrying ``meta``: the GGUF itself, or a folder's ``genai_config.json``.
    target_path: str
    #: Signed bytes of the model: the GGUF's length, or the sum over a folder's members.
    length: int = Field(gt=0)
    #: Hashes of ``target_path``.
    hashes: dict[str, str]
    #: File (or folder) name under ``<models_dir>/versions/`` (checked by :func:`edgert.store.version_path`).
    file_name: str
    #: ``<st_dev>:<st_ino>`` of that file (or folder) once installed: a deletion checks it is still the same one.
    file_id: str | None = Field(None, pattern=r"^\d+:\d+$")
    #: Folder models: every member file, in ``meta.files`` order; empty for a GGUF.
    members: tuple[Member, ...] = ()
    #: The signed target of its evaluation set (``path`` = ``eval.jsonl``; it waits for the activation beside the
    #: model as ``versions/<file_name>.eval.jsonl``), when ``meta.evaluation`` says it has one.
    evaluation: Member | None = None

    @property
    def key(self) -> str:
        return blocklist_key(self.meta.model_id, self.meta.version)

    @property
    def is_folder(self) -> bool:
        return self.meta.is_folder


class EvalRecord(BaseModel):
    """The latest evaluation this device ran on a candidate (kept past its round; the fleet reads it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    release: str
    passed: int = Field(ge=0)
    total: int = Field(gt=0)
    threshold: float = Field(ge=0.0, le=1.0)
    #: Unix time it finished
    ts: float

    @property
    def score(self) -> float:
        return self.passed / self.total

    @property
    def met(self) -> bool:
        """The score reached the threshold (as :attr:`edgert.evalset.checks.EvalReport.ok` decided it)."""
        return self.score + 1e-9 >= self.threshold


class UpdateState(BaseModel):
    """Everything the update path remembers between runs.

    ``last_error`` and ``history`` are shown by ``/update/status`` and the MQTT deploy
    report: whoever sets them, URLs in them lose their credentials and query
    (validated on assignment too).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    schema_version: int = SCHEMA
    phase: Phase = Phase.IDLE
    current: Release | None = None
    #: The version before ``current``, kept on disk for ``edgert update rollback``.
    previous: Release | None = None
    #: The version being installed while phase is not idle.
    pending: Release | None = None
    #: ``<model-id>@<version>`` entries never to be installed again on this device.
    blocklist: list[str] = Field(default_factory=list)
    #: Activations of ``pending`` started (a crash while loading counts).
    activation_attempts: int = 0
    #: Why a rollback is running (phase rolling_back), for the on-rollback hook after a crash.
    rollback_reason: str | None = None
    #: Unix time the device entered ``phase`` (set where a move is saved; the fleet reads it in DeployState).
    phase_since: float | None = None
    #: ``<model-id>@<version>`` whose install was last undone (rolled back, vetoed or refused), and why: kept
    #: past the round (and a restart) so the fleet still sees it after the device returned to idle.
    last_rollback: str | None = None
    last_rollback_reason: str | None = None
    #: The latest evaluation of a candidate's evaluation set, passed or not.
    evaluation: EvalRecord | None = None
    last_check: datetime | None = None
    last_error: str | None = None
    history: list[str] = Field(default_factory=list)

    def remember(self, line: str) -> None:
        self.history = [*self.history, line][-HISTORY_LIMIT:]

    @field_validator("last_error", "last_rollback_reason", mode="after")
    @classmethod
    def _scrub_error(cls, value: str | None) -> str | None:
        return scrub_urls(value) if value is not None else None

    @field_validator("history", mode="after")
    @classmethod
    def _scrub_history(cls, value: list[str]) -> list[str]:
        return [scrub_urls(line) for line in value]


def blocklist_key(model_id: str, version: str) -> str:
    return f"{model_id}@{version}"


# --------------------------------------------------------------------------- pure decisions


def rollout_bucket(device_id: str, model_id: str, version: str) -> int:
    """A device's stable bucket 0..99 for one release: the same device always gets the same answer.

    Keyed by the release as well as the device, so the first 20% of one rollout are
    not always the same devices (the canaries change from release to release).
    """
    digest = hashlib.sha256(f"{device_id}\n{model_id}\n{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def in_rollout(device_id: str, pointer: ChannelPointer) -> bool:
    return rollout_bucket(device_id, pointer.model_id, pointer.version) < pointer.rollout


@dataclass(frozen=True, slots=True)
class Choice:
    """What the channel offers this device: a target path to install, or None with the reason."""

    target: str | None
    reason: str
    #: Where else the version's metadata may be (a pinned version of unknown format: its folder anchor).
    fallback: str | None = None


def choose_target(
    pointer: ChannelPointer | None,
    *,
    device_id: str,
    blocklist: list[str],
    pin_version: str | None = None,
) -> Choice:
    """Pick the channel's new version when the device is in its rollout, else its previous one.

    Never a blocklisted version. ``pin_version`` (an operator's explicit request)
    names a version of the channel's model and skips the rollout check.
    """
    if pointer is None:
        return Choice(None, "the channel has no model")
    if pin_version is not None:
        if blocklist_key(pointer.model_id, pin_version) in blocklist:
            return Choice(None, f"{pointer.model_id}@{pin_version} is blocklisted on this device")
        gguf, folder = model_target_paths(pointer.model_id, pin_version)
        return Choice(gguf, "pinned by the operator", fallback=folder)
    candidates: list[tuple[str, str, str]] = []
    if in_rollout(device_id, pointer):
        candidates.append((pointer.version, pointer.target, f"in the {pointer.rollout}% rollout"))
    if pointer.previous_version is not None and pointer.previous_target is not None:
        candidates.append((pointer.previous_version, pointer.previous_target, "the channel's previous version"))
    for version, target, why in candidates:
        if blocklist_key(pointer.model_id, version) not in blocklist:
            return Choice(target, f"{pointer.model_id}@{version}: {why}")
    if not candidates:
        return Choice(None, f"outside the {pointer.rollout}% rollout of {pointer.model_id}@{pointer.version}")
    return Choice(None, "every version the channel offers this device is blocklisted")


def incompatibility(
    meta: ModelMeta, *, edgert_version: str, ram_mib: int | None, max_bytes: int, length: int
) -> str | None:
    """Why this device must not install a signed release, or None when it may."""
    if version_key(edgert_version) < version_key(meta.min_edgert_version):
        return f"needs edgert >= {meta.min_edgert_version} (this is {edgert_version})"
    if length > max_bytes:
        return f"{length} bytes is more than update.max_target_bytes ({max_bytes})"
    if ram_mib is not None and meta.ram_mib > ram_mib:
        return f"needs {meta.ram_mib} MiB of memory, this device has {ram_mib} MiB"
    return None


class Recovery(StrEnum):
    NOTHING = "nothing"
    RESUME_DOWNLOAD = "resume_download"
    CONTINUE_STAGED = "continue_staged"
    RETRY_ACTIVATION = "retry_activation"
    ROLL_BACK = "roll_back"
    FINISH_COMMIT = "finish_commit"
    FINISH_ROLLBACK = "finish_rollback"


def recovery_for(state: UpdateState, *, max_activation_attempts: int) -> Recovery:
    """What a restarted updater does with the phase a dead process left behind."""
    if state.phase is Phase.ROLLING_BACK:
        return Recovery.FINISH_ROLLBACK
    if state.phase is Phase.IDLE or state.pending is None:
        return Recovery.NOTHING
    if state.phase in (Phase.ACTIVATING, Phase.HEALTH_CHECK):
        # The new model may be what killed the process (llama.cpp aborts on some bad
        # files): retry a bounded number of times, then give up on that version.
        if state.activation_attempts >= max_activation_attempts:
            return Recovery.ROLL_BACK
        return Recovery.RETRY_ACTIVATION
    return _RESUME[state.phase]


_RESUME: Final = {
    Phase.DOWNLOADING: Recovery.RESUME_DOWNLOAD,
    Phase.STAGED: Recovery.CONTINUE_STAGED,
    Phase.COMMITTING: Recovery.FINISH_COMMIT,
}


# --------------------------------------------------------------------------- transitions

#: Every phase change the update path may make; anything else is a bug (IllegalTransitionError).
TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.IDLE: frozenset({Phase.DOWNLOADING}),
    # staged once verified; idle when abandoned (veto, bytes that never verify, no room, the channel moved on)
    Phase.DOWNLOADING: frozenset({Phase.STAGED, Phase.IDLE}),
    # rolling back when the file is not a loadable model; idle when abandoned (veto, bad publisher signature)
    Phase.STAGED: frozenset({Phase.ACTIVATING, Phase.ROLLING_BACK, Phase.IDLE}),
    # staged again: an interrupted activation is retried (bounded by max_activation_attempts)
    Phase.ACTIVATING: frozenset({Phase.HEALTH_CHECK, Phase.ROLLING_BACK, Phase.STAGED}),
    Phase.HEALTH_CHECK: frozenset({Phase.COMMITTING, Phase.ROLLING_BACK, Phase.STAGED}),
    Phase.COMMITTING: frozenset({Phase.IDLE}),
    Phase.ROLLING_BACK: frozenset({Phase.IDLE}),
}


def check_move(source: Phase, target: Phase) -> None:
    """Refuse a phase change that :data:`TRANSITIONS` does not list."""
    if target not in TRANSITIONS[source]:
        raise IllegalTransitionError(f"the update path cannot go from {source} to {target}")


def _moved(
    state: UpdateState, sources: frozenset[Phase], target: Phase, line: str | None = None, **changes: object
) -> UpdateState:
    """``state`` moved to ``target``: only from one of the step's ``sources``, and only along :data:`TRANSITIONS`."""
    if state.phase not in sources:
        raise IllegalTransitionError(f"the update path cannot go from {state.phase} to {target} this way")
    check_move(state.phase, target)
    moved = state.model_copy(update={"phase": target, **changes})
    if line is not None:
        moved.history = [*state.history, line][-HISTORY_LIMIT:]
    return UpdateState.model_validate(moved.model_dump())  # validated: no illegal value slips in by the copy


_IDLE: Final = frozenset({Phase.IDLE})
_DOWNLOADING: Final = frozenset({Phase.DOWNLOADING})
_STAGED: Final = frozenset({Phase.STAGED})
_ACTIVATING: Final = frozenset({Phase.ACTIVATING})
_HEALTH_CHECK: Final = frozenset({Phase.HEALTH_CHECK})
#: a model being loaded or probed
_LOADING: Final = frozenset({Phase.ACTIVATING, Phase.HEALTH_CHECK})
_COMMITTING: Final = frozenset({Phase.COMMITTING})
_ROLLING_BACK: Final = frozenset({Phase.ROLLING_BACK})


def _pending(state: UpdateState) -> Release:
    if state.pending is None:
        raise IllegalTransitionError(f"phase {state.phase} without a pending release")
    return state.pending


def start_download(state: UpdateState, release: Release, *, now: str) -> UpdateState:
    """idle -> downloading ``release`` (the activation count starts afresh)."""
    return _moved(
        state, _IDLE, Phase.DOWNLOADING, f"{now} downloading {release.key}", pending=release, activation_attempts=0
    )


def staged(state: UpdateState, release: Release, *, now: str) -> UpdateState:
    """downloading -> staged: ``release`` (with its installed file's identity) is verified under its final name."""
    files = f", {len(release.members)} files" if release.is_folder else ""
    return _moved(
        state,
        _DOWNLOADING,
        Phase.STAGED,
        f"{now} verified {release.key} ({release.length} bytes{files})",
        pending=release,
    )


def begin_activation(state: UpdateState) -> UpdateState:
    """staged -> activating: one more attempt counted before the model is loaded (a crash while loading counts)."""
    _pending(state)
    return _moved(state, _STAGED, Phase.ACTIVATING, activation_attempts=state.activation_attempts + 1)


def begin_health_check(state: UpdateState) -> UpdateState:
    """activating -> health_check: loaded beside the serving model, now probed."""
    return _moved(state, _ACTIVATING, Phase.HEALTH_CHECK)


def retry_activation(state: UpdateState) -> UpdateState:
    """activating | health_check -> staged: the process died while activating; the verified file stays."""
    return _moved(state, _LOADING, Phase.STAGED)


def begin_commit(state: UpdateState) -> UpdateState:
    """health_check -> committing: the new model passed; the swap and the commit come next."""
    return _moved(state, _HEALTH_CHECK, Phase.COMMITTING)


def committed(state: UpdateState, *, now: str) -> UpdateState:
    """committing -> idle: the pending release is current, the one before it kept as previous."""
    release = _pending(state)
    previous = state.current if state.current and state.current.key != release.key else state.previous
    return _moved(
        state,
        _COMMITTING,
        Phase.IDLE,
        f"{now} committed {release.key}",
        current=release,
        previous=previous,
        pending=None,
        activation_attempts=0,
        last_error=None,
    )


def begin_rollback(state: UpdateState, reason: str) -> UpdateState:
    """staged | activating | health_check -> rolling_back: the pending release is blocklisted on this device."""
    release = _pending(state)
    blocklist = sorted({*state.blocklist, release.key})
    return _moved(state, _STAGED | _LOADING, Phase.ROLLING_BACK, rollback_reason=reason, blocklist=blocklist)


def rolled_back(state: UpdateState, *, now: str) -> UpdateState:
    """rolling_back -> idle: nothing pending, the reason kept as ``last_error``."""
    reason = state.rollback_reason or "rollback"
    return _moved(
        state,
        _ROLLING_BACK,
        Phase.IDLE,
        f"{now} rolled back: {reason}",
        pending=None,
        activation_attempts=0,
        rollback_reason=None,
        last_error=reason,
        last_rollback=state.pending.key if state.pending else None,
        last_rollback_reason=reason,
    )


def abandoned(state: UpdateState, reason: str, *, now: str, refused: bool = False) -> UpdateState:
    """downloading | staged -> idle: an update never activated stops; nothing to roll back, nothing blocklisted.

    ``refused``: this device said no to the release itself (a hook veto, a bad publisher signature), which the
    fleet counts like a rollback; a download the channel dropped or the disk could not hold is not.
    """
    undone = {"last_rollback": _pending(state).key, "last_rollback_reason": reason} if refused else {}
    return _moved(
        state,
        _DOWNLOADING | _STAGED,
        Phase.IDLE,
        f"{now} abandoned: {reason}",
        pending=None,
        activation_attempts=0,
        last_error=reason,
        **undone,
    )


def manual_rollback(state: UpdateState, *, now: str) -> UpdateState:
    """idle -> idle: the previous release becomes current again and the current one is blocklisted."""
    if state.phase is not Phase.IDLE or state.previous is None or state.current is None:
        raise IllegalTransitionError(f"a manual rollback needs phase idle and a previous release ({state.phase})")
    previous, bad = state.previous, state.current
    moved = state.model_copy(
        update={
            "blocklist": sorted({*state.blocklist, bad.key}),
            "current": previous,
            "previous": None,
            "last_rollback": bad.key,
            "last_rollback_reason": f"manual rollback to {previous.key}",
        }
    )
    moved.history = [*state.history, f"{now} manual rollback {bad.key} -> {previous.key}"][-HISTORY_LIMIT:]
    return UpdateState.model_validate(moved.model_dump())


# --------------------------------------------------------------------------- persistence


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old content or the new, never a mix."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        store.install_file(tmp, path)  # fsync file, rename, fsync directory
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class StateStore:
    """``<state_dir>/update/state.json``, written atomically on every change.

    An unreadable file (truncated, not JSON, not this schema) is moved aside by the
    daemon (:meth:`quarantine`) so it can start and serve its committed model; while
    a quarantined file is there and no new state, :meth:`load` keeps refusing: a fresh,
    empty state would forget the blocklist and reinstall a release that was rolled
    back. A state written by a newer edgert is refused but left in place (the newer
    version may run here again).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> UpdateState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            quarantined = self.quarantined()
            if quarantined:
                raise UpdateStateError(
                    f"updates are off: the unreadable update state was moved to {quarantined[-1]}; "
                    f"repair it back to {self.path}, or delete it to start afresh (forgetting the blocklist)"
                ) from None
            return UpdateState()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UpdateStateError(f"update state {self.path} is unreadable ({exc})") from None
        if _written_by_newer(data):
            raise UpdateStateError(
                f"update state {self.path} was written by a newer edgert (schema {data['schema_version']}, this "
                f"one reads {SCHEMA}): updates are off until that version runs again or the file is removed"
            )
        try:
            return UpdateState.model_validate(data)
        except ValidationError as exc:
            problem = f"{exc.error_count()} invalid fields, first: {exc.errors()[0]['loc']}"
            raise UpdateStateError(f"update state {self.path} is unreadable ({problem})") from None

    def set_aside_unreadable(self) -> Path | None:
        """Quarantine the state file if it cannot be read; leave it if it is fine, missing or a newer edgert's."""
        try:
            self.load()
        except UpdateStateError:
            if self.path.is_file() and not self._newer_on_disk():
                return self.quarantine()
        return None

    def _newer_on_disk(self) -> bool:
        try:
            return _written_by_newer(json.loads(self.path.read_bytes()))
        except (OSError, ValueError):
            return False

    def quarantined(self) -> list[Path]:
        """State files moved aside as unreadable, oldest first."""
        return sorted(self.directory.glob(f"{STATE_FILE}{CORRUPT_SUFFIX}*"))

    def quarantine(self) -> Path:
        """Move an unreadable state file aside as ``state.json.corrupt-<UTC time>`` (kept for a post-mortem)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{STATE_FILE}{CORRUPT_SUFFIX}{stamp}")
        self.path.replace(target)
        store.fsync_dir(self.directory)
        return target

    def save(self, state: UpdateState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, state.model_dump_json(indent=2).encode() + b"\n")


def _written_by_newer(data: object) -> bool:
    """A state whose schema is newer than this edgert reads (left in place for that version)."""
    written_by = data.get("schema_version") if isinstance(data, dict) else None
    return isinstance(written_by, int) and written_by > SCHEMA
