"""PPO-Lagrangian: Safe RLHF itself (Dai et al. 2023, docs/maths.md §5). PPO's update with a second stream, the cost.

    max_θ E[R]  subject to  E[C] ≤ d          solved as   min_θ max_{λ≥0}  −E[R] + λ·(E[C] − d)

`PPOLag.train_step` is the whole update of one rollout batch, in this order (the experience and the clipped losses
are PPO's, `ppo.py`, with one stream more):
1. experience: log-probs, end scores R and C, both critics' values, both streams' signals and GAE → A^R, A^C;
2. λ from the episode costs of the window, before the policy update that uses it;
3. the actor's advantage A_t = (A^R_t − λ·A^C_t) / (1 + λ);
4. `ppo_epochs` passes of mini-batch updates: the actor's clipped surrogate on A (+ γ_ptx·L_PTX), each critic's
   clipped value loss.

What this file adds to `ppo.PPO`:
- the frozen cost model and the cost critic (initialised from the cost model unless `cost_critic_model`);
- the cost stream: c_t = +β·KL_t (+ C at the last response token), GAE with the cost critic → A^C;
- the actor's advantage A_t = (A^R_t − λ·A^C_t) / (1 + λ) (the KL weight stays exactly β for every λ);
- λ and the constraint's threshold d: `lagrangian.LagrangeMultiplier` (J_C over a window of episode costs, one
  step of log λ per rollout batch, before the PPO updates that use it; d fixed or from the cost model's costs); or,
  with the context-aware options, one λ_k per prompt category and the over-refusal guard (`lagrangian.
  ContextMultipliers`, docs/maths.md §10), each row's advantage then with its own λ_k.

Differences from the reference implementation (safe-rlhf), on purpose:
- λ moves once per rollout batch; the reference steps it once per micro-step with the same J_C.
- r_t and c_t carry β·KL each (docs/maths.md §3); the reference puts β/2 in each (an effective β/2 in A_t).
- The λ step is plain SGD on log λ (as in the reference), so it has no optimizer state beyond log λ; the
  checkpoint holds log λ and every process's cost window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from safealign.algorithms.lagrangian import Constrained, ConstraintConfig, LagrangeMultiplier, resolve_threshold
from safealign.algorithms.ppo import PPO, PPOConfig
from safealign.config import config_field
from safealign.training.rl import Experience, RLRun, train_rl


@dataclass
class PPOLagConfig(ConstraintConfig, PPOConfig):
    """Safe RLHF (PPO-Lagrangian). Defaults: the reference's (λ_0 1, α 0.1, λ_max 5, d 0, no delay, window 128),
    except β (0.05, reference 0.01), the prompt batch and the learning rates (sized for the tiny preset on
    SafeWorld; the reference's are for 7B models)."""

    output_dir: str = config_field("runs/ppo_lag", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    kl_coeff: float = config_field(0.05, help="β: weight of the per-token KL in both streams (reference 0.01, for a 7B model with its smaller learning rates).")
    cost_critic_model: str = config_field("", help="Initial cost critic: a score model or backbone directory; '' = the cost model.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_constraint()


class PPOLag(Constrained, PPO):
    """PPO with a reward and a cost stream and the Lagrange multiplier λ that weighs them."""

    streams = ("reward", "cost")

    def __init__(self, cfg: PPOLagConfig) -> None:
        super().__init__(cfg)
        self.lagrangian = LagrangeMultiplier(cfg, cfg.output_dir)

    def critic_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.critic_model or self.cfg.reward_model,
                "cost": self.cfg.cost_critic_model or self.cfg.cost_model}

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One rollout batch, in the paper's order: experience, λ, the combined advantage, the clipped updates."""
        scalars = self.experience(run.models, batch, run.accelerator, step)  # 1. A^R, A^C and the end costs C
        shared = self.constraint_step(batch, run.accelerator, step, scalars)  # 2. λ (and the unsafe share), before the update
        batch["advantages"] = self.actor_advantages(batch)  # 3. (A^R − λ·A^C) / (1 + λ)
        scalars.update(run.update(batch, step, self.losses))  # 4. actor (+ PTX) and both critics
        return scalars, shared

    def actor_advantages(self, batch: Experience) -> torch.Tensor:
        """A_t = (A^R_t − λ·A^C_t) / (1 + λ) with the current λ (B, T), whitened when `whiten_advantages`."""
        advantages = self.combined(batch["reward_advantages"], batch["cost_advantages"], batch)
        return self.whitened(advantages, batch)


def run(cfg: PPOLagConfig) -> dict[str, Any]:
    """Safe RLHF: PPO-Lagrangian on the reward and cost models; returns flat metrics (reward, cost,
    episode_cost, lagrange_multiplier, unsafe_fraction, kl, ...), and `threshold` (d)."""
    cfg, extra = resolve_threshold(cfg, cfg.tokenizer or cfg.actor_model)
    return {**train_rl(cfg, PPOLag(cfg)), "threshold": cfg.threshold, **extra}
