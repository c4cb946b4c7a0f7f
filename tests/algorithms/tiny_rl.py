"""What the RL algorithm tests share: a tiny SafeWorld, policy and score models (`tiny_setup`), a small rollout shape
(`FAST`), PPO-Lag's config on them (`lag_config`), and the RL loop's own set-up with one experience batch (`setup`,
`update`). The fixtures that build the tiny setup are in conftest.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safealign.algorithms.ppo_lag import PPOLag, PPOLagConfig
from safealign.data.formatting import tokenize_prompt
from safealign.data.loading import load_prompts
from safealign.data.safeworld import WorldConfig, generate_world, world_texts, write_world
from safealign.models.actor_critic import causal_lm
from safealign.models.generation import SamplingConfig, generate_tokens
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import build_score_model, save_score_model
from safealign.models.tokenizer import load_tokenizer, train_tokenizer
from safealign.training.common import make_accelerator
from safealign.training.rl import Experience, RLRun
from safealign.training.rl_setup import build_models, prepare_training


@dataclass
class TinySetup:
    root: Path
    actor: str
    reward_model: str
    cost_model: str
    prompts: str

    def score_model(self, name: str, bias: float) -> str:
        """A cost/reward model that scores every text `bias` (head weight 0), saved once under root."""
        path = self.root / f"{name}_constant_{bias:g}"
        if not path.is_dir():
            tokenizer = load_tokenizer(self.actor)
            model = build_score_model("tiny", score_type=name, tokenizer=tokenizer, seed=3)
            with torch.no_grad():
                model.backbone.score.weight.zero_()
                model.backbone.score.bias.fill_(bias)
            save_score_model(model, path, tokenizer)
        return str(path)


def tiny_setup(root: Path) -> TinySetup:
    """A small SafeWorld, a BPE trained on its text, an untrained tiny policy, and tiny reward/cost score models."""
    world = generate_world(WorldConfig(sft_examples=60, train_pairs=20, test_pairs=10, test_harmful=14, test_benign=10,
                                       test_borderline=6, redteam_prompts=14))
    write_world(world, root / "world")
    tokenizer = train_tokenizer(list(world_texts(world))[:1500], vocab_size=400)
    actor = build_causal_lm("tiny", tokenizer, seed=0)
    actor.save_pretrained(root / "actor")
    tokenizer.save_pretrained(root / "actor")
    for seed, name in [(1, "reward"), (2, "cost")]:
        save_score_model(build_score_model("tiny", score_type=name, tokenizer=tokenizer, seed=seed), root / name, tokenizer)
    return TinySetup(root, str(root / "actor"), str(root / "reward"), str(root / "cost"),
                     str(root / "world" / "prompts" / "train.jsonl"))


# Small and fast: 4 prompts x 2 samples, 8 new tokens, 2 mini-batches of 4 rows.
FAST = dict(per_device_prompt_batch_size=4, samples_per_prompt=2, per_device_train_batch_size=4, max_new_tokens=8,
            mixed_precision="no", logging_steps=1, sample_steps=1, save_steps=1, warmup_ratio=0.0)


def history(out: Path, key: str) -> list[float]:
    """A logged scalar at every step, from the newest checkpoint's trainer_state.json."""
    last = sorted((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))[-1]
    return [h[key] for h in json.loads((last / "trainer_state.json").read_text())["log_history"]]


def expected_lambdas(episode_cost: float, steps: int, delay: int = 0, threshold: float = 0.0, lambda_lr: float = 0.1,
                     lambda_max: float = 5.0) -> list[float]:
    """λ after each step when every step's J_C is `episode_cost`, written from the update rule
    log λ ← min(log λ + α·λ·(J_C − d), log λ_max) with plain floats (λ_0 = 1; the first `delay` steps keep it)."""
    log_lambda, lambdas = 0.0, []
    for step in range(steps):
        if step >= delay:
            log_lambda = min(log_lambda + lambda_lr * math.exp(log_lambda) * (episode_cost - threshold), math.log(lambda_max))
        lambdas.append(math.exp(log_lambda))
    return lambdas


def crash_rl_update(monkeypatch, at_step: int = 2):
    """Make the RL loop's update raise a RuntimeError("simulated crash") at 0-based step `at_step` (by default the
    third rollout, after step-2 was saved); returns the function that undoes it."""
    original = RLRun.update

    def crash(run, batch, step, losses, **kwargs):
        if step == at_step:
            raise RuntimeError("simulated crash")
        return original(run, batch, step, losses, **kwargs)

    monkeypatch.setattr(RLRun, "update", crash)
    return lambda: monkeypatch.setattr(RLRun, "update", original)


def straight_and_resumed(monkeypatch, root: Path, train) -> tuple[Path, Path]:
    """`train(out, **extra)` run straight into root/straight, and into root/crashed crashed at the third rollout
    (after step-2 was saved) then resumed with resume=latest. Returns both run directories."""
    straight, crashed = root / "straight", root / "crashed"
    train(straight)
    undo = crash_rl_update(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed)
    undo()
    train(crashed, resume="latest")
    return straight, crashed


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    """The two safetensors files hold the same tensors (to atol)."""
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=atol, rtol=0)


def lag_config(tiny: TinySetup, out: Path, **overrides) -> PPOLagConfig:
    return PPOLagConfig(**{**dict(actor_model=tiny.actor, reward_model=tiny.reward_model, cost_model=tiny.cost_model,
                                  prompt_data=tiny.prompts, output_dir=str(out), max_steps=3), **FAST, **overrides})


def setup(tiny: TinySetup, out: Path, layout: str, **overrides):
    """The loop's own set-up (models, optimizers, prepared) and one experience batch: 4 prompts × 2 samples."""
    cfg = lag_config(tiny, out, critic_layout=layout, learning_rate=1e-3, critic_learning_rate=1e-3, **overrides)
    algorithm = PPOLag(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(tiny.actor)
    models = build_models(cfg, algorithm.score_model_paths(), algorithm.critic_paths(), tokenizer, accelerator)
    parts = prepare_training(cfg, accelerator, models, total_updates=100)
    prompts = [tokenize_prompt(tokenizer, r.prompt) for r in load_prompts(tiny.prompts)[:4]]
    rollout = generate_tokens(causal_lm(models.actor), tokenizer, prompts, SamplingConfig(max_new_tokens=8, num_samples=2),
                              torch.Generator().manual_seed(0))
    return cfg, algorithm, accelerator, models, parts, Experience.from_rollout(rollout)


def update(cfg, accelerator, algorithm, models, parts, batch, step: int) -> dict[str, float]:
    """The RL loop's optimizer steps on one experience batch (2 mini-batches of 4 rows, no PTX)."""
    return RLRun(cfg, accelerator, models, parts, [], 0, 2).update(batch, step, algorithm.losses)
