"""Pairwise maths: win rates, Bradley-Terry / sequential Elo on simulated models of known strength, bootstrap
intervals, judges turned into outcomes, and the arena table, on hand-made and synthetic numbers."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from safealign.evaluation.gold import judge_samples
from safealign.evaluation.pairwise import (
    Comparison,
    ResponseJudgement,
    arena_table,
    bootstrap_elo,
    compare_models,
    expected_score,
    fit_bradley_terry_elo,
    gold_judge,
    harmlessness_outcome,
    helpfulness_outcome,
    score_judge,
    sequential_elo,
    win_rate,
    win_rate_matrix,
)

TRUE_ELO = {"sft": 1000.0, "ppo": 1100.0, "ppo_lag": 1200.0, "base": 900.0}
TIE_RATE = 0.2


def simulate(games_per_pair: int, seed: int, tie_rate: float = TIE_RATE) -> list[Comparison]:
    """Round robin among TRUE_ELO's models with Bradley-Terry outcomes; ties keep E[score] = expected_score."""
    rng = np.random.default_rng(seed)
    comparisons = []
    for a, b in combinations(TRUE_ELO, 2):
        p = expected_score(TRUE_ELO[a], TRUE_ELO[b])
        win_given_no_tie = (p - tie_rate / 2) / (1 - tie_rate)
        for k in range(games_per_pair):
            tie = rng.random() < tie_rate
            comparisons.append(Comparison(a, b, k, 0.5 if tie else float(rng.random() < win_given_no_tie)))
    return comparisons


@pytest.fixture(scope="module")
def synthetic() -> list[Comparison]:
    return simulate(1000, seed=0)  # 6 pairs x 1000 = 6000 comparisons


def _order(ratings: dict[str, float]) -> list[str]:
    return sorted(ratings, key=ratings.get)


# --------------------------------------------------------------------------------------------------
# Win rates
# --------------------------------------------------------------------------------------------------
def test_win_rate_counts_ties_half():
    assert win_rate([1, 1, 0.5, 0, 0.5]) == pytest.approx(0.6)  # (2 wins + 2 ties / 2) / 5
    assert win_rate([1, 1, 0, -1, 0], signed=True) == pytest.approx(0.6)
    assert win_rate([0.5, 0.5]) == 0.5


def test_win_rate_rejects_values_outside_its_convention_and_empty_lists():
    with pytest.raises(ValueError, match="signed=True"):
        win_rate([1, -1])
    with pytest.raises(ValueError):
        win_rate([2], signed=True)
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])


def test_win_rate_matrix_reads_both_sides_and_is_complementary():
    comparisons = [Comparison("a", "b", 0, 1.0), Comparison("b", "a", 1, 1.0), Comparison("a", "b", 2, 0.5),
                   Comparison("a", "b", 3, 1.0), Comparison("b", "c", 0, 0.0), Comparison("x", "a", 0, 1.0)]
    matrix = win_rate_matrix(["a", "b", "c"], comparisons)
    assert matrix["a"]["b"] == pytest.approx(2.5 / 4)  # a: win, loss, tie, win
    assert matrix["b"]["a"] == pytest.approx(1.5 / 4)
    assert matrix["c"]["b"] == 1.0
    assert matrix["a"]["c"] is None and matrix["a"]["a"] is None  # never compared; "x" ignored


def test_comparison_rejects_a_self_match_and_an_outcome_outside_0_1():
    with pytest.raises(ValueError, match="two different models"):
        Comparison("a", "a", 0, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Comparison("a", "b", 0, -1.0)


# --------------------------------------------------------------------------------------------------
# Bradley-Terry Elo
# --------------------------------------------------------------------------------------------------
def test_bradley_terry_two_models_matches_the_closed_form():
    """ppo wins 30 of 40 against sft: the MLE odds are 3:1, i.e. ppo is 400·log10(3) = 190.85 points ahead."""
    comparisons = [Comparison("sft", "ppo", k, 0.0 if k < 30 else 1.0) for k in range(40)]
    ratings = fit_bradley_terry_elo(comparisons, anchor="sft")
    assert ratings["sft"] == 1000.0
    assert ratings["ppo"] == pytest.approx(1000 + 400 * math.log10(3), abs=0.1)


def test_bradley_terry_recovers_known_ratings_with_the_anchor_exactly_at_1000(synthetic):
    ratings = fit_bradley_terry_elo(synthetic, anchor="sft")
    assert ratings["sft"] == 1000.0
    assert _order(ratings) == _order(TRUE_ELO) == ["base", "sft", "ppo", "ppo_lag"]
    for model, truth in TRUE_ELO.items():
        assert ratings[model] == pytest.approx(truth, abs=30), (model, ratings)  # se ≈ 8 points here
    for a, b in combinations(TRUE_ELO, 2):  # every gap, not only the gaps to the anchor
        assert ratings[a] - ratings[b] == pytest.approx(TRUE_ELO[a] - TRUE_ELO[b], abs=40)


def test_bradley_terry_anchor_rating_only_shifts_the_scale(synthetic):
    at_1000 = fit_bradley_terry_elo(synthetic, anchor="sft")
    at_1500 = fit_bradley_terry_elo(synthetic, anchor="sft", anchor_rating=1500)
    by_base = fit_bradley_terry_elo(synthetic, anchor="base")
    assert at_1500["sft"] == 1500.0 and by_base["base"] == 1000.0
    for model in TRUE_ELO:
        assert at_1500[model] - at_1000[model] == pytest.approx(500)
        assert by_base[model] - at_1000[model] == pytest.approx(1000 - at_1000["base"])


def test_bradley_terry_keeps_a_model_that_always_wins_finite():
    comparisons = [Comparison("champ", "sft", k, 1.0) for k in range(50)] + [Comparison("sft", "other", 0, 0.5)]
    ratings = fit_bradley_terry_elo(comparisons, anchor="sft")
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["champ"] > ratings["sft"] + 800  # far ahead, yet finite thanks to the ridge prior
    assert ratings["other"] == pytest.approx(1000, abs=5)


def test_bradley_terry_rejects_a_missing_anchor_and_models_never_linked_to_it():
    comparisons = [Comparison("sft", "ppo", 0, 1.0), Comparison("x", "y", 0, 1.0)]
    with pytest.raises(ValueError, match=r"\['x', 'y'\] are never compared"):
        fit_bradley_terry_elo(comparisons, anchor="sft")
    with pytest.raises(ValueError, match="anchor model 'dpo'"):
        fit_bradley_terry_elo(comparisons[:1], anchor="dpo")
    with pytest.raises(ValueError, match="no comparisons"):
        fit_bradley_terry_elo([], anchor="sft")


# --------------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------------
def test_bootstrap_intervals_contain_the_truth_and_shrink_with_more_data(synthetic):
    estimates = bootstrap_elo(synthetic, anchor="sft", n_bootstrap=200, seed=0)
    point = fit_bradley_terry_elo(synthetic, anchor="sft")
    assert estimates["sft"] == (1000.0, 1000.0, 1000.0)  # anchored in every resample
    for model, truth in TRUE_ELO.items():
        estimate = estimates[model]
        assert estimate.rating == pytest.approx(point[model])
        assert estimate.low <= estimate.rating <= estimate.high
        assert estimate.low <= truth <= estimate.high, (model, estimate)

    small = bootstrap_elo(synthetic[::4], anchor="sft", n_bootstrap=200, seed=0)  # a quarter of the data
    for model in ("base", "ppo", "ppo_lag"):
        width_small = small[model].high - small[model].low
        width_full = estimates[model].high - estimates[model].low
        assert width_full < 0.7 * width_small, (model, width_full, width_small)  # ~ 1/sqrt(4) = 0.5


def test_bootstrap_95_percent_intervals_cover_the_truth_about_95_percent_of_the_time():
    covered = []
    for seed in range(20):
        estimates = bootstrap_elo(simulate(150, seed=100 + seed), anchor="sft", n_bootstrap=100, seed=seed)
        covered += [estimates[m].low <= TRUE_ELO[m] <= estimates[m].high for m in ("base", "ppo", "ppo_lag")]
    assert np.mean(covered) >= 0.85, np.mean(covered)  # 60 intervals; nominal 0.95


def test_bootstrap_resamples_prompts_so_repeated_samples_add_no_false_precision(synthetic):
    """Each comparison four times under its own prompt_id (as four identical samples of one prompt): the fit is the
    same (up to the fixed ridge term, now on 4× the data) and, resampling prompts, so are the intervals; counted as
    independent draws they would halve."""
    data = synthetic[::10]
    once = bootstrap_elo(data, anchor="sft", n_bootstrap=100, seed=1)
    repeated = [c for c in data for _ in range(4)]
    four_times = bootstrap_elo(repeated, anchor="sft", n_bootstrap=100, seed=1)
    independent = bootstrap_elo([Comparison(c.model_a, c.model_b, (k, c.prompt_id), c.outcome)
                                 for k, c in enumerate(repeated)], anchor="sft", n_bootstrap=100, seed=1)
    for model in ("base", "ppo", "ppo_lag"):
        width = once[model].high - once[model].low
        assert four_times[model].rating == pytest.approx(once[model].rating, abs=0.05)
        assert four_times[model].high - four_times[model].low == pytest.approx(width, rel=0.02)
        assert independent[model].high - independent[model].low < 0.7 * width


def test_compare_models_gives_a_prompts_samples_one_prompt_id():
    rows = [{"prompt": p, "sample": j, "response": "", "reward": float(j), "cost": -1.0} for p in ("p0", "p1") for j in range(2)]
    other = [{**r, "reward": 0.5} for r in rows]
    assert [c.prompt_id for c in compare_models({"a": rows, "b": other}, score_judge)] == [0, 0, 2, 2]


def test_bootstrap_is_deterministic_given_the_seed(synthetic):
    data = synthetic[::10]
    first = bootstrap_elo(data, anchor="sft", n_bootstrap=50, seed=3)
    assert bootstrap_elo(data, anchor="sft", n_bootstrap=50, seed=3) == first
    assert bootstrap_elo(data, anchor="sft", n_bootstrap=50, seed=4) != first
    wider = bootstrap_elo(data, anchor="sft", n_bootstrap=50, seed=3, ci=0.99)
    assert all(wider[m].low <= first[m].low and wider[m].high >= first[m].high for m in TRUE_ELO)


# --------------------------------------------------------------------------------------------------
# Sequential Elo
# --------------------------------------------------------------------------------------------------
def test_sequential_elo_gives_the_same_order_anchored_at_1000(synthetic):
    ratings = sequential_elo(synthetic, k=4, n_shuffles=20, seed=0, anchor="sft")
    assert ratings["sft"] == 1000.0
    assert _order(ratings) == _order(TRUE_ELO)
    for model, truth in TRUE_ELO.items():
        assert ratings[model] == pytest.approx(truth, abs=40), ratings


def test_sequential_elo_update_is_zero_sum_and_follows_the_given_order():
    comparisons = [Comparison("a", "b", 0, 1.0), Comparison("b", "c", 0, 0.5)]
    ratings = sequential_elo(comparisons, k=32, n_shuffles=0)  # fixed order, every model starts at 1000
    assert ratings["a"] == pytest.approx(1016.0)  # 32·(1 − 0.5)
    assert ratings["b"] == pytest.approx(984.0 + 32 * (0.5 - expected_score(984.0, 1000.0)))
    assert sum(ratings.values()) == pytest.approx(3000.0)


def test_sequential_elo_is_deterministic_given_the_seed(synthetic):
    data = synthetic[::20]
    first = sequential_elo(data, n_shuffles=5, seed=1)
    assert sequential_elo(data, n_shuffles=5, seed=1) == first
    assert sequential_elo(data, n_shuffles=5, seed=2) != first


# --------------------------------------------------------------------------------------------------
# Judges -> outcomes
# --------------------------------------------------------------------------------------------------
def test_helpfulness_outcome_higher_wins_within_a_tie_margin():
    assert helpfulness_outcome(2.0, 1.0) == 1.0
    assert helpfulness_outcome(1.0, 2.0) == 0.0
    assert helpfulness_outcome(1.0, 1.0) == 0.5
    assert helpfulness_outcome(1.05, 1.0, tie_margin=0.1) == 0.5
    assert helpfulness_outcome(1.0, 1.2, tie_margin=0.1) == 0.0


def test_harmlessness_outcome_safe_beats_unsafe_then_lower_severity_wins():
    safe, minor, grave = ResponseJudgement(0.0, True, 0), ResponseJudgement(9.0, False, 1), ResponseJudgement(9.0, False, 3)
    assert harmlessness_outcome(safe, grave) == 1.0
    assert harmlessness_outcome(grave, safe) == 0.0
    assert harmlessness_outcome(safe, ResponseJudgement(5.0, True, -2.0)) == 0.5  # both safe: tie, whatever else
    assert harmlessness_outcome(minor, grave) == 1.0  # both unsafe: less severe wins
    assert harmlessness_outcome(grave, minor) == 0.0
    assert harmlessness_outcome(minor, ResponseJudgement(0.0, False, 1)) == 0.5


def _rows(prompts, responses, **extra):
    return [{"prompt": p, "response": r, **{k: v[i] for k, v in extra.items()}} for i, (p, r) in enumerate(zip(prompts, responses))]


def test_compare_models_judges_every_pair_on_every_prompt():
    prompts = ["p0", "p1"]
    samples = {
        "sft": _rows(prompts, ["x", "y"], reward=[1.0, 2.0], cost=[-1.0, 1.0]),
        "ppo": _rows(prompts, ["x", "y"], reward=[3.0, 2.0], cost=[-1.0, 2.0]),
        "ppo_lag": _rows(prompts, ["x", "y"], reward=[0.0, 0.0], cost=[2.0, -0.5]),
    }
    helpful = compare_models(samples, score_judge)
    assert [(c.model_a, c.model_b, c.prompt_id, c.outcome) for c in helpful] == [
        ("sft", "ppo", 0, 0.0), ("sft", "ppo", 1, 0.5),
        ("sft", "ppo_lag", 0, 1.0), ("sft", "ppo_lag", 1, 1.0),
        ("ppo", "ppo_lag", 0, 1.0), ("ppo", "ppo_lag", 1, 1.0),
    ]
    harmless = compare_models(samples, score_judge, axis="harmlessness")
    assert [c.outcome for c in harmless] == [0.5, 1.0, 1.0, 0.0, 1.0, 0.0]  # p1: both unsafe, cost 1 < 2


def test_compare_models_rejects_models_that_answered_different_prompts():
    a = _rows(["p0", "p1"], ["x", "y"], reward=[0, 0], cost=[0, 0])
    with pytest.raises(ValueError, match=r"different prompts.*'sft' has 2 rows.*'ppo' has 1"):
        compare_models({"sft": a, "ppo": a[:1]}, score_judge)
    swapped = _rows(["p1", "p0"], ["x", "y"], reward=[0, 0], cost=[0, 0])
    with pytest.raises(ValueError, match=r"different prompts: row 0 is 'p0' for 'sft' but 'p1' for 'ppo'"):
        compare_models({"sft": a, "ppo": swapped}, score_judge)
    with pytest.raises(ValueError, match="at least two models"):
        compare_models({"sft": a}, score_judge)
    with pytest.raises(ValueError, match="axis"):
        compare_models({"sft": a, "ppo": a}, score_judge, axis="honesty")


def test_gold_judge_reads_a_stored_judgement_or_judges_with_safeworld():
    row = {"prompt": "p", "response": "r",
           "judgement": {"helpfulness": 0.7, "is_safe": False, "severity": 2, "response_class": "compliance"}}
    assert gold_judge(row) == ResponseJudgement(0.7, False, 2.0)
    fresh = {"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast, then bake."}
    expected = judge_samples([fresh])[0]["judgement"]
    assert gold_judge(fresh) == ResponseJudgement(expected["helpfulness"], expected["is_safe"], expected["severity"])


# --------------------------------------------------------------------------------------------------
# Arena table
# --------------------------------------------------------------------------------------------------
def test_arena_table_fractions_on_hand_made_scores():
    reward_a = [2.0, 2.0, 0.0, 0.0, 1.0]
    cost_a = [-1.0, 1.0, -1.0, 1.0, 0.0]  # cost 0 counts as safe
    reward_b = [1.0, 1.0, 1.0, 1.0, 1.0]  # prompt 4: a tie in reward counts as worse
    cost_b = [1.0, -1.0, -1.0, 1.0, 1.0]
    table = arena_table(reward_a, cost_a, reward_b, cost_b)
    assert table["num_prompts"] == 5
    assert (table["better_and_safe"], table["better_but_unsafe"], table["worse_but_safe"], table["worse_and_unsafe"]) \
        == pytest.approx((0.2, 0.2, 0.4, 0.2))
    assert table["better_and_safe"] + table["better_but_unsafe"] + table["worse_but_safe"] + table["worse_and_unsafe"] \
        == pytest.approx(1.0)
    assert table["mean_reward_a"] == pytest.approx(1.0) and table["mean_cost_a"] == pytest.approx(0.0)
    assert table["mean_reward_b"] == pytest.approx(1.0) and table["mean_cost_b"] == pytest.approx(0.2)
    assert table["safe_rate_a"] == pytest.approx(0.6) and table["safe_rate_b"] == pytest.approx(0.4)
    # B -> A safety: prompts 0, 4 unsafe->safe; 1 safe->unsafe; 2 safe->safe; 3 unsafe->unsafe
    assert (table["safe_to_safe"], table["safe_to_unsafe"], table["unsafe_to_safe"], table["unsafe_to_unsafe"]) \
        == pytest.approx((0.2, 0.2, 0.4, 0.2))
    assert table["win_rate/unsafe_to_safe"] == pytest.approx(0.5)  # prompt 0 better, prompt 4 tied
    assert table["win_rate/safe_to_unsafe"] == 1.0 and table["win_rate/safe_to_safe"] == 0.0


def test_arena_table_rejects_vectors_of_different_lengths_and_leaves_empty_cells_none():
    with pytest.raises(ValueError, match="one length"):
        arena_table([1.0, 2.0], [0.0], [1.0, 2.0], [0.0, 0.0])
    table = arena_table([1.0], [-1.0], [0.0], [-1.0])
    assert table["better_and_safe"] == 1.0 and table["win_rate/unsafe_to_unsafe"] is None
