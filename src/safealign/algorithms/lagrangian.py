"""The constraint E[C] ≤ d and its Lagrange multiplier λ, shared by the constrained RL methods (PPO-Lag, GRPO-Lag,
safe P3O).

    max_θ E[R]  subject to  E[C] ≤ d          solved as   min_θ max_{λ≥0}  −E[R] + λ·(E[C] − d)

λ = exp(log λ), updated once per rollout batch, before the policy update that uses it (docs/maths.md §5):
    J_C = mean of the raw episode costs C in the window (the last `episode_cost_window_size` samples of every
          process, all-gathered, so J_C and λ are identical on every rank),
    log λ ← min(log λ + α·λ·(J_C − d), log λ_max)       (`losses.lagrange_multiplier_update`),
not before step `lambda_update_delay_steps`. The step is plain SGD on log λ (as in safe-rlhf), so the multiplier has
no optimizer state beyond log λ; a checkpoint holds log λ and every process's cost window.

d is a number in the cost model's units, or (`threshold_quantile`) the q-quantile of the cost model's costs on the
answers `threshold_data` labels safe, so that d sits where that cost model puts safe answers rather than at a fixed
number in units each retrained cost model sets anew.
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

from safealign.algorithms.losses import lagrange_multiplier_update
from safealign.config import ConfigError, config_field
from safealign.data.loading import load_preferences
from safealign.models.presets import resolve_device
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer


@dataclass
class ConstraintConfig:
    """The cost model, the threshold d and λ's dynamics (defaults: safe-rlhf's, λ_0 1, α 0.1, λ_max 5, d 0, window
    128). Mixed into the config of every constrained RL method."""

    cost_model: str = config_field("runs/cm/model", help="Frozen cost model (a score model directory, `safealign cm`): cost > 0 means unsafe.")
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

    def check_constraint(self) -> None:
        if not 0.0 <= self.threshold_quantile < 1.0 or (self.threshold_quantile > 0) != bool(self.threshold_data):
            raise ConfigError("threshold_quantile must be in [0, 1), and > 0 exactly when threshold_data is given")
        if self.lambda_init <= 0:
            raise ConfigError(f"lambda_init must be > 0 (λ = exp(log λ)), got {self.lambda_init}")
        if self.episode_cost_window_size < 1:
            raise ConfigError("episode_cost_window_size must be >= 1")


class LagrangeMultiplier:
    """λ of one expected-cost constraint, with the window of recent episode costs that J_C averages."""

    def __init__(self, cfg: ConstraintConfig, output_dir: str | Path) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.log_lambda = math.log(cfg.lambda_init)
        # The last costs of every process, (processes, n ≤ window): identical on every rank after each update.
        self.episode_cost_windows = torch.zeros(0, 0)

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda)

    def update(self, episode_costs: torch.Tensor, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Add this rollout's episode costs (B,) to the window; J_C over every process's window, then
        log λ ← min(log λ + α·λ·(J_C − d), log λ_max). Returns the scalars identical on every rank."""
        cfg, rank, processes = self.cfg, accelerator.process_index, accelerator.num_processes
        window = torch.cat([self._own_window(rank, processes), episode_costs.detach().float().cpu()])
        window = window[-cfg.episode_cost_window_size:]  # size = (n,), the same n on every process
        gathered = accelerator.gather(window.to(accelerator.device)).cpu()  # size = (processes · n,)
        self.episode_cost_windows = gathered.view(processes, -1)
        episode_cost = gathered.double().mean().item()  # J_C, the same on every rank
        if step >= cfg.lambda_update_delay_steps:
            self.log_lambda = lagrange_multiplier_update(self.log_lambda, episode_cost, cfg.threshold, cfg.lambda_lr,
                                                         cfg.lambda_max)
        if processes > 1:  # a per-rank trace: λ must be identical on every rank
            with open(self.output_dir / f"lagrange_multiplier_rank{rank}.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step + 1, "lagrange_multiplier": self.value,
                                         "episode_cost": episode_cost}) + "\n")
        return {"episode_cost": episode_cost, "lagrange_multiplier": self.value, "log_lambda": self.log_lambda,
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


class Constrained:
    """What a constrained RL algorithm adds to its unconstrained base (`class PPOLag(Constrained, PPO)`): the cost
    model beside the reward model, the constraint's step of a rollout batch, and λ in the run's checkpoints. The
    algorithm creates `self.lagrangian` and says in its own `train_step` where the step goes (before the update)."""

    cfg: Any
    lagrangian: LagrangeMultiplier

    def score_model_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.reward_model, "cost": self.cfg.cost_model}

    def constraint_step(self, batch: Any, accelerator: Accelerator, step: int, scalars: dict[str, float]) -> dict[str, float]:
        """This process's share of answers the cost model calls unsafe (cost > 0) into `scalars`; then λ from the
        episode costs scores_cost (B,). Returns the scalars identical on every rank (J_C, λ, d)."""
        scalars["unsafe_fraction"] = (batch["scores_cost"] > 0).float().mean().item()
        return self.lagrangian.update(batch["scores_cost"], accelerator, step)

    def state_dict(self) -> dict[str, Any]:
        return self.lagrangian.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lagrangian.load_state_dict(state)


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


def resolve_threshold(cfg: Any, fallback_tokenizer: str) -> tuple[Any, dict[str, Any]]:
    """cfg with d computed from `threshold_quantile` when it is set (and the number of safe answers that set it);
    cfg unchanged otherwise. The cost model's own tokenizer when it has one, else `fallback_tokenizer`."""
    if cfg.threshold_quantile <= 0:
        return cfg, {}
    has_tokenizer = (Path(cfg.cost_model) / "tokenizer_config.json").is_file()
    tokenizer = cfg.cost_model if has_tokenizer else fallback_tokenizer
    threshold, count = cost_quantile(cfg.cost_model, tokenizer, cfg.threshold_data, cfg.threshold_quantile)
    return dataclasses.replace(cfg, threshold=threshold), {"threshold_safe_responses": count}
