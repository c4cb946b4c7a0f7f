"""Safe P3O: Safe RLHF's constrained problem solved with P3O's pairwise update (docs/maths.md §9).

    max_θ E[R]  subject to  E[C] ≤ d          solved as   min_θ max_{λ≥0}  −E[R] + λ·(E[C] − d)

The constraint and λ are PPO-Lag's (`lagrangian.py`); the update is P3O's (`p3o.py`) with a second stream.
`P3OLag.train_step`, one rollout batch of two answers per prompt, in this order:
1. experience (P3O's): log-probs under π_old and π_ref, each answer's ℓ^old; end scores R and C of the frozen reward
   and cost models;
2. λ from the episode costs C of the window, before the update that uses it (PPO-Lag's rule);
3. each answer's score s = (R − λ·C) / (1 + λ), Safe RLHF's combination of its two streams, so that the pair's
   score difference is [(R_0 − R_1) − λ·(C_0 − C_1)] / (1 + λ) and q = that − β·(ℓ_0^old − ℓ_1^old): the KL weight
   stays β for every λ, as in PPO-Lag (docs/maths.md §5). Differences of both scores: invariant to a per-prompt
   shift of the reward and of the cost, each a Bradley-Terry model;
4. P3O's `ppo_epochs` passes of mini-batch updates of whole pairs.

Plain P3O (`safealign p3o`) is the λ = 0 baseline: the same update without the cost stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from safealign.algorithms.lagrangian import Constrained, ConstraintConfig, LagrangeMultiplier, resolve_threshold
from safealign.algorithms.p3o import P3O, P3OConfig
from safealign.config import config_field
from safealign.training.rl import Experience, RLRun, train_rl


@dataclass
class P3OLagConfig(ConstraintConfig, P3OConfig):
    """Safe P3O. The constraint's defaults are PPO-Lag's (λ_0 1, α 0.1, λ_max 5, d 0, window 128)."""

    output_dir: str = config_field("runs/p3o_lag", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_constraint()


class P3OLag(Constrained, P3O):
    """P3O with a reward and a cost stream and the Lagrange multiplier λ that weighs their pair differences."""

    streams = ("reward", "cost")

    def __init__(self, cfg: P3OLagConfig) -> None:
        super().__init__(cfg)
        self.lagrangian = LagrangeMultiplier(cfg, cfg.output_dir)

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One rollout batch: experience (R, C, ℓ^old), λ, each answer's combined score, the pairwise clipped updates."""
        scalars = self.experience(run.models, batch)  # 1. R, C and ℓ^old
        shared = self.constraint_step(batch, run.accelerator, step, scalars)  # 2. λ (and the unsafe share), before the update
        batch["objective"] = self.objective(batch)  # 3. (R − λ·C) / (1 + λ)
        scalars.update(run.update(batch, step, self.losses, group_size=2))  # 4. the actor (+ PTX)
        return scalars, shared

    def objective(self, batch: Experience) -> torch.Tensor:
        """s = (R − λ·C) / (1 + λ) with the current λ, each answer's (B,)."""
        return self.combined(batch["reward_end_scores"], batch["cost_end_scores"], batch)


def run(cfg: P3OLagConfig) -> dict[str, Any]:
    """Safe P3O on the reward and cost models; returns flat metrics (reward, cost, episode_cost, lagrange_multiplier,
    unsafe_fraction, kl, ...), and `threshold` (d)."""
    cfg, extra = resolve_threshold(cfg, cfg.tokenizer or cfg.actor_model)
    return {**train_rl(cfg, P3OLag(cfg)), "threshold": cfg.threshold, **extra}
