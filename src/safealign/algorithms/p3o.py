"""P3O: Pairwise Proximal Policy Optimization (Wu et al. 2023, arXiv 2310.00212; docs/maths.md §9), the update that
safe P3O builds on (`p3o_lag.py`). Critic-free, as GRPO (`grpo.py`), but on pairs.

A Bradley-Terry reward model only knows differences: r and r + δ(x) fit the same preferences. P3O's gradient uses
only the difference of the two answers' scores, so it is invariant to any per-prompt shift δ(x); and it treats an
answer as one action (its log-likelihood, summed over tokens), with no value model and no per-token credit.

`P3O.train_step` is the whole update of one rollout batch of two answers per prompt (rows 2j, 2j + 1: prompt j):
1. experience, without gradients (`critic_free.critic_free_experience`, GRPO's): log-probs of the response tokens under
   the actor (π_old) and the frozen reference (π_ref); end scores of the score models (a cut answer may lose
   `missing_eos_penalty` from its reward); each answer's sequence log-ratio ℓ^old = Σ_t (log π_old − log π_ref);
2. each answer's score s (here its reward R), of which the update uses the pair's difference s_0 − s_1;
3. `ppo_epochs` passes of mini-batch updates of the actor, each micro-batch of whole pairs (`RLRun.update` with
   `group_size=2`): `losses.p3o_loss`, the clipped pairwise policy gradient with the KL to the reference in the
   pair's score difference q = (s_0 − s_1) − β·(ℓ_0^old − ℓ_1^old), the joint importance weight clamped to
   [1/c, c] and the clip on the change of the pair's log-likelihood gap (the author's code, thwu1/trlx).

The prompts per step, `ppo_epochs` and the mini-batches are the RL loop's options (`training.rl`); the rollout has
prompts × 2 rows. Each process samples its own prompts' two answers, so a pair never spans processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch

from safealign.algorithms.losses import approx_kl, p3o_loss
from safealign.algorithms.critic_free import CriticFree, CriticFreeConfig, critic_free_experience
from safealign.algorithms.rollout import ptx_loss, token_log_probs
from safealign.config import ConfigError, config_field
from safealign.training.rl import Experience, RLRun, train_rl
from safealign.training.rl_setup import RLModels


@dataclass
class P3OConfig(CriticFreeConfig):
    """P3O on the reward model. Defaults: the author's ε 0.2 and c 10 with token normalisation, β = 0.05 (PPO-Lag's
    and GRPO's), the RL loop's learning rate, mini-batches and one update epoch."""

    output_dir: str = config_field("runs/p3o", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    samples_per_prompt: int = config_field(2, help="Answers sampled per prompt: P3O compares a pair, so 2 (rows per rollout = prompts × 2).")
    kl_coeff: float = config_field(
        0.05, help="β: weight of the sequence KL to the reference in the pair's score difference, q = (s_0 − s_1) − β·(ℓ_0 − ℓ_1).")
    clip_range: float = config_field(
        0.2, help="ε: the pair's log-likelihood gap ℓ_0 − ℓ_1 is clipped to its rollout-time value ± ε (the author's cliprange).")
    clip_range_ratio: float = config_field(
        10.0, help="c > 1: the pair's joint importance weight π/π_old is clamped to [1/c, c] (the author's cliprange_ratio; not PPO's ε).")
    loss_normalization: Literal["tokens", "pairs"] = config_field(
        "tokens", help="The micro-batch's summed pair losses divided by: tokens = the response tokens of both answers "
                       "(the author's default, avg_tokenwise); pairs = 2 × the pairs.")

    def __post_init__(self) -> None:
        if self.samples_per_prompt != 2:
            raise ConfigError(f"samples_per_prompt must be 2 (P3O compares the two answers of a prompt), got {self.samples_per_prompt}")
        self.check_critic_free("P3O")
        if self.kl_coeff < 0 or self.clip_range <= 0:
            raise ConfigError("kl_coeff must be >= 0 and clip_range > 0")
        if self.clip_range_ratio <= 1:
            raise ConfigError(f"clip_range_ratio must be > 1 (the importance weight is clamped to [1/c, c]), got {self.clip_range_ratio}")
        if self.per_device_train_batch_size % 2:
            raise ConfigError(f"per_device_train_batch_size must be even (a micro-batch holds whole pairs), got "
                              f"{self.per_device_train_batch_size}")


class P3O(CriticFree):
    """Critic-free pairwise RL with one stream, the reward."""

    cfg: P3OConfig

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One rollout batch: the experience, each answer's score, the pairwise clipped updates."""
        scalars = self.experience(run.models, batch)
        batch["objective"] = self.objective(batch)
        scalars.update(run.update(batch, step, self.losses, group_size=2))
        return scalars, {}

    @torch.no_grad()
    def experience(self, models: RLModels, batch: Experience) -> dict[str, float]:
        """Fill `batch`: log-probs (π_old, π_ref), the end scores scores_{name} (B,), each stream's end score as the
        update uses it {stream}_end_scores (B,), and old_log_ratios ℓ^old (B,); return this process's rollout scalars."""
        ends, scalars = critic_free_experience(models, batch, self.cfg.missing_eos_penalty)
        ends = self.stream_end_scores(ends, batch)
        mask = batch["response_mask"].float()  # size = (B, T)
        batch["old_log_ratios"] = ((batch["log_probs"] - batch["ref_log_probs"]) * mask).sum(-1)  # size = (B,): ℓ^old
        for stream in self.streams:
            batch[f"{stream}_end_scores"] = ends[stream].float()
            pairs = ends[stream].float().view(-1, 2)  # size = (prompts, 2)
            scalars[f"{stream}_pair_gap"] = (pairs[:, 0] - pairs[:, 1]).abs().mean().item()  # |s_0 − s_1|: the signal
            scalars[f"{stream}_tied_pairs"] = (pairs[:, 0] == pairs[:, 1]).float().mean().item()  # no signal
        return scalars

    def objective(self, batch: Experience) -> torch.Tensor:
        """Each answer's score s_i, whose pair difference P3O follows: the reward R_i (less the missing-EOS penalty). (B,)."""
        return batch["reward_end_scores"]

    def losses(self, models: RLModels, batch: Experience, ptx_batch: dict[str, torch.Tensor] | None,
               metrics: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """The micro-batch's loss (whole pairs, rows 2j and 2j + 1): `losses.p3o_loss` (one forward of the actor),
        then γ_ptx·L_PTX."""
        cfg, mask = self.cfg, batch["response_mask"].float()  # mask size = (b, T)
        log_probs = token_log_probs(models.actor, batch)  # size = (b, T), with grad
        log_ratios = ((log_probs - batch["ref_log_probs"]) * mask).sum(-1).view(-1, 2)  # size = (b/2, 2): ℓ
        old_log_ratios = batch["old_log_ratios"].view(-1, 2)  # size = (b/2, 2): ℓ^old
        scores = batch["objective"].view(-1, 2)  # size = (b/2, 2)
        num_tokens = mask.sum() if cfg.loss_normalization == "tokens" else None
        loss = p3o_loss(log_ratios, old_log_ratios, scores[:, 0] - scores[:, 1], cfg.kl_coeff, cfg.clip_range,
                        cfg.clip_range_ratio, num_tokens)
        change = (log_ratios - old_log_ratios).detach()  # size = (b/2, 2): log π/π_old of each answer
        log_weight = change.sum(-1)  # size = (b/2,): of the pair
        metrics.update(actor_loss=loss.detach(), approx_kl=approx_kl(log_probs, batch["log_probs"], batch["response_mask"]),
                       clip_fraction=((change[:, 0] - change[:, 1]).abs() > cfg.clip_range).float().mean(),  # gap left ±ε
                       importance_weight=log_weight.exp().mean(),
                       weight_clamped=(log_weight.abs() > math.log(cfg.clip_range_ratio)).float().mean())
        yield loss
        if ptx_batch is not None:
            yield cfg.ptx_coeff * ptx_loss(models.actor, ptx_batch, metrics)


def run(cfg: P3OConfig) -> dict[str, Any]:
    """P3O of the actor on the reward model; returns flat metrics (reward, kl, reward_pair_gap, ..., samples_per_second)."""
    return train_rl(cfg, P3O(cfg))
