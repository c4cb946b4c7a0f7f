"""GRPO-Lag: Safe RLHF's constrained problem solved with GRPO's critic-free update (docs/maths.md §8).

    max_θ E[R]  subject to  E[C] ≤ d          solved as   min_θ max_{λ≥0}  −E[R] + λ·(E[C] − d)

The constraint and λ are PPO-Lag's (`lagrangian.py`); the update is GRPO's (`grpo.py`) with a second stream.
`GRPOLag.train_step`, one rollout batch of k answers per prompt, in this order:
1. experience (GRPO's): log-probs under π_old and π_ref; end scores R and C of the frozen reward and cost models;
   each stream's group advantage, computed separately: Z_R from the rewards, Z_C from the costs, each against the
   answer's k − 1 siblings (a group whose scores do not vary gives that stream 0);
2. λ from the episode costs C of the window, before the update that uses it (PPO-Lag's rule);
3. the actor's advantage A = (Z_R − λ·Z_C) / (1 + λ), on every token of the answer: Safe RLHF's combination of
   per-stream advantages, not an advantage of R − λ·C (Constrained GRPO, arXiv 2602.05863: scalarise advantages, not
   rewards). By default Z is RLOO's leave-one-out advantage, each stream in its own units (as PPO-Lag's A^R and A^C
   are); `advantage_estimator: grpo` z-scores each stream first, as that paper advises, which on SafeWorld's dev split
   left the policy more harmful and less helpful (docs/results.md);
4. GRPO's `ppo_epochs` passes of mini-batch updates: the clipped surrogate on A + β·k3 KL to the reference.

Plain GRPO (`safealign grpo`) is the λ = 0 baseline: the same update without the cost stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from safealign.algorithms.grpo import GRPO, GRPOConfig, spread_over_tokens
from safealign.algorithms.lagrangian import Constrained, ConstraintConfig, LagrangeMultiplier, resolve_threshold
from safealign.config import config_field
from safealign.training.rl import Experience, RLRun, train_rl


@dataclass
class GRPOLagConfig(ConstraintConfig, GRPOConfig):
    """GRPO-Lagrangian. The constraint's defaults are PPO-Lag's (λ_0 1, α 0.1, λ_max 5, d 0, window 128); the advantage
    is RLOO's by default (chosen on SafeWorld's dev split over three worlds, confirmed on test: docs/results.md)."""

    output_dir: str = config_field("runs/grpo_lag", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    advantage_estimator: Literal["grpo", "rloo"] = config_field(
        "rloo", help="rloo (default here) = each answer's score minus the mean of the other k − 1, each stream in its own "
                     "units, as Safe RLHF weighs them; grpo = z-scored per stream (Constrained GRPO's advice), which was more "
                     "harmful and less helpful on SafeWorld's dev split.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_constraint()


class GRPOLag(Constrained, GRPO):
    """GRPO with a reward and a cost stream and the Lagrange multiplier λ that weighs their group advantages."""

    streams = ("reward", "cost")

    def __init__(self, cfg: GRPOLagConfig) -> None:
        super().__init__(cfg)
        self.lagrangian = LagrangeMultiplier(cfg, cfg.output_dir)

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One rollout batch: experience (Z_R, Z_C), λ, the combined advantage, the clipped updates."""
        scalars = self.experience(run.models, batch, run.accelerator)  # 1. Z_R, Z_C and the end costs C
        shared = self.constraint_step(batch, run.accelerator, step, scalars)  # 2. λ (and the unsafe share), before the update
        batch["advantages"] = self.actor_advantages(batch)  # 3. (Z_R − λ·Z_C) / (1 + λ)
        scalars.update(run.update(batch, step, self.losses))  # 4. the actor (+ PTX)
        return scalars, shared

    def actor_advantages(self, batch: Experience) -> torch.Tensor:
        """A = (Z_R − λ·Z_C) / (1 + λ) with the current λ, on every token of each answer: (B, T)."""
        advantages = self.combined(batch["reward_advantages"], batch["cost_advantages"], batch)  # (B,)
        return spread_over_tokens(advantages, batch["response_mask"])


def run(cfg: GRPOLagConfig) -> dict[str, Any]:
    """GRPO-Lag on the reward and cost models; returns flat metrics (reward, cost, episode_cost, lagrange_multiplier,
    unsafe_fraction, kl, ...), and `threshold` (d)."""
    cfg, extra = resolve_threshold(cfg, cfg.tokenizer or cfg.actor_model)
    return {**train_rl(cfg, GRPOLag(cfg)), "threshold": cfg.threshold, **extra}
