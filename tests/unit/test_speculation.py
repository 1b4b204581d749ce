"""The speculation policy on its own: measured costs and acceptance in, draft lengths out (pure code)."""

from __future__ import annotations

import pytest

from edgert.serving.speculation import SpeculationPolicy, expected_speedup


def measured(policy: SpeculationPolicy, per_token_s: float, fixed_s: float, draft_s: float) -> None:
    """Decode costs ``fixed + n * per_token`` for n = 1..40, a draft step ``draft_s`` for 1..8 sequences."""
    for n in range(1, 41):
        policy.observe_decode(n, fixed_s + n * per_token_s)
    for m in range(1, 9):
        policy.observe_draft_step(m, draft_s)


def test_off_never_drafts_and_on_always_drafts_up_to_the_caps() -> None:
    assert SpeculationPolicy("off", 3, 0.6).plan({0: 5, 1: 5}, 2) == {}
    assert SpeculationPolicy("on", 3, 0.6).plan({0: 5, 1: 2, 2: 0}, 3) == {0: 3, 1: 2}


def test_auto_waits_for_a_measured_decode_before_drafting() -> None:
    policy = SpeculationPolicy("auto", 3, 0.6)
    assert policy.plan({0: 3}, 1) == {}
    policy.observe_decode(1, 0.050)
    assert policy.plan({0: 3}, 1) == {0: 3}  # wider batches not measured yet: assumed as cheap, so tried


def test_one_stream_on_a_memory_bound_machine_drafts_the_most() -> None:
    # E2B on 2 cores: one token ~50 ms, each extra token in the batch ~2 ms, a draft step ~4 ms
    policy = SpeculationPolicy("auto", 4, 0.6)
    measured(policy, per_token_s=0.002, fixed_s=0.048, draft_s=0.004)
    # k = 3: 2.18 tokens expected per 68 ms (32/s) beats k = 4 (2.31 per 74 ms) and no drafts (20/s)
    assert policy.plan({0: 4}, 1) == {0: 3}


def test_a_full_batch_of_compute_bound_streams_drafts_nothing() -> None:
    # every token costs the same: verifying k drafts costs k tokens, which acceptance 0.6 never repays
    policy = SpeculationPolicy("auto", 4, 0.6)
    measured(policy, per_token_s=0.010, fixed_s=0.0, draft_s=0.004)
    assert policy.plan({slot: 4 for slot in range(8)}, 8) == {}


def test_k_shrinks_as_the_batch_fills() -> None:
    # a fixed cost shared by the batch, then a per-token cost: few streams draft, many do not
    policy = SpeculationPolicy("auto", 4, 0.7)
    measured(policy, per_token_s=0.004, fixed_s=0.040, draft_s=0.003)
    one = sum(policy.plan({0: 4}, 1).values())
    eight = sum(policy.plan({slot: 4 for slot in range(8)}, 8).values())
    assert one > 0
    assert eight / 8 < one


def test_a_stream_whose_drafts_keep_failing_stops_drafting_and_a_new_one_starts_fresh() -> None:
    policy = SpeculationPolicy("auto", 4, 0.6)
    measured(policy, per_token_s=0.002, fixed_s=0.048, draft_s=0.004)
    assert policy.plan({0: 4}, 1)
    for _ in range(30):
        policy.observe_round(0, 4, 0)
    assert policy.acceptance(0) < 0.11
    assert policy.plan({0: 4}, 1) == {}
    policy.forget(0)
    # a new stream starts from what the drafter has shown on all streams, not from the configured prior
    assert policy.acceptance(0) == pytest.approx(policy.prior_acceptance())
    assert policy.prior_acceptance() < 0.2
    assert policy.plan({0: 4}, 1) == {}


def test_a_new_stream_inherits_a_good_drafters_record() -> None:
    # verifying is dear here (each extra token ~2/3 of a step): the configured prior 0.5 does not pay ...
    policy = SpeculationPolicy("auto", 3, 0.5)
    measured(policy, per_token_s=0.040, fixed_s=0.020, draft_s=0.004)
    assert policy.plan({1: 3}, 1) == {}
    for _ in range(40):  # ... but stream 0's drafts were nearly all accepted
        policy.observe_round(0, 3, 3)
    assert policy.prior_acceptance() > 0.9
    assert policy.plan({1: 3}, 1)


def test_acceptance_counts_accepted_drafts_and_the_first_rejection() -> None:
    policy = SpeculationPolicy("auto", 4, 0.5)
    for _ in range(50):
        policy.observe_round(3, 4, 4)  # all accepted: no failed trial
    assert policy.acceptance(3) > 0.95
    for _ in range(50):
        policy.observe_round(3, 4, 1)  # one accepted, then one rejected
    assert policy.acceptance(3) == pytest.approx(0.5, abs=0.05)


def test_streams_that_cannot_draft_still_count_as_output() -> None:
    # three streams at their token limit yield one token each whatever the drafting stream does
    policy = SpeculationPolicy("auto", 4, 0.6)
    measured(policy, per_token_s=0.006, fixed_s=0.030, draft_s=0.004)
    alone = sum(policy.plan({0: 4}, 4, other_outputs=0).values())
    with_others = sum(policy.plan({0: 4}, 4, other_outputs=3).values())
    assert with_others <= alone


def test_expected_speedup_matches_the_closed_form() -> None:
    # acceptance 0: one token for a verify of k + 1 and k draft steps -- a loss
    assert expected_speedup(0.0, 3, verify_cost=1.1, draft_cost=0.08) < 1.0
    # perfect acceptance, free verify and draft: k + 1 tokens per step
    assert expected_speedup(1.0, 3, verify_cost=1.0, draft_cost=0.0) == pytest.approx(4.0)
    alpha = 0.7
    assert expected_speedup(alpha, 2, 1.0, 0.0) == pytest.approx(1 + alpha + alpha**2)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="draft_max"):
        SpeculationPolicy("auto", -1, 0.5)
    with pytest.raises(ValueError, match="prior"):
        SpeculationPolicy("auto", 3, 1.0)


def test_a_gain_inside_the_cost_models_blind_spot_is_not_taken() -> None:
    # the E2B shape on 2 vCPUs, one stream (benchmarks/RESULTS.md): 1, 2, 3, 4, 5 tokens cost 60, 95, 128, 152,
    # 190 ms, a draft step 5.4 ms. At acceptance 0.82 the model promises 1.09x -- which ran at 0.8x end to end
    policy = SpeculationPolicy("auto", 4, 0.82)
    for n, ms in ((1, 60.1), (2, 94.7), (3, 127.5), (4, 152.2), (5, 190.2)):
        policy.observe_decode(n, ms / 1000)
    policy.observe_draft_step(1, 0.0054)
    assert policy.plan({0: 4}, 1) == {}
    # a drafter that is nearly always right clears the margin (1.23x at k = 3)
    for _ in range(60):
        policy.observe_round(0, 4, 4)
    assert policy.plan({0: 4}, 1)


def test_a_busy_moment_does_not_make_plain_decoding_look_dear() -> None:
    # a plain step timed while another process held the cores (3x slower) must not make drafting look cheap
    policy = SpeculationPolicy("auto", 4, 0.82)
    for n, ms in ((1, 60.1), (2, 94.7), (3, 127.5), (4, 152.2), (5, 190.2)):
        policy.observe_decode(n, ms / 1000)
    policy.observe_draft_step(1, 0.0054)
    for _ in range(5):
        policy.observe_decode(1, 0.180)
    assert policy.plan({0: 4}, 1) == {}
