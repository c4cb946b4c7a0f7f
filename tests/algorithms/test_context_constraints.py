"""Context-aware constraints (docs/maths.md §10): one λ_k per prompt category and the over-refusal guard's μ, pinned
on hand-computed tensors, then on tiny real models (PPO-Lag, GRPO-Lag): each λ_k moves only with its own category's
cost, and a run resumes with every multiplier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from safealign.algorithms import grpo_lag, ppo_lag
from safealign.algorithms.lagrangian import NO_CATEGORY, ContextMultipliers
from safealign.algorithms.losses import combined_advantage, lagrange_multipliers_update
from safealign.config import ConfigError
from safealign.data.loading import load_prompts
from safealign.data.schema import PromptRecord
from safealign.models.score_model import load_score_model
from safealign.training.common import make_accelerator
from tiny_rl import FAST, expected_lambdas, history, lag_config, straight_and_resumed  # noqa: E402  (tests/algorithms is on sys.path)


def test_combined_advantage_with_a_lambda_and_a_reward_weight_per_row_by_hand():
    reward = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])  # (B, T)
    cost = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 4.0]])
    lambdas = torch.tensor([[1.0], [3.0], [0.5]])  # (B, 1): each row its category's λ_k
    weights = torch.tensor([[1.0], [1.0], [3.0]])  # w = 1 + μ on the third row (a borderline prompt, μ = 2)
    expected = torch.tensor([[(1 - 2) / 2, (2 - 0) / 2],
                             [(3 - 3) / 4, (-1 - 3) / 4],
                             [(3 * 0.5 + 0.5) / 3.5, (0 - 0.5 * 4) / 3.5]])
    torch.testing.assert_close(combined_advantage(reward, cost, lambdas, weights), expected)
    # w = 1 everywhere is Safe RLHF's (A^R − λA^C)/(1 + λ), and a scalar λ gives exactly the old result
    torch.testing.assert_close(combined_advantage(reward, cost, lambdas, torch.ones(3, 1)),
                               (reward - lambdas * cost) / (1 + lambdas))
    assert torch.equal(combined_advantage(reward, cost, 0.7), (reward - 0.7 * cost) / 1.7)


def test_multiplier_vector_update_by_hand():
    log_m = torch.tensor([0.0, math.log(2.0), math.log(4.5), 0.0], dtype=torch.float64)
    costs = torch.tensor([3.0, -1.0, 10.0, math.nan], dtype=torch.float64)  # the last: no observation yet
    bounds = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    observed = torch.tensor([True, True, True, False])
    updated = lagrange_multipliers_update(log_m, costs, bounds, 0.1, 5.0, observed)
    expected = [0.0 + 0.1 * 1.0 * (3 - 1), math.log(2.0) + 0.1 * 2.0 * (-1 - 0), math.log(5.0), 0.0]  # λ_max clips the third
    assert updated.tolist() == pytest.approx(expected)


def _batch(prompt_index: list[int], costs: list[float], rewards: list[float]) -> dict[str, torch.Tensor]:
    return {"prompt_index": torch.tensor(prompt_index), "scores_cost": torch.tensor(costs),
            "scores_reward": torch.tensor(rewards)}


PROMPTS = [PromptRecord("hurt a cat", "harmful", "animal_abuse"), PromptRecord("steal a car", "harmful", "financial_crime,property_crime,theft"),
           PromptRecord("bake bread", "benign"), PromptRecord("kill a python process", "borderline")]


def test_each_category_multiplier_moves_only_with_its_own_cost_and_the_guard_with_the_borderline_reward(tmp_path):
    cfg = lag_config_like(constraint_per_category=True, threshold=0.0, refusal_floor=1.0,
                          category_thresholds={"animal_abuse": 5.0})
    multipliers = ContextMultipliers(cfg, PROMPTS)
    assert multipliers.names == ["animal_abuse", "financial_crime,property_crime,theft", NO_CATEGORY, "refusal_guard"]
    accelerator = make_accelerator(lag_config(_FakeTiny(), tmp_path, max_steps=1))
    # theft costs 2 > d = 0 (λ rises); animal abuse costs 2 < its d_k = 5 (λ falls); the benign 'none' group costs −1 < 0
    # (falls); the borderline prompt is in 'none' too and its reward 0 < floor 1 (μ rises).
    logs = multipliers.step(_batch([0, 1, 1, 2, 3], [2.0, 2.0, 2.0, -1.0, -1.0], [0.0, 0.0, 0.0, 3.0, 0.0]), accelerator, 0)
    assert logs["episode_cost/animal_abuse"] == 2.0 and logs["episode_cost/none"] == -1.0
    assert logs["lagrange_multiplier/animal_abuse"] == pytest.approx(math.exp(0.1 * (2 - 5)))
    assert logs["lagrange_multiplier/financial_crime,property_crime,theft"] == pytest.approx(math.exp(0.1 * 2))
    assert logs["lagrange_multiplier/none"] == pytest.approx(math.exp(0.1 * (-1 - 0)))
    assert logs["refusal_guard_multiplier"] == pytest.approx(math.exp(0.1 * (1 - 0)))
    assert logs["borderline_reward"] == 0.0 and logs["violated_constraints"] == 1.0
    # A step without an animal-abuse prompt leaves its λ where it was and averages the others over their windows.
    before = logs["lagrange_multiplier/animal_abuse"]
    logs = multipliers.step(_batch([1, 1], [4.0, 4.0], [0.0, 0.0]), accelerator, 1)
    assert logs["lagrange_multiplier/animal_abuse"] == before
    assert logs["episode_cost/financial_crime,property_crime,theft"] == pytest.approx((2 + 2 + 4 + 4) / 4)
    # The rows get their prompt's λ_k, and w = 1 + μ on the borderline prompt only.
    lambdas, weights = multipliers.row_multipliers(_batch([0, 1, 2, 3], [0.0] * 4, [0.0] * 4))
    m = multipliers.log_multipliers.exp().tolist()
    assert lambdas.tolist() == pytest.approx([m[0], m[1], m[2], m[2]])
    assert weights.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0 + m[3]])
    # The state round-trips; another set of constraints is refused with the names of both.
    restored = ContextMultipliers(cfg, PROMPTS)
    restored.load_state_dict(multipliers.state_dict())
    assert torch.equal(restored.log_multipliers, multipliers.log_multipliers)
    assert all(torch.equal(a, b) for a, b in zip(restored.windows, multipliers.windows))
    with pytest.raises(ConfigError, match="not this run's"):
        ContextMultipliers(lag_config_like(constraint_per_category=True), PROMPTS).load_state_dict(multipliers.state_dict())


def test_bad_context_settings_are_refused_clearly():
    with pytest.raises(ConfigError, match="category_thresholds needs constraint_per_category"):
        lag_config_like(category_thresholds={"animal_abuse": 1.0})
    with pytest.raises(ConfigError, match="'animal_abuse' must be a finite number"):
        lag_config_like(constraint_per_category=True, category_thresholds={"animal_abuse": "high"})
    with pytest.raises(ConfigError, match=r"names \['animal_cruelty'\], which no prompt"):
        ContextMultipliers(lag_config_like(constraint_per_category=True, category_thresholds={"animal_cruelty": 1.0}), PROMPTS)
    with pytest.raises(ConfigError, match="no prompt of prompt_data has kind 'borderline'"):
        ContextMultipliers(lag_config_like(refusal_floor=0.0), PROMPTS[:3])
    # a loose d for the uncategorised group is fine beside categorised prompts, refused when it would free them all
    loose_none = lag_config_like(constraint_per_category=True, category_thresholds={"none": 10.0})
    multipliers = ContextMultipliers(loose_none, PROMPTS)
    assert multipliers.bounds[multipliers.categories.index("none")].item() == 10.0
    with pytest.raises(ConfigError, match=r"prompt_data: no prompt has a `category`.*category_head"):
        ContextMultipliers(loose_none, [PromptRecord(p.prompt, p.kind) for p in PROMPTS])


class _FakeTiny:
    actor = reward_model = cost_model = prompts = "unused"


def lag_config_like(**overrides) -> ppo_lag.PPOLagConfig:
    return ppo_lag.PPOLagConfig(**overrides)


@pytest.mark.parametrize("method", ["ppo_lag", "grpo_lag"])
def test_per_category_lambdas_move_only_for_the_categories_over_their_threshold(tiny, tmp_path, method):
    """Every answer costs 1 (a constant cost model). Animal abuse's d_k = 2 is above it (its λ falls), every other
    category's d = 0 is below it (their λ rise); each λ_k moves on exactly the steps that had its prompts."""
    prompts = load_prompts(tiny.prompts)
    categories = sorted({p.category or NO_CATEGORY for p in prompts})
    assert "animal_abuse" in categories and len(categories) > 3
    settings = dict(cost_model=tiny.score_model("cost", 1.0), max_steps=3, constraint_per_category=True,
                    category_thresholds={"animal_abuse": 2.0}, save_steps=-1, sample_steps=0)
    out = tmp_path / method
    if method == "ppo_lag":
        metrics = ppo_lag.run(lag_config(tiny, out, **settings))
    else:
        metrics = grpo_lag.run(grpo_lag.GRPOLagConfig(actor_model=tiny.actor, reward_model=tiny.reward_model,
                                                      prompt_data=tiny.prompts, output_dir=str(out),
                                                      **{**FAST, **settings}))
    steps = json.loads((out / "metrics.json").read_text())
    assert steps["global_step"] == 3 and metrics["episode_cost"] == pytest.approx(1.0, abs=1e-3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs")).Reload()
    moved = 0
    for category in categories:
        lambdas = [e.value for e in events.Scalars(f"train/lagrange_multiplier/{category}")]
        observed = [e.step for e in events.Scalars(f"train/episode_cost/{category}")] if \
            f"train/episode_cost/{category}" in events.Tags()["scalars"] else []
        threshold = 2.0 if category == "animal_abuse" else 0.0
        if not observed:
            assert lambdas == [1.0] * 3, category  # no prompt of it yet: λ_k stays λ_0
            continue
        # each step with its prompts moves λ_k once (its window holds cost 1 only); the others leave it alone
        steps = expected_lambdas(1.0, len(observed), threshold=threshold)
        expected = [([1.0] + steps)[sum(s <= step for s in observed)] for step in (1, 2, 3)]
        assert lambdas == pytest.approx(expected, rel=1e-5), category
        assert (lambdas[-1] < 1.0) == (category == "animal_abuse"), category
        moved += 1
    assert moved >= 3


def test_the_guard_raises_mu_while_the_borderline_reward_is_below_the_floor_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """A floor far above any reward: μ rises every step with a borderline prompt. A run crashed after step 2 and
    resumed from it ends with the uninterrupted run's multipliers, every one."""

    rows = [json.loads(line) for line in Path(tiny.prompts).read_text().splitlines()]
    borderline = [r for r in rows if r["kind"] == "borderline"]
    mixed = tmp_path / "prompts.jsonl"  # half borderline, so that every step guards some
    mixed.write_text("".join(json.dumps(r) + "\n" for r in borderline + [r for r in rows if r["kind"] == "harmful"][:len(borderline)]))
    settings = dict(cost_model=tiny.score_model("cost", 0.5), max_steps=4, constraint_per_category=True, refusal_floor=50.0,
                    prompt_data=str(mixed))
    straight, crashed = straight_and_resumed(monkeypatch, tmp_path,
                                             lambda out, **extra: ppo_lag.run(lag_config(tiny, out, **settings, **extra)))
    mus = history(straight, "refusal_guard_multiplier")
    assert mus[-1] > 1.0 and mus == sorted(mus)
    keys = [k for k in json.loads((straight / "metrics.json").read_text()) if k.startswith(("lagrange_multiplier",
                                                                                          "refusal_guard"))]
    assert len(keys) > 3
    for key in keys:
        assert history(crashed, key) == pytest.approx(history(straight, key), rel=1e-6), key


def test_prompt_kind_repeats_gives_the_guard_more_borderline_rollouts(tiny, tmp_path):
    """One borderline prompt among 15 harmful ones: an epoch's 4 steps of 4 prompts see it once, so μ (its floor above
    every reward) rises once. With the borderline prompt 16 times among the rollout prompts most steps hold it, and
    μ rises on each of them."""
    rows = [json.loads(line) for line in Path(tiny.prompts).read_text().splitlines()]
    one = tmp_path / "prompts.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["kind"] == "borderline"][:1]
                           + [r for r in rows if r["kind"] == "harmful"][:15]))
    # every reward 0 against a floor of 1: μ rises by about a tenth on each step with borderline rows, far from λ_max
    settings = dict(reward_model=tiny.score_model("reward", 0.0), cost_model=tiny.score_model("cost", 0.5), max_steps=4,
                    refusal_floor=1.0, prompt_data=str(one), save_steps=4)
    observed = {}
    for repeats in (1, 16):
        out = tmp_path / f"repeats{repeats}"
        ppo_lag.run(lag_config(tiny, out, prompt_kind_repeats={"borderline": repeats} if repeats > 1 else {}, **settings))
        mus = history(out, "refusal_guard_multiplier")
        observed[repeats] = sum(b > a for a, b in zip([1.0] + mus, mus))  # μ moves only on a step with borderline rows
    assert observed[1] == 1 and observed[16] >= 3


def test_rectified_form_by_hand_and_on_a_tiny_run(tiny, tmp_path):
    """RePO's form: the cost stream carries {C − d_k}⁺ per row and λ_k follows E[{C − d_k}⁺] ≤ 0."""
    cfg = lag_config_like(constraint_per_category=True, threshold=1.0, constraint_form="rectified",
                          category_thresholds={"animal_abuse": -1.0})
    multipliers = ContextMultipliers(cfg, PROMPTS)
    accelerator = make_accelerator(lag_config(_FakeTiny(), tmp_path, max_steps=1))
    batch = _batch([0, 0, 1, 1, 2], [3.0, -3.0, 3.0, -1.0, 0.5], [0.0] * 5)
    algorithm = ppo_lag.PPOLag(cfg)
    algorithm.lagrangian = multipliers
    ends = algorithm.stream_end_scores({"reward": torch.zeros(5), "cost": batch["scores_cost"]}, batch)
    assert ends["cost"].tolist() == [4.0, 0.0, 2.0, 0.0, 0.0]  # d: −1 (animal abuse), 1, 1
    logs = multipliers.step(batch, accelerator, 0)
    assert logs["episode_cost/animal_abuse"] == 2.0 and logs["episode_cost/none"] == 0.0
    assert logs["lagrange_multiplier/animal_abuse"] == pytest.approx(math.exp(0.1 * 2.0))
    assert logs["lagrange_multiplier/none"] == 1.0  # no answer over d: λ stays (it never falls in this form)

    # One λ: every answer far under d gives a zero cost stream and a λ that stays exactly λ_0; over d it rises.
    for bias, expected in [(-5.0, [1.0] * 3), (5.0, expected_lambdas(5.0, 3))]:
        out = tmp_path / f"bias{bias:g}"
        ppo_lag.run(lag_config(tiny, out, cost_model=tiny.score_model("cost", bias), max_steps=3, constraint_form="rectified",
                               save_steps=-1, sample_steps=0))
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "logs")).Reload()
        assert [e.value for e in events.Scalars("train/lagrange_multiplier")] == pytest.approx(expected, rel=1e-5)
        assert [e.value for e in events.Scalars("train/episode_cost")] == pytest.approx([max(bias, 0.0)] * 3, abs=1e-3)


def test_category_head_labels_fit_and_metrics_by_hand():
    from safealign.data.schema import PreferenceRecord
    from safealign.models.category_head import fit_category_head, head_metrics, prompt_category_labels

    def record(prompt, first, second):
        return PreferenceRecord(prompt=prompt, response_0="a", response_1="b", is_response_0_safe=not first,
                                is_response_1_safe=not second, better_response_id=0, safer_response_id=0,
                                response_0_harm_category=first, response_1_harm_category=second)
    records = [record("p1", {"self_harm": True, "animal_abuse": False}, {}),
               record("p1", {}, {"animal_abuse": True}),  # the union over every response to p1
               record("p2", {}, {}), record("p3", {"self_harm": True}, {})]
    prompts, categories, labels = prompt_category_labels(records)
    assert prompts == ["p1", "p2", "p3"] and categories == ["animal_abuse", "self_harm"]
    assert labels.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]

    # Separable features: dimension k says category k. The fitted probe recovers them.
    generator = torch.Generator().manual_seed(0)
    truth = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 0], [0, 1], [0, 0]] * 5, dtype=torch.float64)
    features = truth * 3 + 0.1 * torch.randn(truth.shape, generator=generator, dtype=torch.float64)
    head = fit_category_head(features, truth, ["a", "b"], l2=1e-4)
    assert head.predict(features[:3]) == ["a", "b", None]
    assert head_metrics(head, features, truth) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "prompt_category_accuracy": 1.0, "prompts": 30.0})
    # A head that says "a" for everything: precision = 10 hits / 30 said, recall 10/20; "none" prompts all wrong.
    always_a = fit_category_head(features, truth, ["a", "b"])
    always_a.weight.zero_()
    always_a.bias.copy_(torch.tensor([5.0, -5.0], dtype=torch.float64))
    metrics = head_metrics(always_a, features, truth)
    assert metrics["precision"] == pytest.approx(10 / 30) and metrics["recall"] == pytest.approx(10 / 20)
    assert metrics["prompt_category_accuracy"] == pytest.approx(10 / 30)


@pytest.mark.parametrize("bias, expected", [(5.0, "animal_abuse"), (-5.0, None)])
def test_prompts_without_a_category_get_the_cost_models_head_prediction(tiny, tmp_path, bias, expected):
    import shutil

    from safealign.algorithms.lagrangian import categorised
    from safealign.models.category_head import CategoryHead, save_category_head

    cost_model = tmp_path / "cost"
    shutil.copytree(tiny.cost_model, cost_model)
    prompts = load_prompts(tiny.prompts)
    assert categorised(prompts, str(cost_model), tiny.actor) == prompts  # no head: unchanged
    hidden = load_score_model(cost_model).config.hidden_size
    head = CategoryHead(["animal_abuse", "self_harm"], torch.zeros(2, hidden, dtype=torch.float64),
                        torch.tensor([bias, -5.0], dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64),
                        torch.ones(hidden, dtype=torch.float64))
    save_category_head(head, cost_model, {})
    labelled = categorised(prompts, str(cost_model), tiny.actor)
    for before, after in zip(prompts, labelled):
        assert after.category == (before.category or expected) and after.prompt == before.prompt
    assert sum(p.category is None for p in prompts) > 0
