"""How many tokens to draft per sequence in one step: measured costs against each sequence's acceptance rate.

Speculative decoding spends a draft (one small-model step per drafted position, all drafting sequences
together) and a wider target batch (``k`` more positions per sequence) to win ``1 + a`` tokens in one
step, ``a`` the number of drafts the target agrees with. Whether that pays depends on how much wider
batches cost, which depends on the machine, the model and how many streams already share the step:
on a 2-core CPU one E2B token costs nearly as much as five (weights are read once per step), but eight
streams of five tokens each are forty tokens of compute. So :class:`SpeculationPolicy` measures, while
serving, what a target decode of ``n`` tokens and a draft step over ``m`` sequences cost (the least of
the latest timings per size, interpolated between sizes it has seen), keeps a running acceptance
rate per sequence, and picks per-sequence ``k`` to maximise expected tokens per second of the step:

    rate(k_1..k_n) = sum_i E_i(k_i) / (T_target(B + sum_i k_i) + sum_j T_draft(#{i: k_i >= j}))

with ``E(k) = 1 + alpha + ... + alpha^k`` (draft ``j`` counts only when drafts ``1..j-1`` were accepted,
acceptance per position ``alpha``, as llama.cpp's speculative stats assume). ``k`` grows greedily one
position at a time while the rate improves, so with a full batch (or a poor drafter) it stays 0 and the
step is exactly the step without speculation; a plan must promise :data:`MIN_GAIN` over plain decoding
(the model leaves some costs out). Sizes not yet measured are assumed as cheap as the nearest measured
smaller size (optimism that makes the policy try and measure them once); a bad guess costs one step.

Pure code: no clocks, no backend; the scheduler reports timings and outcomes.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

SpeculativeMode = Literal["off", "auto", "on"]

#: a cost is the least of this many latest timings of its size: other processes on the cores only ever add
#: time, so the minimum tracks what the step costs this machine, and plain and verify steps timed in
#: moments of different load stay comparable (an average let one busy moment decide; RESULTS.md)
_COST_WINDOW = 16
#: how fast a sequence forgets old acceptance evidence (per verified round)
_ACCEPT_DECAY = 0.9
#: pseudo-observations of the prior acceptance rate a new sequence starts with
_PRIOR_WEIGHT = 2.0
#: how fast the drafter-wide acceptance (a new sequence's prior) forgets (per verified round)
_GLOBAL_DECAY = 0.98
#: drafting must promise this much more than plain decoding: what the cost model leaves out (sampling every
#: verified row, the bookkeeping, timings taken while other processes share the cores) cost the E2B on
#: 2 vCPUs 0.8x where the model promised 1.09x (benchmarks/RESULTS.md, "Speculative decoding")
MIN_GAIN = 1.15


@dataclass(slots=True)
class _CostTable:
    """Seconds per call by size: the least of the latest timings per measured size, interpolated between."""

    sizes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    recent: list[deque[float]] = field(default_factory=list)

    def observe(self, size: int, seconds: float) -> None:
        i = bisect.bisect_left(self.sizes, size)
        if i == len(self.sizes) or self.sizes[i] != size:
            self.sizes.insert(i, size)
            self.seconds.insert(i, seconds)
            self.recent.insert(i, deque(maxlen=_COST_WINDOW))
        self.recent[i].append(seconds)
        self.seconds[i] = min(self.recent[i])

    def estimate(self, size: int) -> float | None:
        """None before any measurement; beyond the largest measured size, as that size (optimistic: try it)."""
        if not self.sizes:
            return None
        i = bisect.bisect_left(self.sizes, size)
        if i < len(self.sizes) and self.sizes[i] == size:
            return self.seconds[i]
        if i == 0:
            return self.seconds[0]
        if i == len(self.sizes):
            return self.seconds[-1]
        lo, hi = self.sizes[i - 1], self.sizes[i]
        w = (size - lo) / (hi - lo)
        return self.seconds[i - 1] + w * (self.seconds[i] - self.seconds[i - 1])


@dataclass(slots=True)
class _Acceptance:
    accepted: float = 0.0
    trials: float = 0.0


class SpeculationPolicy:
    """Per-step draft lengths; one instance per scheduler, used only from its engine thread."""

    def __init__(self, mode: SpeculativeMode, draft_max: int, prior: float) -> None:
        if draft_max < 0:
            raise ValueError("draft_max must be >= 0")
        if not 0.0 <= prior < 1.0:
            raise ValueError("the prior acceptance rate must be in [0, 1)")
        self.mode = mode
        self.draft_max = draft_max
        self.prior = prior
        self._target = _CostTable()
        self._draft = _CostTable()
        self._acceptance: dict[int, _Acceptance] = {}
        # every sequence's rounds together: how good this drafter is on this traffic, a new sequence's prior
        self._overall = _Acceptance()

    # ------------------------------------------------------------ evidence
    def observe_decode(self, n_tokens: int, seconds: float) -> None:
        self._target.observe(n_tokens, seconds)

    def observe_draft_step(self, n_seqs: int, seconds: float) -> None:
        self._draft.observe(n_seqs, seconds)

    def observe_round(self, key: int, drafted: int, accepted: int) -> None:
        """``accepted`` of ``drafted`` draft tokens matched; a rejection is one failed trial."""
        if drafted <= 0:
            return
        failed = 1 if accepted < drafted else 0
        stats = self._acceptance.setdefault(key, _Acceptance())
        stats.accepted = stats.accepted * _ACCEPT_DECAY + accepted
        stats.trials = stats.trials * _ACCEPT_DECAY + accepted + failed
        self._overall.accepted = self._overall.accepted * _GLOBAL_DECAY + accepted
        self._overall.trials = self._overall.trials * _GLOBAL_DECAY + accepted + failed

    def forget(self, key: int) -> None:
        self._acceptance.pop(key, None)

    def prior_acceptance(self) -> float:
        """What a new sequence is assumed to accept: the configured prior, then what all sequences accepted."""
        weight = _PRIOR_WEIGHT
        return (self._overall.accepted + self.prior * weight) / (self._overall.trials + weight)

    def acceptance(self, key: int) -> float:
        stats = self._acceptance.get(key, _Acceptance())
        alpha = (stats.accepted + self.prior_acceptance() * _PRIOR_WEIGHT) / (stats.trials + _PRIOR_WEIGHT)
        return min(alpha, 0.99)

    # ------------------------------------------------------------ decisions
    def plan(self, caps: dict[int, int], base_tokens: int, other_outputs: int = 0) -> dict[int, int]:
        """Draft lengths for the sequences in ``caps`` (key -> the most drafts it may take), the step's batch
        holding ``base_tokens`` tokens without drafts, of which ``other_outputs`` more rows each yield a token
        (streams that cannot draft this step). Keys missing from the answer draft nothing."""
        caps = {key: min(cap, self.draft_max) for key, cap in caps.items() if cap > 0 and self.draft_max > 0}
        if self.mode == "off" or not caps:
            return {}
        if self.mode == "on":
            return caps
        alphas = {key: self.acceptance(key) for key in caps}
        ks = dict.fromkeys(caps, 0)
        plain = best = self._rate(ks, alphas, base_tokens, other_outputs)
        if plain is None or best is None:
            return {}  # nothing measured yet: the first step measures the plain decode
        while True:
            choice: tuple[float, int] | None = None
            for key in caps:
                if ks[key] >= caps[key]:
                    continue
                ks[key] += 1
                rate = self._rate(ks, alphas, base_tokens, other_outputs)
                ks[key] -= 1
                if rate is not None and rate > best and (choice is None or rate > choice[0]):
                    choice = (rate, key)
            if choice is None:
                break
            best, key = choice
            ks[key] += 1
        if best < plain * MIN_GAIN:
            return {}
        return {key: k for key, k in ks.items() if k > 0}

    def _rate(self, ks: dict[int, int], alphas: dict[int, float], base_tokens: int, other: int) -> float | None:
        target = self._target.estimate(base_tokens + sum(ks.values()))
        if target is None:
            return None
        draft = 0.0
        for j in range(1, max(ks.values(), default=0) + 1):
            n = sum(1 for k in ks.values() if k >= j)
            draft += self._draft.estimate(n) or 0.0
        tokens = other + sum(_expected_tokens(alphas[key], k) for key, k in ks.items())
        return tokens / max(target + draft, 1e-9)


def _expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verified round yields: the target's own plus each draft while all before it matched."""
    return sum(alpha**j for j in range(k + 1))


def expected_speedup(alpha: float, k: int, verify_cost: float, draft_cost: float) -> float:
    """Single-stream speedup of drafting ``k`` with acceptance ``alpha``, costs relative to one plain decode step.

    ``verify_cost``: a target decode of ``k + 1`` tokens / one of 1 token; ``draft_cost``: one draft step / one
    plain decode step. Used by the benchmark to turn measured costs into the speedup curve.
    """
    return _expected_tokens(alpha, k) / (verify_cost + k * draft_cost)
