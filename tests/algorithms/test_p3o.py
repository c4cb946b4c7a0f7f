"""P3O and safe P3O: the pairwise loss on hand-computed numbers, the pair-preserving shuffle, then tiny real models: an
update raises the better answer of each pair against the other, micro-batches hold whole pairs, λ follows the
constraint, a crashed run resumes exactly, no critic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safealign.algorithms.losses import p3o_loss
from safealign.algorithms.p3o import P3O, P3OConfig
from safealign.algorithms.p3o_lag import P3OLag, P3OLagConfig, run
from safealign.algorithms.rollout import token_log_probs
from safealign.config import ConfigError
from safealign.data.formatting import tokenize_prompt
from safealign.data.loading import load_prompts
from safealign.models.actor_critic import causal_lm
from safealign.models.generation import SamplingConfig, generate_tokens
from safealign.models.tokenizer import load_tokenizer
from safealign.training.common import make_accelerator
from safealign.training.rl import Experience, RLRun, shuffled_rows
from safealign.training.rl_setup import build_models, prepare_training
from tiny_rl import FAST, TinySetup, assert_same_weights, expected_lambdas, history, straight_and_resumed  # noqa: E402  (tests/algorithms is on sys.path)


# ------------------------------------------------------------------------------------------------
# The maths, by hand
# ------------------------------------------------------------------------------------------------
def test_p3o_loss_matches_the_formula_by_hand():
    """Three pairs, β = 0.1, ε = 0.2, c = 2. ℓ = (ℓ_0, ℓ_1) now and at sampling time, s_0 − s_1 given."""
    old = torch.tensor([[-3.0, -2.0], [-1.0, -1.5], [-2.0, -2.0]])
    log_ratios = torch.tensor([[-2.9, -2.2], [-0.2, -1.3], [-2.05, -1.95]], requires_grad=True)
    score_diffs = torch.tensor([1.0, -2.0, 0.5])
    # Pair A: q = 1 − 0.1·(−1) = 1.1; w = e^(0.1 − 0.2) = e^−0.1 (inside [1/2, 2]); Δ = −0.7 left [−1.2, −0.8]:
    #   L1 = −1.1·w·(−0.7) = 0.77·w < L1_clip = −1.1·w·(−0.8) = 0.88·w: the clip binds, no gradient.
    # Pair B: q = −2 − 0.1·0.5 = −2.05; e^(0.8 + 0.2) = e > 2: w clamped to 2; Δ = 1.1 left [0.3, 0.7]:
    #   L1 = 2.05·2·1.1 = 4.51 > L1_clip = 2.05·2·0.7 = 2.87: unclipped (Δ moved against q), gradient −q·w = ±4.1.
    # Pair C: q = 0.5; w = e^0 = 1; Δ = −0.1 inside [−0.2, 0.2]: L1 = L1_clip = −0.5·(−0.1) = 0.05, gradient ∓0.5.
    total = 0.88 * math.exp(-0.1) + 4.51 + 0.05
    loss = p3o_loss(log_ratios, old, score_diffs, kl_coeff=0.1, clip_range=0.2, clip_range_ratio=2.0, num_tokens=20)
    assert loss.item() == pytest.approx(total / 20, rel=1e-6)
    loss.backward()
    expected = [[0.0, 0.0], [4.1 / 20, -4.1 / 20], [-0.5 / 20, 0.5 / 20]]
    for row, want in zip(log_ratios.grad.tolist(), expected):
        assert row == pytest.approx(want, abs=1e-6)
    # Normalised by 2 × pairs (the author's mean(max(L1, L1_clip)) / 2) instead of the tokens.
    by_pairs = p3o_loss(log_ratios, old, score_diffs, kl_coeff=0.1, clip_range=0.2, clip_range_ratio=2.0)
    assert by_pairs.item() == pytest.approx(total / 6, rel=1e-6)
    # At c = 10 pair B's weight is e, unclamped: its term is 2.05·e·1.1.
    unclamped = p3o_loss(log_ratios, old, score_diffs, kl_coeff=0.1, clip_range=0.2, clip_range_ratio=10.0)
    assert unclamped.item() == pytest.approx((0.88 * math.exp(-0.1) + 2.05 * math.e * 1.1 + 0.05) / 6, rel=1e-6)


def test_safe_p3o_scores_each_answer_as_safe_rlhf_combines_its_streams():
    algorithm = P3OLag(P3OLagConfig(lambda_init=2.0))
    batch = Experience({"reward_end_scores": torch.tensor([1.0, 3.0]), "cost_end_scores": torch.tensor([0.5, -1.0])}, 1)
    scores = algorithm.objective(batch)  # (R − λ·C)/(1 + λ), λ = 2
    assert scores.tolist() == pytest.approx([(1.0 - 1.0) / 3, (3.0 + 2.0) / 3])
    # The pair's q: [(R_0 − R_1) − λ·(C_0 − C_1)]/(1 + λ) − β·(ℓ_0^old − ℓ_1^old), β not scaled by λ.
    old = torch.tensor([[-1.0, -2.0]])
    ratios = old.clone().requires_grad_(True)  # the first update: w = 1, Δ = Δ^old, inside the clip
    loss = p3o_loss(ratios, old, scores[:1] - scores[1:], kl_coeff=0.05, num_tokens=1)
    q = ((1.0 - 3.0) - 2.0 * (0.5 + 1.0)) / 3 - 0.05 * 1.0
    assert loss.item() == pytest.approx(-q * 1.0, rel=1e-6)


def test_shuffled_rows_keeps_groups_whole_and_group_size_one_is_randperm():
    ours, torchs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):  # every pass of an update: the same draws as before group_size existed
        assert torch.equal(shuffled_rows(10, 1, ours), torch.randperm(10, generator=torchs))
    order = shuffled_rows(12, 2, torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(12))
    pairs = order.view(-1, 2)
    assert (pairs[:, 0] % 2 == 0).all() and (pairs[:, 1] == pairs[:, 0] + 1).all()
    assert pairs[:, 0].tolist() != list(range(0, 12, 2))  # shuffled


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="samples_per_prompt must be 2"):
        P3OConfig(samples_per_prompt=4)
    with pytest.raises(ConfigError, match="P3O has no critic"):
        P3OLagConfig(critic_layout="shared_backbone")
    with pytest.raises(ConfigError, match="whole pairs"):
        P3OConfig(per_device_prompt_batch_size=3, per_device_train_batch_size=3)
    with pytest.raises(ConfigError, match="clip_range_ratio must be > 1"):
        P3OConfig(clip_range_ratio=0.2)
    with pytest.raises(ConfigError, match="lambda_init"):
        P3OLagConfig(lambda_init=0.0)


# ------------------------------------------------------------------------------------------------
# Tiny real models
# ------------------------------------------------------------------------------------------------
def p3o_lag_config(tiny: TinySetup, out: Path, **overrides) -> P3OLagConfig:
    return P3OLagConfig(**{**dict(actor_model=tiny.actor, reward_model=tiny.reward_model, cost_model=tiny.cost_model,
                                  prompt_data=tiny.prompts, output_dir=str(out), max_steps=3), **FAST, **overrides})


def p3o_setup(tiny: TinySetup, out: Path, prompts: int, **overrides):
    """P3O's models (prepared) and one experience batch of `prompts` × 2 answers, with each row's index as row_id."""
    cfg = P3OConfig(actor_model=tiny.actor, reward_model=tiny.reward_model, prompt_data=tiny.prompts, output_dir=str(out),
                    per_device_prompt_batch_size=prompts, mixed_precision="no", warmup_ratio=0.0, **overrides)
    algorithm = P3O(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(tiny.actor)
    models = build_models(cfg, algorithm.score_model_paths(), algorithm.critic_paths(), tokenizer, accelerator)
    parts = prepare_training(cfg, accelerator, models, total_updates=10)
    ids = [tokenize_prompt(tokenizer, r.prompt) for r in load_prompts(tiny.prompts)[:prompts]]
    rollout = generate_tokens(causal_lm(models.actor), tokenizer, ids, SamplingConfig(max_new_tokens=8, num_samples=2),
                              torch.Generator().manual_seed(0))
    batch = Experience.from_rollout(rollout)
    models.actor.eval()
    algorithm.experience(models, batch)
    batch["objective"] = algorithm.objective(batch)
    batch["row_id"] = torch.arange(batch.num_rows)
    return cfg, algorithm, accelerator, models, parts, batch


def test_one_update_raises_the_better_answer_of_each_pair_against_the_other(tiny, tmp_path):
    """One optimizer step on 8 prompts × 2 answers (β = 0: q = R_0 − R_1): to first order the pair's log-likelihood gap
    ℓ_0 − ℓ_1 moves with q, so Σ_pairs q·Δ(ℓ_0 − ℓ_1) > 0, and the better answer gains on the worse on average.
    Nothing but the actor is trained."""
    cfg, algorithm, accelerator, models, parts, batch = p3o_setup(
        tiny, tmp_path, 8, per_device_train_batch_size=16, kl_coeff=0.0, learning_rate=1e-4)
    assert models.critics == {} and list(parts) == ["actor"]
    before = (batch["log_probs"] * batch["response_mask"]).sum(-1)  # size = (16,)
    RLRun(cfg, accelerator, models, parts, [], 0, 1).update(batch, 0, algorithm.losses, group_size=2)
    models.actor.eval()
    with torch.no_grad():
        after = (token_log_probs(models.actor, batch) * batch["response_mask"]).sum(-1)
    change = (after - before).view(-1, 2)  # size = (8, 2)
    gap_change = change[:, 0] - change[:, 1]  # size = (8,): the reference's terms cancel
    rewards = batch["reward_end_scores"].view(-1, 2)
    q = rewards[:, 0] - rewards[:, 1]  # size = (8,)
    assert (q != 0).all()
    assert (q * gap_change).sum().item() > 0
    assert (q.sign() * gap_change).mean().item() > 0


def test_every_micro_batch_holds_whole_pairs(tiny, tmp_path):
    """Micro-batches of 4 rows, two passes: each micro-batch is two whole pairs (rows 2j, 2j + 1 in order), and each
    pass sees every row once."""
    cfg, algorithm, accelerator, models, parts, batch = p3o_setup(tiny, tmp_path, 4, per_device_train_batch_size=4,
                                                                  ppo_epochs=2)
    seen: list[list[int]] = []

    def recording(models_, micro_batch, ptx_batch, metrics):
        seen.append(micro_batch["row_id"].tolist())
        prompts = micro_batch["sequences"][:, :micro_batch.prompt_length].view(-1, 2, micro_batch.prompt_length)
        assert torch.equal(prompts[:, 0], prompts[:, 1])  # the two answers of one prompt
        yield from algorithm.losses(models_, micro_batch, ptx_batch, metrics)

    RLRun(cfg, accelerator, models, parts, [], 0, 4).update(batch, 0, recording, group_size=2)
    assert len(seen) == 4
    for rows in seen:
        assert all(rows[i] % 2 == 0 and rows[i + 1] == rows[i] + 1 for i in (0, 2))
    assert sorted(sum(seen[:2], [])) == sorted(sum(seen[2:], [])) == list(range(8))
    with pytest.raises(ValueError, match="whole groups of 3 rows"):
        RLRun(cfg, accelerator, models, parts, [], 0, 4).update(batch, 0, recording, group_size=3)


@pytest.mark.parametrize("bias, direction", [(5.0, "rises"), (-5.0, "falls")])
def test_safe_p3o_lambda_rises_when_the_cost_exceeds_the_threshold_and_falls_below(tiny, tmp_path, bias, direction):
    out = tmp_path / direction
    metrics = run(p3o_lag_config(tiny, out, cost_model=tiny.score_model("cost", bias), max_steps=4,
                                 lambda_update_delay_steps=1, save_steps=-1, sample_steps=0))
    assert metrics["global_step"] == 4 and metrics["unsafe_fraction"] == (1.0 if bias > 0 else 0.0)
    assert metrics["episode_cost"] == pytest.approx(bias, abs=1e-3)
    assert metrics["cost_tied_pairs"] == 1.0  # a constant cost: no pair tells its answers apart by cost
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lambdas = [e.value for e in EventAccumulator(str(out / "logs")).Reload().Scalars("train/lagrange_multiplier")]
    expected = expected_lambdas(bias, steps=4, delay=1)  # the delay keeps λ_0 for the first step
    assert lambdas == pytest.approx(expected, rel=1e-3)
    assert (lambdas[-1] > lambdas[0]) == (bias > 0)


def test_resume_after_a_crash_continues_exactly_and_the_run_holds_no_critic(tiny, tmp_path, monkeypatch):
    cost_model = tiny.score_model("cost", 0.7)  # J_C > d = 0: λ moves every step
    straight, crashed = straight_and_resumed(
        monkeypatch, tmp_path, lambda out, **extra: run(p3o_lag_config(tiny, out, cost_model=cost_model, max_steps=4, **extra)))

    for key in ("lagrange_multiplier", "episode_cost", "reward", "actor_loss", "clip_fraction"):
        assert history(crashed, key) == pytest.approx(history(straight, key), rel=1e-5, abs=1e-7), key
    assert len(set(history(straight, "lagrange_multiplier"))) == 4
    assert any(loss != 0 for loss in history(straight, "actor_loss"))
    assert_same_weights(straight / "model" / "model.safetensors", crashed / "model" / "model.safetensors")
    step_4 = crashed / "checkpoints" / "step-4"
    assert not list(step_4.glob("*critic*"))  # critic-free: the actor, its optimizer and λ
    state = load_file(str(step_4 / "algorithm_state.safetensors"))
    assert state["algorithm_state.episode_cost_windows"].shape == (1, 32)  # 4 steps × 4 prompts × 2 answers
