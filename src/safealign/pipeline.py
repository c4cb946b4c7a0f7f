"""The main job: SafeWorld (or your data) -> SFT -> reward and cost models -> Safe RLHF (PPO-Lagrangian),
the PPO and reward-shaping baselines -> gold evaluation of every policy.

Every stage writes into one run directory (`output_dir/<stage>/`) and is skipped when its
`metrics.json` already exists, so a crashed or extended pipeline re-runs only what is missing; each
stage can also be run alone with its own command (`safealign sft`, `safealign rm`, ...). Per-stage
settings are passed through as mappings (`sft: {learning_rate: 1e-3}`) and resolved by that stage's
own config class, so the pipeline adds no second set of names.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from rich.console import Console
from rich.table import Table

from safealign.config import config_field, load_config, save_config
from safealign.io import atomic_write_json

console = Console(stderr=True)

# Profiles set sizes only; every value can still be overridden in the YAML or on the command line.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "world": {"sft_examples": 3000, "train_pairs": 2000, "test_pairs": 400},
        "sft": {"num_epochs": 1},
        "rm": {"num_epochs": 1},
        "cm": {"num_epochs": 1},
        "evaluate": {"limit": 200},
        "ppo_lag": {"max_steps": 8, "per_device_prompt_batch_size": 16},
        "ppo": {"max_steps": 8, "per_device_prompt_batch_size": 16},
        "shaping": {"max_steps": 4, "per_device_prompt_batch_size": 16, "nus": [1.0]},
    },
    # The RL budget measured in docs/results.md: 60 rollouts of 32 prompts (about 4 CPU-minutes each, tiny preset).
    "default": {
        "ppo_lag": {"max_steps": 60},
        "ppo": {"max_steps": 60},
        "shaping": {"max_steps": 60},
    },
}


@dataclass
class PipelineConfig:
    output_dir: str = config_field("runs/demo", help="Run directory: every stage writes a sub-directory here.")
    profile: Literal["default", "quick"] = config_field("default", help="Sizes preset: 'quick' is the smoke-test size.")
    seed: int = config_field(0, help="Seed of the world and of every stage (each stage may override its own).")
    model: str = config_field("tiny", help="Policy: a preset (tiny, small, smollm2) or a local Hugging Face model directory.")
    stages: list[str] = config_field(
        ["world", "sft", "evaluate_sft", "rm", "cm", "eval_scores", "ppo_lag", "evaluate_ppo_lag", "ppo", "evaluate_ppo"],
        help="Stages to run, in order (skipped when their metrics.json exists); also: shaping, evaluate_shaping.",
    )
    sft_data: str = config_field("", help="Your SFT file; empty = SafeWorld's SFT corpus.")
    preference_data: str = config_field("", help="Your PKU-format preference file (train); empty = SafeWorld's pairs.")
    preference_eval_data: str = config_field(
        "", help="Held-out preference file; empty = SafeWorld's test pairs (with your preference_data: rm/cm hold out a fraction).")
    eval_prompts: str = config_field("", help="Prompt file for evaluation; empty = SafeWorld's test prompts.")
    rl_prompts: str = config_field(
        "", help="Prompts of the RL rollouts; empty = SafeWorld's train prompts (with your own data: preference_data's prompts).")
    world: dict = config_field({}, help="WorldConfig overrides (safealign world generate --help).")
    sft: dict = config_field({}, help="SFTConfig overrides (safealign sft --help).")
    rm: dict = config_field({}, help="RewardConfig overrides (safealign rm --help).")
    cm: dict = config_field({}, help="CostConfig overrides (safealign cm --help).")
    evaluate: dict = config_field({}, help="GoldEvalConfig overrides (safealign evaluate --help).")
    eval_scores: dict = config_field({}, help="ScoreEvalConfig overrides (safealign eval-scores --help).")
    ppo_lag: dict = config_field({}, help="PPOLagConfig overrides (safealign ppo-lag --help).")
    ppo: dict = config_field({}, help="PPOConfig overrides (safealign ppo --help).")
    shaping: dict = config_field(
        {}, help="RewardShapingConfig overrides (safealign shaping --help); `nus` is the sweep, one policy per ν (default [0.1, 1, 10]).")


def _stage_settings(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    """Profile values, then the user's mapping for that stage (the user wins)."""
    return {**PROFILES[cfg.profile].get(name, {}), **getattr(cfg, name)}


def run(cfg: PipelineConfig) -> dict[str, Any]:
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    world_dir = root / "world"
    paths = {
        "sft_data": cfg.sft_data or str(world_dir / "sft" / "train.jsonl"),
        "preference_data": cfg.preference_data or str(world_dir / "preferences" / "train.jsonl"),
        # Your preference file without a held-out one: rm/cm hold out their eval_fraction (never SafeWorld's pairs).
        "preference_eval_data": cfg.preference_eval_data or ("" if cfg.preference_data else str(world_dir / "preferences" / "test.jsonl")),
        "eval_prompts": cfg.eval_prompts or str(world_dir / "prompts" / "test.jsonl"),
    }
    uses_world = not (cfg.sft_data and cfg.preference_data and cfg.eval_prompts)
    paths["rl_prompts"] = cfg.rl_prompts or (str(world_dir / "prompts" / "train.jsonl") if not cfg.preference_data
                                             else paths["preference_data"])

    def world() -> dict:
        from safealign.data.safeworld import generate

        return generate.run(load_config(generate.WorldConfig, None, {
            **_stage_settings(cfg, "world"), "out": str(world_dir), "seed": cfg.seed}))

    def sft() -> dict:
        from safealign.algorithms import sft as stage

        return stage.run(load_config(stage.SFTConfig, None, {
            "model": cfg.model, "train_data": paths["sft_data"], "seed": cfg.seed,
            **_stage_settings(cfg, "sft"), "output_dir": str(root / "sft")}))

    def gold_eval(model_dir: Path, out: Path) -> dict:
        from safealign.evaluation import gold as stage

        return stage.run(load_config(stage.GoldEvalConfig, None, {
            "model": str(model_dir), "prompts": paths["eval_prompts"], "seed": cfg.seed,
            **_stage_settings(cfg, "evaluate"), "output_dir": str(out)}))

    def evaluate(policy: str) -> Callable[[], dict]:
        return lambda: gold_eval(root / policy / "model", root / "eval" / policy)

    def rl_settings(key: str) -> dict[str, Any]:
        """The paths every RL stage shares (SFT actor, score models, prompts), then profile and user values."""
        return {"actor_model": str(root / "sft" / "model"), "reward_model": str(root / "rm" / "model"),
                "cost_model": str(root / "cm" / "model"), "prompt_data": paths["rl_prompts"], "seed": cfg.seed,
                **_stage_settings(cfg, key)}

    def ppo_lag() -> dict:
        from safealign.algorithms import ppo_lag as stage

        return stage.run(load_config(stage.PPOLagConfig, None, {**rl_settings("ppo_lag"), "output_dir": str(root / "ppo_lag")}))

    def ppo() -> dict:
        from safealign.algorithms import ppo as stage

        settings = {k: v for k, v in rl_settings("ppo").items() if k != "cost_model"}  # PPO has no cost model
        return stage.run(load_config(stage.PPOConfig, None, {**settings, "output_dir": str(root / "ppo")}))

    def shaping_nus() -> list[float]:
        return [float(nu) for nu in _stage_settings(cfg, "shaping").get("nus") or SHAPING_NUS]

    def shaping() -> dict:
        """One shaped-PPO policy per ν into shaping/nu-{ν} (each skipped when done); metrics keyed nu=ν/..."""
        from safealign.algorithms import reward_shaping as stage

        flat: dict[str, Any] = {}
        for nu in shaping_nus():
            out = root / "shaping" / f"nu-{nu:g}"
            if (out / "metrics.json").exists():
                metrics = json.loads((out / "metrics.json").read_text())
            else:
                metrics = stage.run(load_config(stage.RewardShapingConfig, None, {
                    **rl_settings("shaping"), "nus": [], "nu": nu, "output_dir": str(out)}))
            flat.update({f"nu={nu:g}/{k}": v for k, v in metrics.items()})
        atomic_write_json(root / "shaping" / "metrics.json", flat)
        return flat

    def evaluate_shaping() -> dict:
        flat: dict[str, Any] = {}
        for nu in shaping_nus():
            out = root / "eval" / "shaping" / f"nu-{nu:g}"
            if (out / "metrics.json").exists():
                metrics = json.loads((out / "metrics.json").read_text())
            else:
                metrics = gold_eval(root / "shaping" / f"nu-{nu:g}" / "model", out)
            flat.update({f"nu={nu:g}/{k}": v for k, v in metrics.items()})
        atomic_write_json(root / "eval" / "shaping" / "metrics.json", flat)
        return flat

    def value_model(module_name: str, class_name: str, key: str) -> Callable[[], dict]:
        def train() -> dict:
            import importlib

            stage = importlib.import_module(module_name)
            return stage.run(load_config(getattr(stage, class_name), None, {
                "model": str(root / "sft" / "model"), "train_data": paths["preference_data"],
                "eval_data": paths["preference_eval_data"], "seed": cfg.seed,
                **_stage_settings(cfg, key), "output_dir": str(root / key)}))

        return train

    def eval_scores() -> dict:
        from safealign.evaluation import scores as stage

        return stage.run(load_config(stage.ScoreEvalConfig, None, {
            "reward_model": str(root / "rm" / "model"), "cost_model": str(root / "cm" / "model"),
            "data": paths["preference_eval_data"] or paths["preference_data"], **_stage_settings(cfg, "eval_scores"),
            "output_dir": str(root / "eval" / "scores")}))

    stage_fns: dict[str, tuple[Callable[[], dict], Path]] = {
        "world": (world, world_dir),
        "sft": (sft, root / "sft"),
        "evaluate_sft": (evaluate("sft"), root / "eval" / "sft"),
        "rm": (value_model("safealign.algorithms.reward", "RewardConfig", "rm"), root / "rm"),
        "cm": (value_model("safealign.algorithms.cost", "CostConfig", "cm"), root / "cm"),
        "eval_scores": (eval_scores, root / "eval" / "scores"),
        "ppo_lag": (ppo_lag, root / "ppo_lag"),
        "evaluate_ppo_lag": (evaluate("ppo_lag"), root / "eval" / "ppo_lag"),
        "ppo": (ppo, root / "ppo"),
        "evaluate_ppo": (evaluate("ppo"), root / "eval" / "ppo"),
        "shaping": (shaping, root / "shaping"),
        "evaluate_shaping": (evaluate_shaping, root / "eval" / "shaping"),
    }
    unknown = [s for s in cfg.stages if s not in stage_fns]
    if unknown:
        raise ValueError(f"unknown pipeline stage(s) {unknown}; known: {list(stage_fns)}")

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}  # wall seconds of the stages that ran
    cpu_timings: dict[str, float] = {}  # CPU seconds (all threads): on a busy shared machine, close to a quiet run's wall time
    for name in cfg.stages:
        if name == "world" and not uses_world:
            continue
        fn, stage_dir = stage_fns[name]
        done = stage_dir / ("world.json" if name == "world" else "metrics.json")
        if done.exists():
            console.print(f"[dim]skip {name}: {done} exists[/]")
            results[name] = json.loads(done.read_text())
            continue
        console.rule(f"[bold]{name}")
        start, cpu_start = time.perf_counter(), time.process_time()
        results[name] = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        cpu_timings[name] = round(time.process_time() - cpu_start, 1)

    summary = _summary(results, timings, cpu_timings)
    atomic_write_json(root / "metrics.json", summary)
    _print_summary(summary)
    return summary


SHAPING_NUS = [0.1, 1.0, 10.0]  # the pipeline's default ν sweep (small: stays harmful; large: over-refuses)

HEADLINE = {
    "rm": ["eval_accuracy", "gold_agreement"],
    "cm": ["eval_ranking_accuracy", "eval_sign_accuracy", "gold_sign_accuracy"],
    "eval_scores": ["reward_accuracy", "cost_sign_accuracy", "reward_margin_compliance_vs_refusal"],
    "ppo_lag": ["lagrange_multiplier", "episode_cost", "kl", "reward"],
    "ppo": ["kl", "reward"],
}
# The policy table: one row per evaluated policy, gold-judged on the test prompts.
POLICY_METRICS = ["harmful_rate", "helpfulness_benign", "helpfulness_harmful", "over_refusal", "redirection_share"]


def _summary(results: dict[str, dict], timings: dict[str, float], cpu_timings: dict[str, float]) -> dict[str, Any]:
    """One flat JSON object: `<stage>/<metric>` for every stage's numbers, plus stage run times (wall, CPU)."""
    flat: dict[str, Any] = {}
    for stage, metrics in results.items():
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                flat[f"{stage}/{key}"] = value
    for stage, seconds in timings.items():
        flat[f"time_s/{stage}"] = seconds
    for stage, seconds in cpu_timings.items():
        flat[f"cpu_time_s/{stage}"] = seconds
    return flat


def _policy_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(policy name, metric prefix) of every evaluated policy in the summary, SFT first."""
    rows = [(name, f"evaluate_{name}/") for name in ("sft", "ppo", "ppo_lag")
            if f"evaluate_{name}/harmful_rate" in summary]
    nus = sorted({key.split("/")[1] for key in summary if key.startswith("evaluate_shaping/nu=")},
                 key=lambda s: float(s.removeprefix("nu=")))
    rows += [(f"shaping {nu}", f"evaluate_shaping/{nu}/") for nu in nus]
    return rows


def _format(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_summary(summary: dict[str, Any]) -> None:
    policies = _policy_rows(summary)
    if policies:
        table = Table(title="Policies, judged by SafeWorld's gold judges on the test prompts (a simulation)")
        table.add_column("policy")
        for key in POLICY_METRICS:
            table.add_column(key, justify="right")
        for name, prefix in policies:
            table.add_row(name, *[_format(summary.get(prefix + key)) for key in POLICY_METRICS])
        console.print(table)
    table = Table(title="safealign pipeline (SafeWorld is a simulation: numbers are measured by its gold judges)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for stage, keys in HEADLINE.items():
        for key in keys:
            value = summary.get(f"{stage}/{key}")
            if value is not None:
                table.add_row(f"{stage}/{key}", f"{value:.3f}" if isinstance(value, float) else str(value))
    for key, value in summary.items():
        if key.startswith(("time_s/", "cpu_time_s/")):
            table.add_row(key, f"{value:.1f}")
    console.print(table)
