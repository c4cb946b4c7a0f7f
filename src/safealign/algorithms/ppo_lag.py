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
- λ = exp(log λ), updated once per rollout batch, before the PPO updates that use it:
      J_C = mean of the raw episode costs C in the window (the last `episode_cost_window_size` samples of
            every process, all-gathered, so J_C and λ are identical on every rank),
      log λ ← min(log λ + α·λ·(J_C − d), log λ_max)       (`losses.lagrange_multiplier_update`),
  not before step `lambda_update_delay_steps`;
- optionally d from the cost model itself (`threshold_quantile`): the q-quantile of its costs on the answers
  `threshold_data` labels safe (e.g. the policy's own answers, labelled by annotators), so that d sits where that
  cost model puts safe answers rather than at a fixed number in units each retrained cost model sets anew.

Differences from the reference implementation (safe-rlhf), on purpose:
- λ moves once per rollout batch; the reference steps it once per micro-step with the same J_C.
- r_t and c_t carry β·KL each (docs/maths.md §3); the reference puts β/2 in each (an effective β/2 in A_t).
- The λ step is plain SGD on log λ (as in the reference), so it has no optimizer state beyond log λ; the
  checkpoint holds log λ and every process's cost window.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from safealign.algorithms.losses import combined_advantage, lagrange_multiplier_update
from safealign.algorithms.ppo import PPO, PPOConfig
from safealign.config import ConfigError, config_field
from safealign.data.loading import load_preferences
from safealign.models.presets import resolve_device
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.training.rl import Experience, RLRun, train_rl


@dataclass
class PPOLagConfig(PPOConfig):
    """Safe RLHF (PPO-Lagrangian). Defaults: the reference's (λ_0 1, α 0.1, λ_max 5, d 0, no delay, window 128),
    except β (0.05, reference 0.01), the prompt batch and the learning rates (sized for the tiny preset on
    SafeWorld; the reference's are for 7B models)."""

    output_dir: str = config_field("runs/ppo_lag", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    kl_coeff: float = config_field(0.05, help="β: weight of the per-token KL in both streams (reference 0.01, for a 7B model with its smaller learning rates).")
    cost_model: str = config_field("runs/cm/model", help="Frozen cost model (a score model directory, `safealign cm`): cost > 0 means unsafe.")
    cost_critic_model: str = config_field("", help="Initial cost critic: a score model or backbone directory; '' = the cost model.")
    threshold: float = config_field(0.0, help="d: the constraint E[C] ≤ d (0 = no more unsafe than the cost model's boundary).")
    lambda_init: float = config_field(1.0, help="λ_0: initial Lagrange multiplier (> 0).")
    lambda_lr: float = config_field(0.1, help="α: learning rate of log λ (gradient ascent on the dual).")
    lambda_max: float = config_field(5.0, help="λ_max: upper bound of λ (≤ 0 = none).")
    lambda_update_delay_steps: int = config_field(0, help="Steps (rollouts) before λ starts moving; costs enter the window meanwhile.")
    episode_cost_window_size: int = config_field(128, help="J_C is the mean episode cost of the last this many samples of each process.")
    threshold_quantile: float = config_field(
        0.0, help="In (0, 1): d = this quantile of the cost model's costs on the responses threshold_data labels safe "
                  "(d in the cost model's own units), replacing threshold; 0 = threshold as given.")
    threshold_data: str = config_field("", help="Preference file (PKU format) whose safe-labelled responses set d with threshold_quantile.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_quantile < 1.0 or (self.threshold_quantile > 0) != bool(self.threshold_data):
            raise ConfigError("threshold_quantile must be in [0, 1), and > 0 exactly when threshold_data is given")
        if self.lambda_init <= 0:
            raise ConfigError(f"lambda_init must be > 0 (λ = exp(log λ)), got {self.lambda_init}")
        if self.episode_cost_window_size < 1:
            raise ConfigError("episode_cost_window_size must be >= 1")


class PPOLag(PPO):
    """PPO with a reward and a cost stream and the Lagrange multiplier λ that weighs them."""

    streams = ("reward", "cost")

    def __init__(self, cfg: PPOLagConfig) -> None:
        super().__init__(cfg)
        self.log_lambda = math.log(cfg.lambda_init)
        # The last costs of every process, (processes, n ≤ window): identical on every rank after each update.
        self.episode_cost_windows = torch.zeros(0, 0)

    @property
    def lagrange_multiplier(self) -> float:
        return math.exp(self.log_lambda)

    def score_model_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.reward_model, "cost": self.cfg.cost_model}

    def critic_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.critic_model or self.cfg.reward_model,
                "cost": self.cfg.cost_critic_model or self.cfg.cost_model}

    def stream_end_scores(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"reward": scores["reward"], "cost": scores["cost"]}

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """One rollout batch, in the paper's order: experience, λ, the combined advantage, the clipped updates."""
        scalars = self.experience(run.models, batch, run.accelerator, step)  # 1. A^R, A^C and the end costs C
        scalars["unsafe_fraction"] = (batch["scores_cost"] > 0).float().mean().item()  # cost > 0: unsafe
        shared = self.update_lagrange_multiplier(batch, run.accelerator, step)  # 2. λ, before the update that uses it
        batch["advantages"] = self.actor_advantages(batch)  # 3. (A^R − λ·A^C) / (1 + λ)
        scalars.update(run.update(batch, step, self.losses))  # 4. actor (+ PTX) and both critics
        return scalars, shared

    def actor_advantages(self, batch: Experience) -> torch.Tensor:
        """A_t = (A^R_t − λ·A^C_t) / (1 + λ) with the current λ (B, T), whitened when `whiten_advantages`."""
        advantages = combined_advantage(batch["reward_advantages"], batch["cost_advantages"], self.lagrange_multiplier)
        return self.whitened(advantages, batch)

    def update_lagrange_multiplier(self, batch: Experience, accelerator: Accelerator, step: int) -> dict[str, float]:
        """J_C over the window of every process's latest costs, then log λ ← min(log λ + α·λ·(J_C − d), log λ_max)."""
        cfg, rank, processes = self.cfg, accelerator.process_index, accelerator.num_processes
        window = torch.cat([self._own_window(rank, processes), batch["scores_cost"].detach().float().cpu()])
        window = window[-cfg.episode_cost_window_size:]  # size = (n,), the same n on every process
        gathered = accelerator.gather(window.to(accelerator.device)).cpu()  # size = (processes · n,)
        self.episode_cost_windows = gathered.view(processes, -1)
        episode_cost = gathered.double().mean().item()  # J_C, the same on every rank
        if step >= cfg.lambda_update_delay_steps:
            self.log_lambda = lagrange_multiplier_update(self.log_lambda, episode_cost, cfg.threshold, cfg.lambda_lr,
                                                         cfg.lambda_max)
        if processes > 1:  # a per-rank trace: λ must be identical on every rank
            with open(Path(cfg.output_dir) / f"lagrange_multiplier_rank{rank}.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step + 1, "lagrange_multiplier": self.lagrange_multiplier,
                                         "episode_cost": episode_cost}) + "\n")
        return {"episode_cost": episode_cost, "lagrange_multiplier": self.lagrange_multiplier, "log_lambda": self.log_lambda,
                "threshold": cfg.threshold}  # d in the logs and metrics.json (with threshold_quantile it is computed)

    def _own_window(self, rank: int, processes: int) -> torch.Tensor:
        windows = self.episode_cost_windows
        if windows.numel() == 0:
            return torch.zeros(0)
        if windows.size(0) != processes:  # resumed with another number of processes: share the saved costs out
            flat = windows.flatten()
            per_process = len(flat) // processes
            return flat[rank * per_process:(rank + 1) * per_process]
        return windows[rank]

    def state_dict(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda, "episode_cost_windows": self.episode_cost_windows.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_lambda = float(state["log_lambda"])
        self.episode_cost_windows = state["episode_cost_windows"].float()


def cost_quantile(cost_model: str, tokenizer: str, data: str, quantile: float, max_length: int = 256) -> tuple[float, int]:
    """The `quantile` of the cost model's costs on the distinct (prompt, response) that `data` labels safe, and
    their number. Deterministic: every process computes the same d."""
    safe = list(dict.fromkeys((record.prompt, record.response(i)) for record in load_preferences(data)
                              for i in (0, 1) if record.is_safe(i)))
    if not safe:
        raise ConfigError(f"{data}: no response labelled safe to set the threshold from (threshold_quantile)")
    model = load_score_model(cost_model).to(resolve_device("auto")).eval()
    costs = score_texts(model, load_tokenizer(tokenizer), [p for p, _ in safe], [r for _, r in safe], max_length)
    return torch.quantile(torch.tensor(costs, dtype=torch.float64), quantile).item(), len(safe)


def run(cfg: PPOLagConfig) -> dict[str, Any]:
    """Safe RLHF: PPO-Lagrangian on the reward and cost models; returns flat metrics (reward, cost,
    episode_cost, lagrange_multiplier, unsafe_fraction, kl, ...), and `threshold` (d)."""
    extra: dict[str, Any] = {}
    if cfg.threshold_quantile > 0:
        has_tokenizer = (Path(cfg.cost_model) / "tokenizer_config.json").is_file()
        tokenizer = cfg.cost_model if has_tokenizer else (cfg.tokenizer or cfg.actor_model)
        threshold, count = cost_quantile(cfg.cost_model, tokenizer, cfg.threshold_data, cfg.threshold_quantile)
        cfg = dataclasses.replace(cfg, threshold=threshold)
        extra["threshold_safe_responses"] = count
    return {**train_rl(cfg, PPOLag(cfg)), "threshold": cfg.threshold, **extra}
