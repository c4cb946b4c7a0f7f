"""What the critic-free RL methods share (GRPO and P3O, `grpo.py`, `p3o.py`, and their constrained versions): the
config's reward model, missing-EOS penalty and checks, the algorithm's frame (frozen score models, no critic), and
the experience of a rollout (log-probs under π_old and π_ref, end scores), without gradients. What each method does
with the scores (group advantages, pair differences) and its loss stay in its own file."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safealign.algorithms.losses import kl_estimate
from safealign.algorithms.rollout import end_scores, token_log_probs
from safealign.config import ConfigError, config_field
from safealign.training.rl import Experience, RLAlgorithm
from safealign.training.rl_setup import RLConfig, RLModels


@dataclass
class CriticFreeConfig(RLConfig):
    """The options every critic-free method has (beside the RL loop's)."""

    reward_model: str = config_field("runs/rm/model", help="Frozen reward model (a score model directory, `safealign rm`).")
    missing_eos_penalty: float = config_field(
        0.0, help="Subtracted from the reward of an answer cut at max_new_tokens (no EOS), before it is compared with "
                  "the other answers to its prompt (0 = off).")

    def check_critic_free(self, method: str) -> None:
        if self.critic_layout != "full":
            raise ConfigError(f"critic_layout={self.critic_layout!r}: {method} has no critic; leave critic_layout at its default")
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")
        rows = self.per_device_prompt_batch_size * self.samples_per_prompt
        if rows % (self.per_device_train_batch_size * self.gradient_accumulation_steps):
            raise ConfigError(f"a rollout's {rows} rows (prompts × samples_per_prompt) must split into mini-batches of "
                              f"per_device_train_batch_size × gradient_accumulation_steps rows")


class CriticFree(RLAlgorithm):
    """A critic-free method on the reward model (its constrained version adds the cost model)."""

    streams: tuple[str, ...] = ("reward",)

    def __init__(self, cfg: CriticFreeConfig) -> None:
        self.cfg = cfg

    def score_model_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.reward_model}

    def critic_paths(self) -> dict[str, str]:
        return {}  # critic-free

    def stream_end_scores(self, scores: dict[str, torch.Tensor], batch: Experience) -> dict[str, torch.Tensor]:
        """The end score of each stream as the update uses it (B,): the scores themselves (the constrained methods'
        cost may be rectified, `lagrangian.Constrained`)."""
        return scores


def critic_free_experience(models: RLModels, batch: Experience,
                           missing_eos_penalty: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The experience of a critic-free method (GRPO, P3O), without gradients. Fills `batch`: log_probs (π_old) and
    ref_log_probs (B, T), each score model's end scores scores_{name} (B,). Returns the end scores the update uses,
    name -> (B,) (the reward less `missing_eos_penalty` for an answer cut at max_new_tokens, as in PPO; the cost keeps
    its meaning), and this process's rollout scalars."""
    mask = batch["response_mask"]  # size = (B, T)
    batch["log_probs"] = token_log_probs(models.actor, batch)  # size = (B, T): π_old
    batch["ref_log_probs"] = token_log_probs(models.reference, batch)  # size = (B, T)
    scores = {name: end_scores(model, batch) for name, model in models.score_models.items()}  # each (B,)
    scalars: dict[str, float] = {}
    for name, value in scores.items():
        batch[f"scores_{name}"] = value
        scalars[name] = value.mean().item()
    ends = dict(scores)
    if missing_eos_penalty:  # a cut answer: R − penalty (the reward stream only)
        ends["reward"] = ends["reward"] - missing_eos_penalty * (~batch["ended_with_eos"]).to(ends["reward"].dtype)
    kl = kl_estimate(batch["log_probs"], batch["ref_log_probs"], "k1") * mask  # size = (B, T)
    scalars.update(kl=kl.sum(-1).mean().item(),  # sequence KL Σ_t (log π − log π_ref), batch mean: as PPO logs it
                   response_length=mask.sum(-1).float().mean().item(),
                   ended_with_eos=batch["ended_with_eos"].float().mean().item())
    return ends, scalars
