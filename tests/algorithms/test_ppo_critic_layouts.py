"""The RL loop's critic layouts (`critic_layout`): full copies of the score models, value heads on the actor's
backbone, LoRA adapters on the frozen score models. Each must give the same experience maths, learn, keep the
frozen scores frozen, and checkpoint only what it trains. (Exact resume of every layout: test_ppo_lag.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from safealign.algorithms.ppo_lag import run
from safealign.algorithms.rollout import critic_values, end_scores, policy_and_values, token_log_probs
from safealign.models.actor_critic import ActorCritic, ridge_solution
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import load_score_model
from tiny_rl import lag_config, setup, update  # noqa: E402  (tests/algorithms is on sys.path)

LAYOUTS = ("full", "shared_backbone", "lora")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_has_finite_losses_and_its_critics_learn_a_fixed_batch(tiny, tmp_path, layout):
    cfg, algorithm, accelerator, models, parts, batch = setup(tiny, tmp_path, layout)
    algorithm.experience(models, batch, accelerator, 1)
    batch["advantages"] = algorithm.actor_advantages(batch)
    losses = []
    for step in range(6):  # the same rollout, its returns fixed: the value losses must fall
        metrics = update(cfg, accelerator, algorithm, models, parts, batch, step)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        losses.append(metrics["reward_critic_loss"] + metrics["cost_critic_loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(parts) == ({"actor"} if layout == "shared_backbone" else {"actor", "reward_critic", "cost_critic"})


def test_lora_and_shared_backbone_experience_starts_where_the_full_layout_does(tiny, tmp_path):
    """At initialisation a LoRA critic is its score model (B = 0) and the value heads are zero: the same log-probs
    and scores in every layout, the same values for full and lora, V = 0 for the heads."""
    experience = {}
    for layout in LAYOUTS:
        _, algorithm, accelerator, models, _, batch = setup(tiny, tmp_path, layout)
        algorithm.experience(models, batch, accelerator, 1)  # not step 0: the heads are not fitted
        experience[layout] = batch
    full, lora, shared = experience["full"], experience["lora"], experience["shared_backbone"]
    for batch in (lora, shared):
        torch.testing.assert_close(batch["sequences"], full["sequences"], atol=0, rtol=0)
        for key in ("log_probs", "ref_log_probs", "scores_reward", "scores_cost"):
            torch.testing.assert_close(batch[key], full[key], atol=1e-6, rtol=0)
    for key in ("reward_values", "cost_values", "reward_returns", "cost_returns"):
        torch.testing.assert_close(lora[key], full[key], atol=1e-6, rtol=0)
        if key.endswith("values"):
            assert shared[key].abs().max() == 0


def test_shared_backbone_is_one_forward_of_the_actor_and_saves_a_plain_policy(tiny, tmp_path):
    cfg, algorithm, accelerator, models, parts, batch = setup(tiny, tmp_path, "shared_backbone")
    assert isinstance(models.actor, ActorCritic) and models.critics == {}
    assert set(models.actor.value_heads) == {"reward", "cost"}
    calls = []
    models.actor.lm.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        log_probs, values = policy_and_values(models, batch)
        assert len(calls) == 1 and set(values) == {"reward", "cost"}
        torch.testing.assert_close(log_probs, token_log_probs(models.actor.lm, batch), atol=0, rtol=0)
    # The heads' gradients reach the backbone once they are non-zero; position ids from the mask as everywhere.
    with torch.no_grad():
        models.actor.value_heads["cost"].weight.fill_(0.01)
    _, values = policy_and_values(models, batch)
    values["cost"].sum().backward()
    assert models.actor.lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    out = tmp_path / "run"
    run(lag_config(tiny, out, critic_layout="shared_backbone", max_steps=1, sample_steps=0))
    saved = load_file(str(out / "checkpoints" / "step-1" / "actor.safetensors"))
    assert {"value_heads.reward.weight", "value_heads.cost.bias"} <= set(saved)
    policy = load_file(str(out / "model" / "model.safetensors"))
    assert not any(k.startswith(("lm.", "value_heads")) for k in policy)
    build_causal_lm(str(out / "model"))  # a plain causal LM directory, as `safealign evaluate` reads


def test_ridge_solution_recovers_a_linear_map_and_leaves_the_bias_free():
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(200, 5, generator=generator, dtype=torch.float64)  # size = (N, H)
    features = torch.cat([states, torch.ones(200, 1, dtype=torch.float64)], dim=1)  # size = (N, H + 1)
    theta = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [-1.0, 1.0], [2.0, 0.25], [-4.0, 7.0]], dtype=torch.float64)
    targets = features @ theta  # size = (N, 2): two streams, exact linear targets
    gram, moments = features.T @ features, features.T @ targets
    torch.testing.assert_close(ridge_solution(gram, moments, 200, ridge=0.0), theta)
    # A huge penalty shrinks the weights to 0 but not the bias, which becomes the targets' mean.
    shrunk = ridge_solution(gram, moments, 200, ridge=1e9)
    assert shrunk[:-1].abs().max() < 1e-6
    torch.testing.assert_close(shrunk[-1], targets.mean(0), atol=1e-6, rtol=0)


def test_shared_backbone_heads_are_fitted_to_the_first_rollouts_end_scores(tiny, tmp_path):
    """Before the first update the zero heads become a baseline: with a free bias the values' token mean equals the
    end scores' token mean exactly (normal equation of the bias), per stream, and both fits explain something."""
    cfg, algorithm, accelerator, models, parts, batch = setup(tiny, tmp_path, "shared_backbone")
    fit = algorithm.experience(models, batch, accelerator, 0)  # step 0: the heads are fitted first
    mask = batch["response_mask"].float()  # size = (B, T)
    for stream in ("reward", "cost"):
        assert 0.0 < fit[f"{stream}_value_head_fit_r2"] <= 1.0 + 1e-9, fit
        end = batch[f"scores_{stream}"].unsqueeze(1) * mask  # S at every response token, size = (B, T)
        assert batch[f"{stream}_values"].abs().max() > 0
        torch.testing.assert_close((batch[f"{stream}_values"] * mask).sum() / mask.sum(), end.sum() / mask.sum(),
                                   atol=1e-4, rtol=0)


def test_lora_critics_share_the_frozen_weights_which_stay_frozen(tiny, tmp_path):
    cfg, algorithm, accelerator, models, parts, batch = setup(tiny, tmp_path, "lora")
    critic = models.critics["reward"]
    trained = [p for p in critic.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trained) < 0.1 * sum(p.numel() for p in critic.parameters())
    assert all(p.dtype == torch.float32 for p in trained)
    reward_model = load_score_model(tiny.reward_model).eval().to(batch["sequences"].device)
    with torch.no_grad():
        before = end_scores(models.score_models["reward"], batch)
        torch.testing.assert_close(before, end_scores(reward_model, batch), atol=1e-6, rtol=0)
    algorithm.experience(models, batch, accelerator, 1)
    batch["advantages"] = algorithm.actor_advantages(batch)
    for step in range(2):
        update(cfg, accelerator, algorithm, models, parts, batch, step)
    with torch.no_grad():
        torch.testing.assert_close(end_scores(models.score_models["reward"], batch), before, atol=0, rtol=0)
        assert not torch.allclose(critic_values(critic, batch), batch["reward_values"])  # the critic moved
    assert all(p.requires_grad for p in trained)  # disabling the adapter for the frozen scores gave them back
    # The checkpoint holds the adapters and the head copy, not the shared weights.
    out = tmp_path / "run"
    run(lag_config(tiny, out, critic_layout="lora", max_steps=1, sample_steps=0, lora_rank=2,
                   lora_target_modules=["q_proj", "v_proj"]))
    saved = load_file(str(out / "checkpoints" / "step-1" / "cost_critic.safetensors"))
    assert saved and all(".lora_" in k or ".modules_to_save." in k for k in saved)
    assert {v.shape[0] for k, v in saved.items() if ".lora_A." in k} == {2}
    assert not any("k_proj" in k for k in saved)


def test_lora_critic_must_start_from_its_score_model(tiny, tmp_path):
    from safealign.config import ConfigError

    with pytest.raises(ConfigError, match="adapter on the frozen reward model"):
        run(lag_config(tiny, tmp_path / "x", critic_layout="lora", critic_model=tiny.cost_model))
