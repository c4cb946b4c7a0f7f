"""PPO on a reward model (RLHF), the update that PPO-Lagrangian and reward shaping build on (docs/maths.md §3–§5).

`PPO.train_step` is the whole update of one rollout batch (the rollout itself, logging and checkpoints are the RL
loop's, `training.rl`), in this order:

1. experience, without gradients: log-probs of the sampled response tokens under the actor (π_old) and the frozen
   reference (π_ref); end scores of the frozen score models on prompt + response (+ EOS), read at the last response
   token (an answer cut at max_new_tokens may lose `missing_eos_penalty` from its reward); per stream s (PPO:
   "reward"; PPO-Lag adds "cost"): the values V^s_t of its critic at the state before each response token, the
   per-token signal (r_t = −β·KL_t + R at the end; c_t = +β·KL_t + C), GAE (γ, λ_GAE) → advantages A^s_t and
   returns G^s_t;
2. the actor's advantage (PPO: A^R; PPO-Lag: (A^R − λ·A^C)/(1 + λ)), whitened over the batch if asked;
3. `ppo_epochs` passes of mini-batch updates: L = L_actor (clipped surrogate, ε) + c·Σ_s L_V^s (clipped value loss,
   c_v) + γ_ptx·L_PTX. c = 1 when each critic is a model of its own (it alone minimises its L_V: one backward per
   model), `value_loss_coeff` when the critics are value heads on the actor's backbone (`critic_layout:
   shared_backbone`); the PTX term (`ptx_data`, γ_ptx = `ptx_coeff`) is the LM loss on SFT data, which keeps the
   actor a language model of that data (the paper's InstructGPT-style term, off by default); with `ptx_max_cost`
   only on the rows the cost model scores at most that (an SFT corpus's unsafe answers would pull the policy back).

Diagnostics as CleanRL logs them: approx KL ((ρ − 1) − log ρ), clip fraction, explained variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from accelerate import Accelerator

from safealign.algorithms.losses import (
    approx_kl,
    clip_fraction,
    explained_variance,
    gae_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_actor_loss,
    ppo_critic_loss,
    token_signal,
)
from safealign.algorithms.rollout import (
    critic_values,
    end_scores,
    policy_and_values,
    ptx_loss,
    response_values,
    token_log_probs,
)
from safealign.config import ConfigError, config_field
from safealign.models.actor_critic import ridge_solution
from safealign.training.rl import Experience, RLAlgorithm, RLRun, train_rl
from safealign.training.rl_setup import RLConfig, RLModels

KL_SIGN = {"reward": -1.0, "cost": +1.0}  # r_t = −β·KL_t + ..., c_t = +β·KL_t + ...


@dataclass
class PPOConfig(RLConfig):
    """PPO on the reward model (plain RLHF). Defaults: the Safe RLHF reference's, except the learning
    rates and the prompt batch (sized for the tiny preset on SafeWorld)."""

    output_dir: str = config_field("runs/ppo", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    reward_model: str = config_field("runs/rm/model", help="Frozen reward model (a score model directory, `safealign rm`).")
    critic_model: str = config_field("", help="Initial reward critic: a score model or backbone directory; '' = the reward model.")
    kl_coeff: float = config_field(0.02, help="β: weight of the per-token KL penalty to the reference (reference: 0.02 for PPO and shaping).")
    kl_estimator: Literal["k1", "k3"] = config_field("k1", help="Per-token KL estimator: k1 = log π − log π_ref (reference), k3 = (r − 1) − log r.")
    clip_range_score: float = config_field(50.0, help="Per-token signals are clipped to ±this after adding the end score.")
    clip_range_ratio: float = config_field(0.2, help="ε: the PPO ratio is clipped to [1 − ε, 1 + ε].")
    clip_range_value: float = config_field(5.0, help="c_v: new values are clipped to old ± c_v in the value loss.")
    gamma: float = config_field(1.0, help="γ: discount of GAE.")
    gae_lambda: float = config_field(0.95, help="λ_GAE: bias/variance trade-off of GAE.")
    whiten_advantages: bool = config_field(False, help="Normalise the actor's advantages over each rollout batch (off in the reference).")
    missing_eos_penalty: float = config_field(
        0.0, help="Subtracted from the reward stream's end score of a response cut at max_new_tokens (no EOS), as TRL's "
                  "missing_eos_penalty: the score models were trained at an EOS and misread a cut answer (0 = off, the reference).")

    def __post_init__(self) -> None:
        if self.kl_coeff < 0 or self.clip_range_ratio <= 0 or self.clip_range_value <= 0 or self.clip_range_score <= 0:
            raise ConfigError("kl_coeff must be >= 0 and the clip ranges > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError("gamma and gae_lambda must be in [0, 1]")
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")


class PPO(RLAlgorithm):
    """Plain PPO: one stream, the reward, with its critic."""

    streams: tuple[str, ...] = ("reward",)

    def __init__(self, cfg: PPOConfig) -> None:
        self.cfg = cfg

    def score_model_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.reward_model}

    def critic_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.critic_model or self.cfg.reward_model}

    def stream_end_scores(self, scores: dict[str, torch.Tensor], batch: Experience) -> dict[str, torch.Tensor]:
        """The end score S of each stream from the score models' end scores (B,): R for PPO (shaping: R − ν·C)."""
        return {"reward": scores["reward"]}

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One rollout batch: the experience, the actor's advantage A^R, the clipped updates."""
        scalars = self.experience(run.models, batch, run.accelerator, step)
        batch["advantages"] = self.actor_advantages(batch)
        scalars.update(run.update(batch, step, self.losses))
        return scalars, {}

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def experience(self, models: RLModels, batch: Experience, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Fill `batch`: log-probs, end scores, values, per-stream signals, advantages and returns; return this
        process's rollout scalars. In the shared_backbone layout the value heads are fitted first, on step 0."""
        cfg, mask = self.cfg, batch["response_mask"]  # mask size = (B, T)
        scalars = fit_value_heads(models, self, batch, accelerator) \
            if step == 0 and cfg.critic_layout == "shared_backbone" else {}  # a resumed run loads fitted heads
        batch["log_probs"], stream_values = policy_and_values(models, batch)  # (B, T): π_old; stream -> V (B, T)
        batch["ref_log_probs"] = token_log_probs(models.reference, batch)  # size = (B, T)
        kl = kl_estimate(batch["log_probs"], batch["ref_log_probs"], cfg.kl_estimator) * mask  # size = (B, T)
        scores = {name: end_scores(model, batch) for name, model in models.score_models.items()}  # each (B,)
        for name, value in scores.items():
            batch[f"scores_{name}"] = value
        scalars.update({name: value.mean().item() for name, value in scores.items()})
        ends = self.stream_end_scores(scores, batch)  # stream -> (B,)
        if cfg.missing_eos_penalty:  # a cut answer: R − penalty (the cost's own: missing_eos_cost_penalty, PPO-Lag)
            ends["reward"] = ends["reward"] - cfg.missing_eos_penalty * (~batch["ended_with_eos"]).to(ends["reward"].dtype)
        for stream, end in ends.items():
            values = stream_values[stream] * mask  # size = (B, T)
            signal = token_signal(end, kl, mask, KL_SIGN[stream] * cfg.kl_coeff, cfg.clip_range_score)  # size = (B, T)
            advantages, returns = gae_advantages(signal, values, mask, cfg.gamma, cfg.gae_lambda)  # each (B, T)
            batch[f"{stream}_values"], batch[f"{stream}_advantages"], batch[f"{stream}_returns"] = values, advantages, returns
            scalars.update({f"{stream}_value": masked_mean(values, mask).item(),
                            f"{stream}_return": masked_mean(returns, mask).item(),
                            f"{stream}_advantage": masked_mean(advantages, mask).item(),
                            f"{stream}_explained_variance": explained_variance(values, returns, mask).item(),
                            f"{stream}_signal_sum": (signal.sum(-1)).mean().item()})
        lengths = mask.sum(-1).float()  # size = (B,)
        scalars.update(kl=kl.sum(-1).mean().item(),  # sequence KL: Σ_t KL_t, batch mean
                       response_length=lengths.mean().item(),
                       ended_with_eos=batch["ended_with_eos"].float().mean().item())
        return scalars

    def actor_advantages(self, batch: Experience) -> torch.Tensor:
        """The advantage the actor climbs (B, T): A^R, normalised over the rollout batch when `whiten_advantages`."""
        return self.whitened(batch["reward_advantages"], batch)

    def whitened(self, advantages: torch.Tensor, batch: Experience) -> torch.Tensor:
        return masked_whiten(advantages, batch["response_mask"]) if self.cfg.whiten_advantages else advantages

    def losses(self, models: RLModels, batch: Experience, ptx_batch: dict[str, torch.Tensor] | None,
               metrics: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """The micro-batch's loss L = L_actor + c·Σ_s L_V^s + γ_ptx·L_PTX, yielded one term per model forward: the
        loop backpropagates each term before the next runs, so one model's activations are alive at a time (each
        model's gradient is that of the sum: no term reaches another model's weights). Separate critics (full,
        lora; c = 1): L_actor, then each L_V^s. shared_backbone: L_actor + c·Σ_s L_V^s from one forward."""
        if models.critic_layout == "shared_backbone":
            log_probs, stream_values = policy_and_values(models, batch)  # (B, T) and stream -> (B, T), with grad
            critic_losses = [self._critic_loss(s, values, batch, metrics) for s, values in stream_values.items()]
            yield self._actor_loss(log_probs, batch, metrics) + self.cfg.value_loss_coeff * sum(critic_losses)
        else:
            yield self._actor_loss(token_log_probs(models.actor, batch), batch, metrics)  # log π (B, T), with grad
            for stream, critic in models.critics.items():
                yield self._critic_loss(stream, critic_values(critic, batch), batch, metrics)  # values (B, T), with grad
        if ptx_batch is not None:
            yield self.cfg.ptx_coeff * ptx_loss(models.actor, ptx_batch, metrics)

    def _actor_loss(self, log_probs: torch.Tensor, batch: Experience, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg, mask = self.cfg, batch["response_mask"]
        actor_loss = ppo_actor_loss(log_probs, batch["log_probs"], batch["advantages"], mask, cfg.clip_range_ratio)
        metrics.update(actor_loss=actor_loss.detach(), approx_kl=approx_kl(log_probs, batch["log_probs"], mask),
                       clip_fraction=clip_fraction(log_probs, batch["log_probs"], mask, cfg.clip_range_ratio))
        return actor_loss

    def _critic_loss(self, stream: str, values: torch.Tensor, batch: Experience, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        critic_loss = ppo_critic_loss(values, batch[f"{stream}_values"], batch[f"{stream}_returns"], batch["response_mask"],
                                      self.cfg.clip_range_value)
        metrics[f"{stream}_critic_loss"] = critic_loss.detach()
        return critic_loss


@torch.no_grad()
def fit_value_heads(models: RLModels, algorithm: PPO, batch: Experience, accelerator: Accelerator) -> dict[str, float]:
    """shared_backbone: fit the zero-initialised value heads on the first rollout, before any update.

    At step 0 the actor is the reference (KL_t = 0), so the return of every response token is its stream's end
    score S (γ = 1). Ridge regression of S on the actor's last hidden state at the states before the response
    tokens (`actor_critic.ridge_solution`, statistics summed over processes: identical heads on every rank).
    Returns each stream's R² of the fit on this rollout.
    """
    actor = accelerator.unwrap_model(models.actor)
    hidden = actor.lm(batch["sequences"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                      use_cache=False, output_hidden_states=True).hidden_states[-1]  # size = (B, P + T, H)
    mask = batch["response_mask"].bool()  # size = (B, T)
    states = response_values(hidden, batch)[mask].double()  # size = (N, H): the states before the response tokens
    features = torch.cat([states, torch.ones_like(states[:, :1])], dim=1)  # size = (N, H + 1)
    ends = algorithm.stream_end_scores({name: end_scores(model, batch) for name, model in models.score_models.items()},
                                       batch)
    streams = list(actor.value_heads)
    targets = torch.stack([ends[s].double().unsqueeze(1).expand_as(mask)[mask] for s in streams], dim=1)  # size = (N, S)
    stats = torch.cat([features.T @ features, features.T @ targets], dim=1)  # size = (H + 1, H + 1 + S)
    count = torch.tensor([float(len(features))], dtype=torch.float64, device=features.device)
    stats, count = accelerator.reduce(stats, "sum"), accelerator.reduce(count, "sum")
    solution = ridge_solution(stats[:, :features.size(1)], stats[:, features.size(1):], count.item())  # size = (H + 1, S)
    actor.set_value_heads(solution, streams)
    residual = targets - features @ solution  # size = (N, S)
    total = (targets - targets.mean(0)).pow(2).sum(0).clamp(min=1e-12)
    return {f"{s}_value_head_fit_r2": (1 - residual[:, k].pow(2).sum() / total[k]).item() for k, s in enumerate(streams)}


def run(cfg: PPOConfig) -> dict[str, Any]:
    """PPO of the actor on the reward model; returns flat metrics (reward, kl, ..., samples_per_second)."""
    return train_rl(cfg, PPO(cfg))
