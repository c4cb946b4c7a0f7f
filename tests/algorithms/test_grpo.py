"""GRPO and GRPO-Lag: the group advantages and the KL term on hand-computed numbers, then tiny real models: an update
raises the answers with positive advantage, λ follows the constraint, a crashed run resumes exactly, no critic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safealign.algorithms.grpo import GRPO, GRPOConfig, spread_over_tokens
from safealign.algorithms.grpo_lag import GRPOLag, GRPOLagConfig, run
from safealign.algorithms.losses import group_advantages, kl_penalty
from safealign.algorithms.rollout import token_log_probs
from safealign.config import ConfigError
from safealign.data.formatting import tokenize_prompt
from safealign.data.loading import load_prompts
from safealign.models.actor_critic import causal_lm
from safealign.models.generation import SamplingConfig, generate_tokens
from safealign.models.tokenizer import load_tokenizer
from safealign.training.common import make_accelerator
from safealign.training.rl import Experience, RLRun
from safealign.training.rl_setup import build_models, prepare_training
from tiny_rl import FAST, TinySetup, assert_same_weights, expected_lambdas, history, straight_and_resumed  # noqa: E402  (tests/algorithms is on sys.path)


# ------------------------------------------------------------------------------------------------
# The maths, by hand
# ------------------------------------------------------------------------------------------------
def test_group_advantages_match_the_formulas_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two prompts × k = 4
    # Group 1: mean 3, deviations −2, −1, 0, 3; unbiased std √((4 + 1 + 0 + 9)/3) = √(14/3). Group 2: constant -> 0.
    std = math.sqrt(14 / 3)
    grpo = group_advantages(scores, 4, "grpo")
    assert grpo.tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert group_advantages(scores, 4, "grpo", scale=False).tolist() == pytest.approx([-2, -1, 0, 3, 0, 0, 0, 0])
    # RLOO: s_i minus the mean of the other three: 1 − 11/3, 2 − 10/3, 3 − 9/3, 6 − 6/3.
    assert group_advantages(scores, 4, "rloo").tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0], abs=1e-6)
    # A constant group gets exactly 0, even when rounding leaves its mean a hair off its values.
    assert group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_kl_penalty_is_k3_with_its_gradient_by_hand():
    log_probs = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # k3 = e^(ref − lp) − (ref − lp) − 1: token 0: e^−0.5 + 0.5 − 1; token 1: e^1 − 1 − 1; token 2 masked out.
    t0, t1 = math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0
    loss = kl_penalty(log_probs, ref, mask)
    assert loss.item() == pytest.approx((t0 + t1) / 2)
    loss.backward()
    # d k3 / d lp = 1 − e^(ref − lp), over the mean of 2 tokens.
    assert log_probs.grad.tolist()[0] == pytest.approx([(1 - math.exp(-0.5)) / 2, (1 - math.exp(1.0)) / 2, 0.0])
    assert kl_penalty(ref.clone(), ref, torch.ones(1, 3)).item() == 0.0


def test_grpo_lag_combines_the_streams_after_normalising_each():
    cfg = GRPOLagConfig(samples_per_prompt=2, lambda_init=2.0)
    algorithm = GRPOLag(cfg)
    # Rewards in one unit, costs in a unit 100× larger: per-stream z-scores make both ±1 within each pair.
    rewards, costs = torch.tensor([1.0, 3.0, 0.0, 0.5]), torch.tensor([100.0, -100.0, 300.0, 500.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])
    batch = Experience({"reward_advantages": group_advantages(rewards, 2), "cost_advantages": group_advantages(costs, 2),
                        "response_mask": mask}, 1)
    z = 1 / math.sqrt(2)  # a pair's deviations are ±d/2 and its unbiased std d/√2
    z_r, z_c = [-z, z, -z, z], [z, -z, -z, z]
    expected = [(r - 2.0 * c) / 3.0 for r, c in zip(z_r, z_c)]  # (Z_R − λ·Z_C)/(1 + λ), λ = 2
    advantages = algorithm.actor_advantages(batch)
    flat = [e * m for e, row in zip(expected, mask.tolist()) for m in row]
    assert advantages.flatten().tolist() == pytest.approx(flat, abs=1e-6)
    assert advantages.shape == (4, 2)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        GRPOConfig(samples_per_prompt=1)
    with pytest.raises(ConfigError, match="GRPO has no critic"):
        GRPOLagConfig(critic_layout="shared_backbone")
    with pytest.raises(ConfigError, match="mini-batches"):
        GRPOConfig(per_device_prompt_batch_size=3, samples_per_prompt=3, per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="lambda_init"):
        GRPOLagConfig(lambda_init=0.0)


# ------------------------------------------------------------------------------------------------
# Tiny real models
# ------------------------------------------------------------------------------------------------
def grpo_lag_config(tiny: TinySetup, out: Path, **overrides) -> GRPOLagConfig:
    return GRPOLagConfig(**{**dict(actor_model=tiny.actor, reward_model=tiny.reward_model, cost_model=tiny.cost_model,
                                   prompt_data=tiny.prompts, output_dir=str(out), max_steps=3), **FAST, **overrides})


def test_one_update_raises_the_answers_with_positive_advantage(tiny, tmp_path):
    """One optimizer step on a rollout of 4 prompts × 4 answers: to first order the log-likelihood of each answer
    moves with its advantage, so Σ_i A_i·Δ log π(y_i) > 0, and the answers above their group's mean gain on
    average against those below. Nothing but the actor is trained."""
    cfg = GRPOConfig(actor_model=tiny.actor, reward_model=tiny.reward_model, prompt_data=tiny.prompts,
                     output_dir=str(tmp_path), samples_per_prompt=4, per_device_prompt_batch_size=4,
                     per_device_train_batch_size=16, kl_coeff=0.0, learning_rate=1e-4, mixed_precision="no",
                     warmup_ratio=0.0)
    algorithm = GRPO(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(tiny.actor)
    models = build_models(cfg, algorithm.score_model_paths(), algorithm.critic_paths(), tokenizer, accelerator)
    assert models.critics == {}
    parts = prepare_training(cfg, accelerator, models, total_updates=10)
    assert list(parts) == ["actor"]
    prompts = [tokenize_prompt(tokenizer, r.prompt) for r in load_prompts(tiny.prompts)[:4]]
    rollout = generate_tokens(causal_lm(models.actor), tokenizer, prompts, SamplingConfig(max_new_tokens=8, num_samples=4),
                              torch.Generator().manual_seed(0))
    batch = Experience.from_rollout(rollout)
    models.actor.eval()
    algorithm.experience(models, batch, accelerator)
    batch["advantages"] = algorithm.actor_advantages(batch)
    before = (batch["log_probs"] * batch["response_mask"]).sum(-1)  # size = (16,)
    RLRun(cfg, accelerator, models, parts, [], 0, 1).update(batch, 0, algorithm.losses)
    models.actor.eval()
    with torch.no_grad():
        after = (token_log_probs(models.actor, batch) * batch["response_mask"]).sum(-1)
    change, advantages = after - before, batch["reward_advantages"]  # each (16,)
    assert (advantages != 0).any()
    assert (advantages * change).sum().item() > 0
    assert change[advantages > 0].mean().item() > change[advantages < 0].mean().item()


@pytest.mark.parametrize("bias, direction", [(5.0, "rises"), (-5.0, "falls")])
def test_grpo_lag_lambda_rises_when_the_cost_exceeds_the_threshold_and_falls_below(tiny, tmp_path, bias, direction):
    out = tmp_path / direction
    metrics = run(grpo_lag_config(tiny, out, cost_model=tiny.score_model("cost", bias), max_steps=4,
                                  lambda_update_delay_steps=1, save_steps=-1, sample_steps=0))
    assert metrics["global_step"] == 4 and metrics["unsafe_fraction"] == (1.0 if bias > 0 else 0.0)
    assert metrics["episode_cost"] == pytest.approx(bias, abs=1e-3)
    assert metrics["cost_constant_groups"] == 1.0  # a constant cost gives every group Z_C = 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lambdas = [e.value for e in EventAccumulator(str(out / "logs")).Reload().Scalars("train/lagrange_multiplier")]
    expected = expected_lambdas(bias, steps=4, delay=1)  # the delay keeps λ_0 for the first step
    assert lambdas == pytest.approx(expected, rel=1e-3)
    assert (lambdas[-1] > lambdas[0]) == (bias > 0)


def test_resume_after_a_crash_continues_exactly_and_the_run_holds_no_critic(tiny, tmp_path, monkeypatch):
    cost_model = tiny.score_model("cost", 0.7)  # J_C > d = 0: λ moves every step
    straight, crashed = straight_and_resumed(
        monkeypatch, tmp_path, lambda out, **extra: run(grpo_lag_config(tiny, out, cost_model=cost_model, max_steps=4, **extra)))

    for key in ("lagrange_multiplier", "episode_cost", "reward", "actor_loss", "kl_loss"):
        assert history(crashed, key) == pytest.approx(history(straight, key), rel=1e-5, abs=1e-7), key
    assert len(set(history(straight, "lagrange_multiplier"))) == 4
    assert_same_weights(straight / "model" / "model.safetensors", crashed / "model" / "model.safetensors")
    step_4 = crashed / "checkpoints" / "step-4"
    assert not list(step_4.glob("*critic*"))  # critic-free: the actor, its optimizer and λ
    state = load_file(str(step_4 / "algorithm_state.safetensors"))
    assert state["algorithm_state.episode_cost_windows"].shape == (1, 32)  # 4 steps × 4 prompts × 2 answers
    # Every answer's advantage is spread over its tokens: GRPO's actor advantage is (B, T) with zeros on padding.
    assert spread_over_tokens(torch.tensor([2.0]), torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 2.0, 0.0]]
