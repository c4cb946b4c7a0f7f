"""Best-of-n and safe best-of-n: the selection and the KL on hand-written tensors, and `safealign bon` end to end on
tiny untrained models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from safealign.algorithms.best_of_n import best_of_n_kl_bound, best_of_n_kl_estimate, select_best_of_n
from safealign.config import ConfigError, load_config
from safealign.evaluation.best_of_n import BestOfNConfig, best_of_n_metrics, curve_sizes, run
from safealign.models.score_model import build_score_model, save_score_model
from safealign.models.tokenizer import load_tokenizer


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------
def test_reward_mode_picks_the_highest_reward_and_the_lowest_index_of_a_tie():
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 2.0, 5.0]])
    chosen, no_feasible = select_best_of_n(rewards, None, "reward")
    assert chosen.tolist() == [1, 0] and no_feasible.tolist() == [False, False]


def test_safe_mode_by_hand_takes_the_best_safe_answer_else_the_least_costly_one():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 3.0], [1.0, 3.0, 2.0, 3.0]])
    costs = torch.tensor([[-1.0, 1.0, -0.5, 0.5],  # safe: candidates 0 and 2; 2 has the higher reward
                          [1.0, 2.0, 0.5, 0.5]])  # none safe: the lowest cost, 2 (tied with 3, lower index)
    chosen, no_feasible = select_best_of_n(rewards, costs, "safe")
    assert chosen.tolist() == [2, 2] and no_feasible.tolist() == [False, True]
    chosen, no_feasible = select_best_of_n(rewards, costs, "safe", threshold=0.75)  # d = 0.75 admits 3 in both rows
    assert chosen.tolist() == [3, 3] and no_feasible.tolist() == [False, False]
    with pytest.raises(ValueError, match="costs"):
        select_best_of_n(rewards, None, "safe")


def test_safe_mode_never_chooses_an_unsafe_answer_when_a_safe_one_exists():
    generator = torch.Generator().manual_seed(0)
    rewards, costs = torch.randn(400, 6, generator=generator), torch.randn(400, 6, generator=generator)
    threshold = -0.5
    chosen, no_feasible = select_best_of_n(rewards, costs, "safe", threshold)
    feasible = costs <= threshold
    chosen_cost, chosen_reward = costs.gather(1, chosen[:, None])[:, 0], rewards.gather(1, chosen[:, None])[:, 0]
    has_safe = feasible.any(dim=1)
    assert 0 < int(has_safe.sum()) < 400  # both cases occur
    assert torch.equal(no_feasible, ~has_safe)
    assert bool((chosen_cost[has_safe] <= threshold).all())
    best_safe_reward = torch.where(feasible, rewards, -math.inf).amax(dim=1)
    assert torch.equal(chosen_reward[has_safe], best_safe_reward[has_safe])
    assert torch.equal(chosen_cost[~has_safe], costs[~has_safe].amin(dim=1))


def test_lagrangian_mode_by_hand_maximises_reward_minus_lambda_cost():
    rewards, costs = torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([[0.0, 1.0, 0.2]])
    assert select_best_of_n(rewards, costs, "lagrangian", lagrange=2.0)[0].tolist() == [2]  # 1, 1, 1.6
    assert select_best_of_n(rewards, costs, "lagrangian", lagrange=0.0)[0].tolist() == [1]  # λ = 0: best-of-n on r
    assert select_best_of_n(rewards, costs, "lagrangian", lagrange=1.0)[0].tolist() == [1]  # 1, 2, 1.8


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------
def test_kl_bound_is_log_n_minus_n_minus_one_over_n():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_kl_estimate_by_hand_on_two_distinct_texts():
    # n = 2, two texts, the second better. Equally likely: P_2(better) = 1 − (1/2)² = 3/4, P_2(worse) = (1/2)² = 1/4.
    rewards, ids = torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]])
    equal = best_of_n_kl_estimate(torch.log(torch.tensor([[0.5, 0.5]])), ids, rewards, mode="reward")
    assert equal.item() == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))  # 0.1308
    assert equal.item() < best_of_n_kl_bound(2)
    # Unnormalised log-probs are normalised over the candidates: q = (0.8, 0.2), P_2 = (0.64, 0.36).
    skewed = best_of_n_kl_estimate(torch.log(torch.tensor([[0.08, 0.02]])), ids, rewards, mode="reward")
    assert skewed.item() == pytest.approx(0.64 * math.log(0.64 / 0.8) + 0.36 * math.log(0.36 / 0.2))


def test_kl_estimate_counts_a_repeated_text_once():
    # n = 3 draws A, B, A (A better, π(A) = π(B)): q = (1/2, 1/2), P_3(B) = (1/2)³ = 1/8, P_3(A) = 7/8.
    kl = best_of_n_kl_estimate(torch.zeros(1, 3), torch.tensor([[0, 1, 0]]), torch.tensor([[1.0, 0.0, 1.0]]), mode="reward")
    assert kl.item() == pytest.approx(1 / 8 * math.log(1 / 4) + 7 / 8 * math.log(7 / 4))


def test_tied_candidates_give_kl_zero_while_the_bound_stays():
    log_probs = torch.tensor([[-3.0, -3.0, -3.0, -3.0], [-1.0, -2.0, -3.0, -4.0]])
    rewards, costs = torch.full((2, 4), 0.7), torch.full((2, 4), -0.2)
    ids = torch.tensor([[0, 0, 0, 0],  # the same refusal four times
                        [0, 1, 2, 3]])  # four texts the value models score alike
    for mode in ("reward", "safe", "lagrangian"):
        assert best_of_n_kl_estimate(log_probs, ids, rewards, costs, mode).tolist() == [0.0, 0.0]
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_kl_estimate_stays_between_zero_and_the_bound():
    generator = torch.Generator().manual_seed(1)
    for n in (2, 3, 8):
        log_probs = 5 * torch.randn(300, n, generator=generator)
        ids = torch.randint(0, 3, (300, n), generator=generator)  # repeats and distinct texts
        rewards = torch.randn(300, 3, generator=generator).gather(1, ids)  # a text scores alike wherever it is drawn
        costs = torch.randn(300, 3, generator=generator).gather(1, ids)
        kl = best_of_n_kl_estimate(log_probs, ids, rewards, costs, "safe")
        assert bool((kl >= -1e-6).all()) and bool((kl <= best_of_n_kl_bound(n) + 1e-6).all())


def test_metrics_by_hand_and_the_curve_over_n():
    assert [curve_sizes(n) for n in (1, 2, 6, 8)] == [[1], [1, 2], [1, 2, 4, 6], [1, 2, 4, 8]]
    rewards, costs = torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([[-1.0, 1.0], [1.0, 2.0]])
    # row 0: only candidate 0 is safe; row 1: none, candidate 0 has the lower cost (flagged)
    metrics = best_of_n_metrics(rewards, costs, torch.zeros(2, 2), torch.tensor([[0, 1], [0, 1]]), "safe", 0.0, 1.0)
    assert metrics["n"] == 2 and metrics["mode"] == "safe" and metrics["no_feasible_share"] == 0.5
    assert (metrics["mean_reward_chosen"], metrics["mean_cost_chosen"]) == (0.5, 0.0)
    assert (metrics["mean_reward_candidates"], metrics["mean_cost_candidates"]) == (0.75, 0.75)
    assert metrics["mean_distinct_texts"] == 2.0
    assert metrics["kl_estimate"] == pytest.approx(0.75 * math.log(3) - math.log(2))
    assert (metrics["curve/1/mean_reward_chosen"], metrics["curve/1/mean_cost_chosen"]) == (0.5, 0.0)
    assert (metrics["curve/1/feasible_share"], metrics["curve/1/kl_bound"], metrics["curve/1/kl_estimate"]) == (0.5, 0.0, 0.0)
    assert metrics["curve/2/kl_bound"] == metrics["kl_bound"] == pytest.approx(math.log(2) - 0.5)


# --------------------------------------------------------------------------------------------------
# `safealign bon` end to end
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(world_backbone) -> dict[str, Path]:
    """A small SafeWorld (its test prompts), an untrained `tiny` policy and reward / cost models (random heads)."""
    built = world_backbone("bon", seed=3, train_pairs=0, test_pairs=0)
    root = built["root"]
    tokenizer = load_tokenizer(built["backbone"])
    for kind, seed in (("reward", 1), ("cost", 2)):
        save_score_model(build_score_model(built["backbone"], score_type=kind, tokenizer=tokenizer, seed=seed), root / kind, tokenizer)
    return {"policy": built["backbone"], "prompts": built["world"] / "prompts" / "test.jsonl",
            "reward": root / "reward", "cost": root / "cost"}


def bon_config(tiny, out: Path, **extra) -> BestOfNConfig:
    return load_config(BestOfNConfig, None, {
        "model": str(tiny["policy"]), "prompts": str(tiny["prompts"]), "output_dir": str(out),
        "reward_model": str(tiny["reward"]), "cost_model": str(tiny["cost"]), "n": 2, "samples_per_prompt": 2,
        "limit": 4, "max_new_tokens": 8, "batch_size": 16, "device": "cpu", "progress": False, **extra})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bon_chooses_within_the_threshold_judges_and_writes_its_files(tiny, tmp_path):
    # Reward mode first: it records every candidate's cost, from which a threshold that some slots meet and some do not.
    by_reward = run(bon_config(tiny, tmp_path / "reward", mode="reward"))
    candidates = read_jsonl(tmp_path / "reward" / "candidates.jsonl")
    assert len(candidates) == 4 * 2 * 2 and by_reward["mode"] == "reward"
    slots: dict[tuple[str, int], list[dict]] = {}
    for candidate in candidates:
        slots.setdefault((candidate["prompt"], candidate["sample"]), []).append(candidate)
    for answers in slots.values():  # reward mode: the highest reward, the first of a tie
        best = max(range(2), key=lambda k: (answers[k]["reward"], -k))
        assert [a["chosen"] for a in answers] == [k == best for k in range(2)]
    lowest = sorted(min(a["cost"] for a in answers) for answers in slots.values())
    threshold = (lowest[3] + lowest[4]) / 2

    out = tmp_path / "safe"
    metrics = run(bon_config(tiny, out, mode="safe", threshold=threshold))
    assert [c["response"] for c in read_jsonl(out / "candidates.jsonl")] == [c["response"] for c in candidates]  # same draws
    rows = read_jsonl(out / "samples.jsonl")
    assert [(r["prompt"], r["sample"]) for r in rows] == list(slots)  # prompt-major, one row per answer slot
    assert {"prompt", "sample", "kind", "category", "response", "response_tokens", "ended_with_eos", "judgement",
            "candidate", "reward", "cost", "no_feasible_candidate"} <= set(rows[0])
    for row in rows:
        answers = slots[(row["prompt"], row["sample"])]
        chosen = answers[row["candidate"]]
        assert (row["response"], row["reward"], row["cost"]) == (chosen["response"], chosen["reward"], chosen["cost"])
        if row["no_feasible_candidate"]:
            assert all(a["cost"] > threshold for a in answers) and row["cost"] == min(a["cost"] for a in answers)
        else:
            assert row["cost"] <= threshold
            assert row["reward"] == max(a["reward"] for a in answers if a["cost"] <= threshold)
    flagged = sum(r["no_feasible_candidate"] for r in rows)
    assert 0 < flagged < len(rows) and metrics["no_feasible_share"] == flagged / len(rows)

    assert json.loads((out / "metrics.json").read_text()) == metrics and (out / "config.yaml").is_file()
    assert metrics["num_responses"] == 8 and "harmful_rate" in metrics  # SafeWorld's prompts: gold judged
    assert (metrics["n"], metrics["mode"], metrics["threshold"]) == (2, "safe", threshold)
    for key in ("mean_reward_chosen", "mean_reward_candidates", "mean_cost_chosen", "mean_cost_candidates",
                "kl_bound", "kl_estimate", "mean_distinct_texts"):
        assert isinstance(metrics[key], float), key
    assert metrics["mean_cost_chosen"] == pytest.approx(sum(r["cost"] for r in rows) / len(rows))
    for size in (1, 2):
        assert {f"curve/{size}/{k}" for k in ("mean_reward_chosen", "mean_cost_chosen", "feasible_share", "kl_bound",
                                             "kl_estimate")} <= set(metrics)
    assert metrics["curve/1/kl_estimate"] == 0.0 and 0.0 <= metrics["kl_estimate"] <= metrics["kl_bound"]


def test_bon_without_a_cost_model_or_gold_reports_rewards_only(tiny, tmp_path):
    metrics = run(bon_config(tiny, tmp_path, mode="reward", cost_model="", gold="false", limit=2, samples_per_prompt=1))
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert len(rows) == 2 and not {"cost", "no_feasible_candidate", "judgement"} & set(rows[0])
    assert metrics["no_feasible_share"] is None and metrics["mean_cost_chosen"] is None
    assert "harmful_rate" not in metrics and metrics["num_responses"] == 2


def test_bon_rejects_missing_models_and_bad_settings(tiny, tmp_path):
    with pytest.raises(ConfigError, match="cost_model"):
        run(bon_config(tiny, tmp_path, cost_model=""))  # safe mode needs costs
    with pytest.raises(ConfigError, match="reward_model"):
        run(bon_config(tiny, tmp_path, reward_model=""))
    with pytest.raises(FileNotFoundError, match="cost_model"):
        run(bon_config(tiny, tmp_path, cost_model=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="n must be"):
        run(bon_config(tiny, tmp_path, n=0))
    with pytest.raises(ConfigError, match="temperature"):
        run(bon_config(tiny, tmp_path, temperature=0.0))
    assert not (tmp_path / "metrics.json").exists()
