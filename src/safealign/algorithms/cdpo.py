"""C-DPO: constrained DPO by dual ascent on λ (Liu, Sun, Zheng, arXiv 2403.02475; docs/maths.md §6).

    safealign cdpo --model runs/sft/model --train_data runs/world/preferences/train.jsonl \
        --reward_model runs/rm/model --cost_model runs/cm/model --prompts runs/world/prompts/train.jsonl

The problem is Safe RLHF's, max_π E[r] − β·KL(π‖π_ref) s.t. E_π[c] ≤ d, solved through its Lagrangian dual without
rollouts in the policy's update. From the paper's summary (no public code was found; the details are our reading):

    λ_0 = lagrange
    for t = 0 .. iterations − 1:
        π_t     = DPO from π_ref (the SFT model, also the reference) on the pairs with soft labels
                  p = σ(r_λt(y_w) − r_λt(y_l)),  r_λ = r − λ·c                      (`dpo --variant cdpo`)
        Ĉ_t     = mean of c(x, y) over y ~ π_t(·|x) on `num_prompts` prompts          (the cost model)
        λ_{t+1} = max(0, λ_t + lambda_lr·(Ĉ_t − d))

Each inner DPO starts again from the reference, so π_t is the Lagrangian's maximiser at λ_t (dual descent in its
textbook form). The reference log-probs and the pairs' rewards and costs are computed once and handed to every
iteration. Iteration t lives in output_dir/iter-{t} (a whole `dpo` run); `dual.json` logs (λ_t, Ĉ_t); the last
policy is output_dir/model. A restarted run skips the iterations whose run is complete.
"""

from __future__ import annotations

import random
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safealign.algorithms import dpo
from safealign.config import ConfigError, config_field, save_config
from safealign.data.loading import load_prompts
from safealign.io import atomic_path, atomic_write_json
from safealign.models.generation import SamplingConfig, sample_responses
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.run_directory import read_json_or_none


@dataclass
class CDPOConfig(dpo.DPOConfig):
    """C-DPO: `dpo --variant cdpo` at λ_t, then λ's dual step on the policy's sampled cost, `iterations` times."""

    output_dir: str = config_field("runs/cdpo", help="Run directory: iter-{t}/ (one dpo run per λ), dual.json, model/ (the last policy).")
    variant: dpo.Variant = config_field("cdpo", help="Always cdpo (soft labels from reward_model − λ·cost_model).")
    iterations: int = config_field(3, help="Dual iterations: DPO runs, each at the λ the previous one's cost gave.")
    lambda_lr: float = config_field(1.0, help="η of λ ← max(0, λ + η·(Ĉ − d)).")
    threshold: float = config_field(0.0, help="d: the bound on the policy's mean cost (the cost model's units; 0 = its safe/unsafe boundary).")
    prompts: str = config_field("", help="Prompts whose sampled answers estimate E_π[c] (a prompt file, or a preference/SFT file's prompts); '' = train_data's.")
    num_prompts: int = config_field(256, help="Prompts sampled (seeded) for the cost estimate of each iteration.")
    max_new_tokens: int = config_field(64, help="Most response tokens per sampled answer.")
    temperature: float = config_field(1.0, help="Sampling temperature of the cost estimate (1: the policy's own distribution).")
    generation_batch_size: int = config_field(64, help="Answers per generation batch.")

    def __post_init__(self) -> None:
        if self.variant != "cdpo":
            raise ConfigError(f"cdpo: variant is always cdpo, got {self.variant}")
        super().__post_init__()
        if self.iterations < 1 or self.num_prompts < 1:
            raise ConfigError("cdpo: iterations and num_prompts must be >= 1")


def dual_step(lagrange: float, mean_cost: float, threshold: float, lambda_lr: float) -> float:
    """λ ← max(0, λ + η·(Ĉ − d)): projected gradient ascent on the dual."""
    return max(0.0, lagrange + lambda_lr * (mean_cost - threshold))


def sampled_cost(cfg: CDPOConfig, policy_dir: Path) -> float:
    """Ĉ: the cost model's mean cost of the policy's answers to `num_prompts` seeded prompts."""
    records = load_prompts(cfg.prompts or cfg.train_data)
    prompts = [r.prompt for r in random.Random(cfg.seed).sample(records, min(cfg.num_prompts, len(records)))]
    tokenizer = load_tokenizer(str(policy_dir))
    answers = sample_responses(build_causal_lm(str(policy_dir)).eval(), tokenizer, prompts,
                               SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
                               cfg.generation_batch_size, cfg.seed)
    costs = score_texts(load_score_model(cfg.cost_model), load_tokenizer(cfg.cost_model), prompts, answers,
                        cfg.max_length, cfg.per_device_eval_batch_size)
    return statistics.fmean(costs)


def run(cfg: CDPOConfig) -> dict[str, Any]:
    """The dual iterations; returns the last DPO run's metrics with lambda_t and cost_t of every iteration."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    history: list[dict[str, float]] = read_json_or_none(out / "dual.json") or []
    lagrange, metrics = cfg.lagrange, {}
    for t in range(cfg.iterations):
        step_dir = out / f"iter-{t}"
        if t < len(history):  # finished before a restart
            lagrange = history[t]["next_lagrange"]
            continue
        if t > 0:  # the same reference log-probs and pair scores: computed once, in iter-0
            for name in (dpo.REFERENCE_FILE, dpo.PAIR_SCORES_FILE):
                if not (step_dir / name).is_file():
                    step_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(out / "iter-0" / name, step_dir / name)
        metrics = dpo.run(replace(cfg, output_dir=str(step_dir), lagrange=lagrange))
        mean_cost = sampled_cost(cfg, step_dir / "model")
        next_lagrange = dual_step(lagrange, mean_cost, cfg.threshold, cfg.lambda_lr)
        history.append({"lagrange": lagrange, "cost": mean_cost, "next_lagrange": next_lagrange})
        atomic_write_json(out / "dual.json", history)
        lagrange = next_lagrange
    with atomic_path(out / "model") as tmp:
        shutil.copytree(out / f"iter-{cfg.iterations - 1}" / "model", tmp)
    summary = {**{f"lambda_{t}": h["lagrange"] for t, h in enumerate(history)},
               **{f"cost_{t}": h["cost"] for t, h in enumerate(history)}, "final_lambda": lagrange}
    result = {**(metrics or read_json_or_none(out / f"iter-{cfg.iterations - 1}" / "metrics.json") or {}), **summary}
    atomic_write_json(out / "metrics.json", result)
    return result
