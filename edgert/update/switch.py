"""The one link between the update path and the serving path.

The update path never touches the engine: it asks a :class:`ModelSwitch` to
load the new model beside the serving one, to prove it answers, and to swap.
The serving side implements it (the scheduler, wired by the daemon); the CLI
and the tests use :class:`edgert.model_switch.RuntimeModelSwitch`. Both keep their models in
one :class:`edgert.serving.host.ModelHost`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from edgert.evalset.cases import EvalSet
from edgert.evalset.checks import EvalReport
from edgert.identity import ReleaseIdentity


class ModelSwitch(Protocol):
    """Stage-activate-swap protocol. Every method raises an ``EdgertError`` on failure.

    Order of calls for one update: ``load_beside`` -> ``probe`` -> ``evaluate`` (when the
    release carries an evaluation set) -> ``swap`` -> ``release`` (frees the old model). When
    ``load_beside``, ``probe`` or the evaluation fails, the update path calls ``release`` without
    ``swap`` (frees the candidate); the old model keeps serving throughout.
    """

    def load_beside(self, path: Path, release: ReleaseIdentity) -> None:
        """Load ``path`` as the candidate while the current model keeps serving.

        ``release`` is who it is: after ``swap`` the served model reports it (never its file name).
        """

    def probe(self, timeout_s: float) -> None:
        """Run one short real generation on the candidate; raise HealthCheckError if it fails or is late."""

    def evaluate(self, eval_set: EvalSet, *, threshold: float, budget_s: float, max_tokens: int) -> EvalReport:
        """Run ``eval_set`` on the candidate (greedy, each case's max_tokens capped at ``max_tokens``, the whole
        set within ``budget_s``) and score it; cases past the budget fail as not run. The verdict is the caller's.
        """

    def swap(self) -> None:
        """Make the candidate the serving model; the old one stays loaded until ``release``."""

    def release(self) -> None:
        """Free whichever model is not serving: the old one after ``swap`` (once its last request ends),
        else the candidate."""
