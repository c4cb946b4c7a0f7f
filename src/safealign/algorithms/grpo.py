"""GRPO: critic-free RL on the reward model (Shao et al. 2024, DeepSeekMath; docs/maths.md §8), the update that
GRPO-Lag builds on (`grpo_lag.py`). RLOO (Ahmadian et al. 2024) is the same update with another baseline.

PPO needs a critic per stream to tell a good token from a bad one; GRPO samples k answers per prompt and lets them
be each other's baseline: an answer's advantage is how much better its end score is than its siblings'. No value
model, no GAE, no critic optimizer: the run holds the actor, its frozen reference and the frozen score models.

`GRPO.train_step` is the whole update of one rollout batch of `samples_per_prompt` (k) answers per prompt:
1. experience, without gradients: log-probs of the response tokens under the actor (π_old) and the frozen
   reference (π_ref); end scores of the score models (an answer cut at max_new_tokens may lose
   `missing_eos_penalty` from its reward, as in PPO);
2. per stream, the group advantage of each answer (`losses.group_advantages`: z-scored within its prompt's k
   answers, or RLOO's leave-one-out baseline), the same number on every token of the answer;
3. `ppo_epochs` passes of mini-batch updates of the actor: L = L_clip(ρ, A) + β·L_KL (+ γ_ptx·L_PTX), with
   L_clip PPO's clipped surrogate (per-answer token mean, then the batch mean: the GRPO paper's normalisation) and
   L_KL the k3 estimate of KL(π ‖ π_ref) on the sampled tokens, a loss term rather than a reward term (GRPO's
   choice: the advantage stays a pure comparison of end scores).

The prompts per step, `ppo_epochs` and the mini-batches are the RL loop's options, as for PPO (`training.rl`);
the rollout has prompts × k rows. A multi-process run forms each group on one process (every process samples its
own prompts' k answers), so the group statistics need no communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from accelerate import Accelerator

from safealign.algorithms.losses import approx_kl, clip_fraction, group_advantages, kl_penalty, ppo_actor_loss
from safealign.algorithms.critic_free import CriticFree, CriticFreeConfig, critic_free_experience
from safealign.algorithms.rollout import ptx_loss, token_log_probs
from safealign.config import ConfigError, config_field
from safealign.training.rl import Experience, RLRun, train_rl
from safealign.training.rl_setup import RLModels


@dataclass
class GRPOConfig(CriticFreeConfig):
    """GRPO on the reward model (plain critic-free RLHF). Defaults: k = 4 answers per prompt, β = 0.05 (PPO-Lag's),
    the RL loop's learning rate and mini-batches."""

    output_dir: str = config_field("runs/grpo", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    samples_per_prompt: int = config_field(4, help="k: answers sampled per prompt, each other's baseline (>= 2; rows per rollout = prompts × k).")
    kl_coeff: float = config_field(0.05, help="β: weight of the KL to the reference in the loss (k3 estimator on the sampled tokens).")
    advantage_estimator: Literal["grpo", "rloo"] = config_field(
        "grpo", help="grpo = each answer's score z-scored within its prompt's k answers; rloo = its score minus the mean of the other k − 1.")
    scale_advantages: bool = config_field(True, help="grpo: divide by the group's standard deviation (false: Dr. GRPO's centred scores).")
    clip_range_ratio: float = config_field(0.2, help="ε: the ratio π/π_old is clipped to [1 − ε, 1 + ε].")

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be >= 2 (each answer's baseline is its siblings), got {self.samples_per_prompt}")
        self.check_critic_free("GRPO")
        if self.kl_coeff < 0 or self.clip_range_ratio <= 0:
            raise ConfigError("kl_coeff must be >= 0 and clip_range_ratio > 0")


class GRPO(CriticFree):
    """Critic-free RL with one stream, the reward."""

    cfg: GRPOConfig

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One rollout batch: the experience and group advantages, the actor's advantage, the clipped updates."""
        scalars = self.experience(run.models, batch, run.accelerator)
        batch["advantages"] = self.actor_advantages(batch)
        scalars.update(run.update(batch, step, self.losses))
        return scalars, {}

    @torch.no_grad()
    def experience(self, models: RLModels, batch: Experience, accelerator: Accelerator) -> dict[str, float]:
        """Fill `batch`: log-probs (π_old, π_ref), the end scores scores_{name} (B,) and each stream's group advantage
        {stream}_advantages (B,); return this process's rollout scalars."""
        cfg = self.cfg
        ends, scalars = critic_free_experience(models, batch, cfg.missing_eos_penalty)  # log-probs, end scores (B,)
        ends = self.stream_end_scores(ends, batch)
        k = cfg.samples_per_prompt
        for stream in self.streams:
            advantages = group_advantages(ends[stream].float(), k, cfg.advantage_estimator, cfg.scale_advantages)  # (B,)
            batch[f"{stream}_advantages"] = advantages
            flat = ends[stream].float().view(-1, k)  # size = (prompts, k)
            scalars[f"{stream}_group_std"] = flat.std(dim=1).mean().item()  # the spread the advantage divides by
            scalars[f"{stream}_constant_groups"] = (flat.amax(1) == flat.amin(1)).float().mean().item()  # no signal
        return scalars

    def actor_advantages(self, batch: Experience) -> torch.Tensor:
        """The reward's group advantage of each answer on each of its tokens: (B, T)."""
        return spread_over_tokens(batch["reward_advantages"], batch["response_mask"])

    def losses(self, models: RLModels, batch: Experience, ptx_batch: dict[str, torch.Tensor] | None,
               metrics: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """The micro-batch's loss L = L_clip + β·L_KL (one forward of the actor), then γ_ptx·L_PTX."""
        cfg, mask = self.cfg, batch["response_mask"]
        log_probs = token_log_probs(models.actor, batch)  # size = (B, T), with grad
        actor_loss = ppo_actor_loss(log_probs, batch["log_probs"], batch["advantages"], mask, cfg.clip_range_ratio)
        kl_loss = kl_penalty(log_probs, batch["ref_log_probs"], mask)
        metrics.update(actor_loss=actor_loss.detach(), kl_loss=kl_loss.detach(),
                       approx_kl=approx_kl(log_probs, batch["log_probs"], mask),
                       clip_fraction=clip_fraction(log_probs, batch["log_probs"], mask, cfg.clip_range_ratio))
        yield actor_loss + cfg.kl_coeff * kl_loss
        if ptx_batch is not None:
            yield cfg.ptx_coeff * ptx_loss(models.actor, ptx_batch, metrics)


def spread_over_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per answer (B,) on every one of its response tokens: (B, T)."""
    return advantages.unsqueeze(1).to(torch.float32) * mask.to(torch.float32)


def run(cfg: GRPOConfig) -> dict[str, Any]:
    """GRPO (or RLOO) of the actor on the reward model; returns flat metrics (reward, kl, ..., samples_per_second)."""
    return train_rl(cfg, GRPO(cfg))
