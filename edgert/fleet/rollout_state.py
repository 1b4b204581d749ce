"""The rollout controller's memory: one JSON file, written atomically before each action it names.

``edgert fleet rollout`` saves where it stands *before* it acts (promote a wave, re-sign the channel back),
so a controller killed at any point and started again with the same release reads what it was about to do
and does it (every action is idempotent: promoting the same pointer again changes nothing devices see).
The file (default ``<registry>/rollouts/<channel>.json``) holds one rollout per channel::

    running  -> (wave passes)* -> done
             -> halting (the channel is being re-signed back) -> halted

A different release on the same channel is refused while the file's rollout is unfinished (``running`` or
``halting``), unless the operator abandons it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgert.errors import RolloutError
from edgert.update.state import blocklist_key, write_atomic

SCHEMA: Final = 1
ROLLOUTS_DIR: Final = "rollouts"


class Status(StrEnum):
    RUNNING = "running"
    #: the decision to halt is made and saved; the channel's re-signing back may not be published yet
    HALTING = "halting"
    HALTED = "halted"
    DONE = "done"
    ABANDONED = "abandoned"


#: statuses of a rollout that still has work to do
UNFINISHED: Final = frozenset({Status.RUNNING, Status.HALTING})


class WaveResult(BaseModel):
    """One finished wave, as the controller judged it."""

    model_config = ConfigDict(extra="forbid")

    percent: int = Field(ge=0, le=100, description="The percentage promoted (after --min-devices raised it)")
    asked: int = Field(ge=0, le=100, description="The percentage --waves asked for")
    devices: int = Field(ge=0, description="Devices the wave held")
    updated: int = Field(ge=0)
    failed: int = Field(ge=0)
    silent: list[str] = Field(default_factory=list, description="Devices that did not report (offline or no answer)")
    verdict: str
    reason: str
    finished: datetime


class RolloutState(BaseModel):
    """One rollout of one release on one channel."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    schema_version: int = SCHEMA
    model_id: str
    version: str
    channel: str
    #: the release devices go back to on a halt (model id and version); None: the channel offered nothing
    previous_model: str | None = None
    previous_version: str | None = None
    waves: list[int]
    #: devices of the channel that were offline when the rollout started: the only offline ones not waited for
    offline_at_start: list[str] = Field(default_factory=list)
    #: the percentage the channel already offered the release when the rollout started (waves start there)
    from_percent: int = Field(0, ge=0, le=99)
    status: Status = Status.RUNNING
    #: index into ``waves`` of the wave being rolled out (== len(waves) once done)
    wave: int = 0
    #: the percentage signed for the current wave, once decided (saved before it is promoted)
    promoted: int | None = None
    #: unix time the current wave was promoted: its --wave-wait counts from here, across restarts too
    wave_started: float | None = None
    #: the previous release's fleet median evaluation score, read before the first wave
    eval_baseline: float | None = None
    started: datetime = Field(default_factory=lambda: datetime.now(UTC))
    results: list[WaveResult] = Field(default_factory=list)
    #: why it halted (one line, with the failing devices and their reasons)
    reason: str | None = None

    @property
    def release(self) -> str:
        return blocklist_key(self.model_id, self.version)

    @property
    def previous(self) -> str | None:
        if self.previous_model is None or self.previous_version is None:
            return None
        return blocklist_key(self.previous_model, self.previous_version)

    @property
    def unfinished(self) -> bool:
        return self.status in UNFINISHED


def default_path(registry_dir: Path, channel: str) -> Path:
    return registry_dir / ROLLOUTS_DIR / f"{channel}.json"


def load(path: Path) -> RolloutState | None:
    """The saved rollout, None when there is none; RolloutError when the file cannot be trusted."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RolloutError(f"cannot read the rollout state {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RolloutError(f"rollout state {path} is not JSON ({exc}); move it aside to start afresh") from None
    written_by = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(written_by, int) and written_by > SCHEMA:
        raise RolloutError(f"rollout state {path} was written by a newer edgert (schema {written_by})")
    try:
        return RolloutState.model_validate(data)
    except ValidationError as exc:
        where = ".".join(str(loc) for loc in exc.errors()[0]["loc"])
        raise RolloutError(f"rollout state {path} is invalid ({exc.error_count()} errors, first at {where})") from None


def save(path: Path, state: RolloutState) -> None:
    """Write ``state`` so a crash leaves the old file or the new one (temp file, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, state.model_dump_json(indent=2).encode() + b"\n")


def resume_or_refuse(saved: RolloutState | None, model_id: str, version: str, channel: str) -> RolloutState | None:
    """The saved rollout when it is this release's (unfinished: continue it; finished: say how it ended), None
    to start a new one (no file, or another release's finished rollout).

    RolloutError when another release's rollout on the channel is unfinished (the caller abandons it only
    when asked), or the file is another channel's.
    """
    if saved is None:
        return None
    if saved.channel != channel:
        raise RolloutError(f"the rollout state file belongs to channel {saved.channel!r}, not {channel!r}")
    same = saved.model_id == model_id and saved.version == version
    if saved.unfinished and not same:
        raise RolloutError(
            f"the rollout of {saved.release} on {channel} is unfinished ({saved.status}, wave "
            f"{saved.wave + 1} of {len(saved.waves)}): finish it (run it again) or pass --abandon"
        )
    return saved if same else None
