"""The update path's phase changes (edgert.update.state): every legal move allowed, illegal ones refused."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from edgert.errors import IllegalTransitionError
from edgert.update import state as st
from edgert.update.manifest import ModelMeta
from edgert.update.state import TRANSITIONS, Phase, Release, UpdateState

NOW = "2026-01-01T00:00:00Z"


def release(version: str) -> Release:
    meta = ModelMeta.model_validate(
        {
            "model_id": "m",
            "version": version,
            "architecture": "gemma4",
            "ram_mib": 100,
            "min_edgert_version": "0.1.0",
            "file_name": "m.gguf",
        }
    )
    return Release(meta=meta, target_path="t", length=1, hashes={"sha256": "0" * 64}, file_name=f"m@{version}.gguf")


V1, V2, V3 = release("1"), release("2"), release("3")


def in_phase(phase: Phase) -> UpdateState:
    """A state in ``phase`` with what that phase carries (a pending release unless idle)."""
    pending = None if phase is Phase.IDLE else V3
    return UpdateState(phase=phase, current=V2, previous=V1, pending=pending, rollback_reason="bad")


#: each transition function, and the phase it moves to
MOVES: dict[str, tuple[Callable[[UpdateState], UpdateState], Phase]] = {
    "start_download": (lambda s: st.start_download(s, V3, now=NOW), Phase.DOWNLOADING),
    "staged": (lambda s: st.staged(s, V3, now=NOW), Phase.STAGED),
    "begin_activation": (st.begin_activation, Phase.ACTIVATING),
    "begin_health_check": (st.begin_health_check, Phase.HEALTH_CHECK),
    "retry_activation": (st.retry_activation, Phase.STAGED),
    "begin_commit": (st.begin_commit, Phase.COMMITTING),
    "committed": (lambda s: st.committed(s, now=NOW), Phase.IDLE),
    "begin_rollback": (lambda s: st.begin_rollback(s, "probe failed"), Phase.ROLLING_BACK),
    "rolled_back": (lambda s: st.rolled_back(s, now=NOW), Phase.IDLE),
    "abandoned": (lambda s: st.abandoned(s, "vetoed", now=NOW), Phase.IDLE),
}

#: the phases each function is meant to leave from (documented in its docstring)
SOURCES: dict[str, set[Phase]] = {
    "start_download": {Phase.IDLE},
    "staged": {Phase.DOWNLOADING},
    "begin_activation": {Phase.STAGED},
    "begin_health_check": {Phase.ACTIVATING},
    "retry_activation": {Phase.ACTIVATING, Phase.HEALTH_CHECK},
    "begin_commit": {Phase.HEALTH_CHECK},
    "committed": {Phase.COMMITTING},
    "begin_rollback": {Phase.STAGED, Phase.ACTIVATING, Phase.HEALTH_CHECK},
    "rolled_back": {Phase.ROLLING_BACK},
    "abandoned": {Phase.DOWNLOADING, Phase.STAGED},
}


def test_the_table_names_every_phase_and_moves_only_to_phases() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert all(targets <= set(Phase) for targets in TRANSITIONS.values())


@pytest.mark.parametrize(("source", "target"), [(s, t) for s, targets in TRANSITIONS.items() for t in targets])
def test_every_legal_move_is_allowed_and_made_by_a_transition(source: Phase, target: Phase) -> None:
    st.check_move(source, target)
    makers = [name for name, (move, to) in MOVES.items() if to is target and source in SOURCES[name]]
    assert makers, f"no transition function makes {source} -> {target}"
    for name in makers:
        moved = MOVES[name][0](in_phase(source))
        assert moved.phase is target, name


@pytest.mark.parametrize(
    ("source", "target"),
    [(s, t) for s, t in itertools.product(Phase, Phase) if t not in TRANSITIONS[s]],
)
def test_every_other_move_is_refused(source: Phase, target: Phase) -> None:
    with pytest.raises(IllegalTransitionError):
        st.check_move(source, target)


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("start_download", Phase.STAGED),  # a second download over a staged release
        ("committed", Phase.HEALTH_CHECK),  # a commit that skipped the committing phase (no swap recorded)
        ("begin_activation", Phase.DOWNLOADING),  # loading a file not yet verified
        ("begin_commit", Phase.ACTIVATING),  # committing a model never probed
        ("rolled_back", Phase.IDLE),
        ("abandoned", Phase.COMMITTING),  # a commit that began is finished, never dropped
    ],
)
def test_illegal_transitions_are_refused_and_leave_the_state_alone(name: str, source: Phase) -> None:
    before = in_phase(source)
    snapshot = before.model_dump()
    with pytest.raises(IllegalTransitionError):
        MOVES[name][0](before)
    assert before.model_dump() == snapshot  # pure: the argument is never changed


def test_a_whole_update_commits_and_keeps_the_previous_release() -> None:
    state = UpdateState(current=V2, previous=V1)
    state = st.start_download(state, V3, now=NOW)
    state = st.begin_activation(st.staged(state, V3, now=NOW))
    assert state.activation_attempts == 1
    state = st.committed(st.begin_commit(st.begin_health_check(state)), now=NOW)
    assert (state.phase, state.current, state.previous, state.pending) == (Phase.IDLE, V3, V2, None)
    assert (state.activation_attempts, state.last_error) == (0, None)
    assert [line.split(" ", 1)[1] for line in state.history] == [
        "downloading m@3",
        "verified m@3 (1 bytes)",
        "committed m@3",
    ]


def test_a_failed_health_check_blocklists_the_release_and_keeps_the_current_one() -> None:
    state = st.begin_health_check(st.begin_activation(in_phase(Phase.STAGED)))
    state = st.rolled_back(st.begin_rollback(state, "m@3 failed its health check"), now=NOW)
    assert (state.phase, state.current, state.pending) == (Phase.IDLE, V2, None)
    assert state.blocklist == ["m@3"]
    assert state.last_error == "m@3 failed its health check"


def test_abandoning_blocklists_nothing_and_a_manual_rollback_blocklists_the_current_release() -> None:
    state = st.abandoned(in_phase(Phase.DOWNLOADING), "pre-download hook vetoed m@3", now=NOW)
    assert (state.phase, state.pending, state.blocklist) == (Phase.IDLE, None, [])
    back = st.manual_rollback(state, now=NOW)
    assert (back.current, back.previous, back.blocklist) == (V1, None, ["m@2"])
    with pytest.raises(IllegalTransitionError):
        st.manual_rollback(back, now=NOW)  # nothing kept to go back to
    with pytest.raises(IllegalTransitionError):
        st.manual_rollback(in_phase(Phase.STAGED), now=NOW)
