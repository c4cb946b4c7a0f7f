"""Reward shaping, the Safe RLHF paper's baseline: plain PPO on the shaped end score R − ν·C, ν fixed.

The update is `ppo.PPO`'s with one change, the end score of its reward stream; the cost model is
frozen and scored like the reward model, and there is one critic (the reward critic). `run_sweep`
trains one policy per ν of `nus` into output_dir/nu-{ν}: the paper compares Safe RLHF with such a sweep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState

from safealign.algorithms.ppo import PPO, PPOConfig
from safealign.config import config_field
from safealign.io import atomic_write_json
from safealign.training.rl import Experience, train_rl
from safealign.training.rl_setup import RLModels


@dataclass
class RewardShapingConfig(PPOConfig):
    """PPO on R − ν·C. Defaults: PPO's (β 0.02), ν = 1."""

    output_dir: str = config_field("runs/shaping", help="Run directory (a sweep writes one sub-directory nu-{ν} per ν).")
    cost_model: str = config_field("runs/cm/model", help="Frozen cost model (a score model directory, `safealign cm`): cost > 0 means unsafe.")
    nu: float = config_field(1.0, help="ν: the fixed weight of the cost in the shaped end score R − ν·C.")
    nus: list[float] = config_field([], help="A sweep: one run per ν into output_dir/nu-{ν} (overrides nu); [] = one run with nu.")


class RewardShaping(PPO):
    """PPO whose reward stream ends with R − ν·C."""

    def score_model_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.reward_model, "cost": self.cfg.cost_model}

    def stream_end_scores(self, scores: dict[str, torch.Tensor], batch: Experience) -> dict[str, torch.Tensor]:
        return {"reward": scores["reward"] - self.cfg.nu * scores["cost"]}

    def experience(self, models: RLModels, batch: Experience, accelerator: Accelerator, step: int) -> dict[str, float]:
        scalars = super().experience(models, batch, accelerator, step)
        scalars["shaped_reward"] = (batch["scores_reward"] - self.cfg.nu * batch["scores_cost"]).mean().item()
        scalars["unsafe_fraction"] = (batch["scores_cost"] > 0).float().mean().item()
        return scalars


def run(cfg: RewardShapingConfig) -> dict[str, Any]:
    """One shaped PPO run with `nu`, or the sweep over `nus` (then: {"nu=ν": metrics, ...})."""
    if cfg.nus:
        return {f"nu={row['nu']:g}": row for row in run_sweep(cfg)}
    return {**train_rl(cfg, RewardShaping(cfg)), "nu": cfg.nu}


def run_sweep(cfg: RewardShapingConfig) -> list[dict[str, Any]]:
    """One run per ν in `cfg.nus` (or just `cfg.nu`), each in output_dir/nu-{ν}; returns their metrics
    (with "nu" and "output_dir") in order, also written to output_dir/sweep.json."""
    results = []
    for nu in cfg.nus or [cfg.nu]:
        sub = dataclasses.replace(cfg, nu=float(nu), nus=[], output_dir=str(Path(cfg.output_dir) / f"nu-{nu:g}"))
        results.append({**train_rl(sub, RewardShaping(sub)), "nu": float(nu), "output_dir": sub.output_dir})
    if PartialState().is_main_process:
        atomic_write_json(Path(cfg.output_dir) / "sweep.json", results)
    return results
