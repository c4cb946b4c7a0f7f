"""The stage table: every stage of the pipeline, as data (the commands they run: `pipeline.commands.COMMANDS`).

`plan(cfg, root)`: the pipeline's stages for a config and a run directory, in order, each a `Stage`: the command it
runs, its directory in the run directory, its inputs (the config values it gets from the run: data files, the models
earlier stages wrote, the seed), the pipeline settings laid over them (the profile's and the user's per-stage
mappings, in order), and the values no setting may change (its output directory, a round's models). The runner
calls `plan` again right before each stage, so a stage's inputs may depend on what the earlier ones wrote (round
k's λ when it is carried over, a red-team directory's files).

A new method needs one row in `COMMANDS` (its command) and, to run inside the pipeline, one `Stage` in `plan` (with
its name in `PipelineConfig.stages`, and its settings mapping if it has one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safealign.config import ConfigError
from safealign.pipeline.commands import COMMANDS
from safealign.pipeline.config import PipelineConfig, num_rounds, shaping_nus, stage_settings
from safealign.run_directory import round_dirs

# The command whose config reads each per-stage mapping of PipelineConfig (checked before any stage runs).
SETTINGS_COMMANDS = {"world": "world generate", "sft": "sft", "rm": "rm", "cm": "cm", "evaluate": "evaluate-policy",
                     "eval_scores": "eval-scores", "ppo_lag": "ppo-lag", "ppo": "ppo", "shaping": "shaping",
                     "redteam": "redteam", "round_rm": "rm", "round_cm": "cm", "round_ppo_lag": "ppo-lag",
                     "compare": "compare", "dpo": "dpo", "sacpo": "dpo", "psacpo": "merge", "cdpo": "cdpo", "bon": "bon",
                     "rsft": "rsft", "grpo_lag": "grpo-lag", "grpo": "grpo", "p3o_lag": "p3o-lag", "p3o": "p3o",
                     "ppo_lag_category": "ppo-lag"}
ROUND_STEPS = ("redteam", "rm", "cm", "eval_scores", "ppo_lag", "evaluate")  # the stages of round k >= 2, in order
ALWAYS_RUN = ("compare", "report")  # cheap summaries of the whole run directory: re-done so they see every policy


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline. Its config is `inputs`, then each `settings` mapping, then `fixed`."""

    name: str  # "rm", "round2/rm", "shaping/nu=0.1"
    command: str  # a key of COMMANDS
    directory: Path  # where it writes (its done file is there)
    inputs: dict[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ()  # PipelineConfig mappings (profile, then the user's), in order
    fixed: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # the entry of PipelineConfig.stages it comes from ("rounds", "shaping"); "" = its own name
    resumable: bool = False  # a training stage: an interrupted attempt continues from its newest checkpoint
    done_file: str = "metrics.json"

    def config_values(self, cfg: PipelineConfig) -> dict[str, Any]:
        values = dict(self.inputs)
        for key in self.settings:
            values.update(stage_settings(cfg, key))
        return {**values, **self.fixed}


def round_stage(k: int, step: str) -> str:
    """The stage that does `step` (rm, cm, eval_scores, ppo_lag, evaluate, redteam) in round k."""
    if k == 1:
        return {"evaluate": "evaluate_ppo_lag"}.get(step, step)
    return f"round{k}/{step}"


def round_threshold(cfg: PipelineConfig, k: int) -> float:
    """d of round k: round_thresholds[k-1], else the round's PPO-Lag settings (round_ppo_lag over ppo_lag), else the
    command's default."""
    if cfg.round_thresholds:
        return float(cfg.round_thresholds[k - 1])
    settings = {**stage_settings(cfg, "ppo_lag"), **(stage_settings(cfg, "round_ppo_lag") if k > 1 else {})}
    if "threshold" in settings:
        return float(settings["threshold"])
    config_class, _ = COMMANDS["ppo-lag"].load()
    return float(config_class.threshold)


@dataclass(frozen=True)
class DataPaths:
    """The files the stages read: the user's, or SafeWorld's in the run directory."""

    sft: str
    preferences: str
    preference_eval: str  # "" = rm/cm hold out a fraction of `preferences`
    eval_prompts: str
    rl_prompts: str
    uses_world: bool  # False when the user gave every file: no world stage


def data_paths(cfg: PipelineConfig, root: Path) -> DataPaths:
    world = root / "world"
    if cfg.eval_split not in ("test", "dev"):
        raise ConfigError(f"eval_split must be 'test' or 'dev', got {cfg.eval_split!r}")
    split = cfg.eval_split
    return DataPaths(
        sft=cfg.sft_data or str(world / "sft" / "train.jsonl"),
        preferences=cfg.preference_data or str(world / "preferences" / "train.jsonl"),
        # Your preference file without a held-out one: rm/cm hold out their eval_fraction (never SafeWorld's pairs).
        preference_eval=cfg.preference_eval_data or ("" if cfg.preference_data else str(world / "preferences" / f"{split}.jsonl")),
        eval_prompts=cfg.eval_prompts or str(world / "prompts" / f"{split}.jsonl"),
        rl_prompts=cfg.rl_prompts or (str(world / "prompts" / "train.jsonl") if not cfg.preference_data else
                                      cfg.preference_data),
        uses_world=not (cfg.sft_data and cfg.preference_data and cfg.eval_prompts),
    )


def plan(cfg: PipelineConfig, root: Path) -> dict[str, Stage]:
    """Every stage cfg can run, by name, in the order of the default `stages`."""
    paths = data_paths(cfg, root)
    stages: list[Stage] = [
        Stage("world", "world generate", root / "world", settings=("world",), fixed={"out": str(root / "world"), "seed": cfg.seed},
              done_file="world.json"),
        Stage("sft", "sft", root / "sft", {"model": cfg.model, "train_data": paths.sft, "seed": cfg.seed}, ("sft",),
              {"output_dir": str(root / "sft")}, resumable=True),
        evaluation("evaluate_sft", cfg, root, paths, root / "sft" / "model", root / "eval" / "sft"),
        value_model("rm", cfg, root, paths, 1),
        value_model("cm", cfg, root, paths, 1),
        value_model_scores("eval_scores", cfg, root, paths, 1),
        rl_stage("ppo_lag", "ppo-lag", cfg, root, paths, ("ppo_lag",),
                 {"threshold": round_threshold(cfg, 1)} if cfg.round_thresholds else {}, extra_inputs=first_round_ptx(cfg, paths)),
        evaluation("evaluate_ppo_lag", cfg, root, paths, root / "ppo_lag" / "model", root / "eval" / "ppo_lag"),
    ]
    for k in range(2, num_rounds(cfg) + 1):
        stages += round_stages(cfg, root, paths, k)
    stages += [
        rl_stage("ppo", "ppo", cfg, root, paths, ("ppo",)),
        evaluation("evaluate_ppo", cfg, root, paths, root / "ppo" / "model", root / "eval" / "ppo"),
    ]
    nus = shaping_nus(cfg)
    stages += [rl_stage(f"shaping/nu={nu:g}", "shaping", cfg, root, paths, ("shaping",), {"nus": [], "nu": nu},
                        directory=root / "shaping" / f"nu-{nu:g}", group="shaping") for nu in nus]
    stages += [evaluation(f"evaluate_shaping/nu={nu:g}", cfg, root, paths, root / "shaping" / f"nu-{nu:g}" / "model",
                          root / "eval" / "shaping" / f"nu-{nu:g}", group="evaluate_shaping") for nu in nus]
    stages += family_stages(cfg, root, paths)
    # Critic-free RL from the SFT model with round 1's value models; GRPO-Lag's and safe P3O's constraint (d) is round 1's.
    stages += [rl_stage("grpo_lag", "grpo-lag", cfg, root, paths, ("grpo_lag",), extra_inputs={"threshold": round_threshold(cfg, 1)}),
               rl_stage("grpo", "grpo", cfg, root, paths, ("grpo",)),
               rl_stage("p3o_lag", "p3o-lag", cfg, root, paths, ("p3o_lag",), extra_inputs={"threshold": round_threshold(cfg, 1)}),
               rl_stage("p3o", "p3o", cfg, root, paths, ("p3o",)),
               # Safe RLHF round 1 with one λ per prompt category (docs/maths.md §10): ppo_lag's settings, then its own
               rl_stage("ppo_lag_category", "ppo-lag", cfg, root, paths, ("ppo_lag", "ppo_lag_category"),
                        {"constraint_per_category": True},
                        extra_inputs={"threshold": round_threshold(cfg, 1), **first_round_ptx(cfg, paths)})]
    stages += [evaluation(f"evaluate_{name}", cfg, root, paths, root / name / "model", root / "eval" / name)
               for name in ONLINE_POLICIES]
    stages += [
        Stage("compare", "compare", root / "eval" / "compare", settings=("compare",), fixed={"run_dir": str(root)}),
        Stage("report", "report", root / "report", fixed={"run_dir": str(root)}),
    ]
    return {stage.name: stage for stage in stages}


# The DPO family from the SFT model: stage -> the dpo settings that make the method (no pipeline setting changes them).
DPO_FAMILY: dict[str, dict[str, Any]] = {
    "dpo_helpful": {"variant": "dpo", "preference": "better"},
    "dpo_harmless": {"variant": "dpo", "preference": "safer"},
    "safedpo": {"variant": "safedpo", "preference": "better"},
    "bfpo": {"variant": "bfpo", "preference": "better"},
    "modpo": {"variant": "modpo", "preference": "better"},  # the margin: round 1's cost model (m = −cost)
}
FAMILY_POLICIES = (*DPO_FAMILY, "sacpo", "psacpo", "cdpo", "rsft")  # each with its evaluate_<name> stage
# online RL beside round 1 (critic-free; PPO-Lag with per-category λ), each with its evaluate_<name> stage
ONLINE_POLICIES = ("grpo_lag", "grpo", "p3o_lag", "p3o", "ppo_lag_category")
BEST_OF_N = {"bon": "reward", "safe_bon": "safe"}  # stage -> selection mode; evaluations of the SFT model


def family_stages(cfg: PipelineConfig, root: Path, paths: DataPaths) -> list[Stage]:
    """The DPO family, SACPO (its second step from dpo_helpful's policy) and P-SACPO (their merge), C-DPO, RS-FT, each
    with its evaluation, and best-of-n of the SFT model with round 1's value models (an evaluation itself)."""
    sft, reward, cost = str(root / "sft" / "model"), str(root / "rm" / "model"), str(root / "cm" / "model")
    pairs = {"train_data": paths.preferences, "eval_data": paths.preference_eval, "seed": cfg.seed}
    stages = []
    for name, method in DPO_FAMILY.items():
        inputs = {"model": sft, **pairs, **({"margin_model": cost} if name == "modpo" else {})}
        stages.append(Stage(name, "dpo", root / name, inputs, ("dpo",), {**method, "output_dir": str(root / name)},
                            resumable=True))
    stages += [
        Stage("sacpo", "dpo", root / "sacpo", {"model": str(root / "dpo_helpful" / "model"), **pairs, "beta": 0.05},
              ("dpo", "sacpo"), {"variant": "dpo", "preference": "safer", "output_dir": str(root / "sacpo")}, resumable=True),
        Stage("psacpo", "merge", root / "psacpo", {"models": [str(root / "dpo_helpful" / "model"), str(root / "sacpo" / "model")],
                                                  "weights": [0.5, 0.5]}, ("psacpo",), {"output_dir": str(root / "psacpo")}),
        # C-DPO's bound on the policy's mean cost is Safe RLHF's: round 1's d (the same constrained problem)
        Stage("cdpo", "cdpo", root / "cdpo", {"model": sft, **pairs, "reward_model": reward, "cost_model": cost,
                                               "prompts": paths.rl_prompts, "threshold": round_threshold(cfg, 1)}, ("dpo", "cdpo"),
              {"output_dir": str(root / "cdpo")}),
        Stage("rsft", "rsft", root / "rsft", {"model": sft, "reward_model": reward, "cost_model": cost,
                                               "prompts": paths.rl_prompts, "seed": cfg.seed}, ("rsft",),
              {**rsft_round_models(cfg, root), "output_dir": str(root / "rsft")}, resumable=True),
    ]
    stages += [evaluation(f"evaluate_{name}", cfg, root, paths, root / name / "model", root / "eval" / name)
               for name in FAMILY_POLICIES]
    sizes = {k: v for k, v in stage_settings(cfg, "evaluate").items() if k in ("samples_per_prompt", "limit", "max_new_tokens")}
    stages += [Stage(name, "bon", root / "eval" / name, {"model": sft, "reward_model": reward, "cost_model": cost,
                                                          "prompts": paths.eval_prompts, "seed": cfg.seed, **sizes},
                     ("bon",), {"mode": mode, "output_dir": str(root / "eval" / name)}) for name, mode in BEST_OF_N.items()]
    return stages


def rsft_follows_rounds(cfg: PipelineConfig) -> bool:
    """RS-FT runs on Safe RLHF's round engine when the pipeline runs Safe RLHF's later rounds."""
    return num_rounds(cfg) > 1 and "rounds" in cfg.stages and "rsft" in cfg.stages


def rsft_round_models(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    """RS-FT's rounds on Safe RLHF's round engine: one RS-FT round per Safe RLHF round, round k ranking its samples
    with round k's reward and cost models (Llama 2 retrained its reward models between rounds of rejection
    sampling); nothing when the pipeline runs one round (then every RS-FT round uses round 1's models)."""
    if not rsft_follows_rounds(cfg):
        return {}
    if cfg.stages.index("rsft") < cfg.stages.index("rounds"):
        raise ConfigError("stages: rsft ranks its rounds with the Safe RLHF rounds' reward and cost models; list it after "
                          "`rounds`")
    rounds = range(1, num_rounds(cfg) + 1)
    return {"rounds": num_rounds(cfg),
            "round_reward_models": [str(root / round_dirs(k)["rm"] / "model") for k in rounds],
            "round_cost_models": [str(root / round_dirs(k)["cm"] / "model") for k in rounds]}


def evaluation(name: str, cfg: PipelineConfig, root: Path, paths: DataPaths, model: Path, out: Path,
               group: str = "") -> Stage:
    """A policy's gold evaluation on the evaluation prompts."""
    return Stage(name, "evaluate-policy", out, {"model": str(model), "prompts": paths.eval_prompts, "seed": cfg.seed},
                 ("evaluate",), {"output_dir": str(out)}, group=group)


def first_round_ptx(cfg: PipelineConfig, paths: DataPaths) -> dict[str, Any]:
    """Round 1's PTX term (`first_round_ptx_coeff`) on the run's SFT data; inputs, so ppo_lag's own settings win."""
    return {"ptx_data": paths.sft, "ptx_coeff": cfg.first_round_ptx_coeff} if cfg.first_round_ptx_coeff else {}


def rl_stage(name: str, command: str, cfg: PipelineConfig, root: Path, paths: DataPaths, settings: tuple[str, ...],
             fixed: dict[str, Any] | None = None, directory: Path | None = None, group: str = "",
             extra_inputs: dict[str, Any] | None = None) -> Stage:
    """An RL stage from the SFT model with round 1's reward and cost models (PPO, GRPO and P3O have no cost model)."""
    directory = directory or root / name
    inputs = {"actor_model": str(root / "sft" / "model"), "reward_model": str(root / "rm" / "model"),
              "cost_model": str(root / "cm" / "model"), "prompt_data": paths.rl_prompts, "seed": cfg.seed,
              **(extra_inputs or {})}
    if command in ("ppo", "grpo", "p3o"):  # the reward alone
        del inputs["cost_model"]
    return Stage(name, command, directory, inputs, settings, {**(fixed or {}), "output_dir": str(directory)},
                 group=group, resumable=True)


def value_model(key: str, cfg: PipelineConfig, root: Path, paths: DataPaths, k: int) -> Stage:
    """The reward (key rm) or cost (cm) model of round k: round 1 from the SFT model on the first pairs; round k >= 2
    on all pairs so far, from round k-1's model (or the SFT model), with the round_{key} settings over {key}'s."""
    init, train_data, settings = root / "sft" / "model", paths.preferences, (key,)
    if k > 1:
        if cfg.round_value_models == "previous":
            init = root / round_dirs(k - 1)[key] / "model"
        train_data = str(root / round_dirs(k)["redteam"] / "train_preferences.jsonl")  # new pairs × new_pairs_weight
        if not Path(train_data).is_file():  # a run directory from before train_preferences.jsonl existed
            train_data = str(root / round_dirs(k)["preferences"])
        settings = (key, f"round_{key}")
    out = root / round_dirs(k)[key]
    return Stage(round_stage(k, key), key, out, {"model": str(init), "train_data": train_data,
                                                 "eval_data": paths.preference_eval, "seed": cfg.seed},
                 settings, {"output_dir": str(out)}, group="rounds" if k > 1 else "", resumable=True)


def value_model_scores(name: str, cfg: PipelineConfig, root: Path, paths: DataPaths, k: int) -> Stage:
    """Round k's reward and cost models on the held-out pairs (against the gold judges on SafeWorld)."""
    dirs, out = round_dirs(k), root / round_dirs(k)["scores"]
    return Stage(name, "eval-scores", out, {"reward_model": str(root / dirs["rm"] / "model"),
                                            "cost_model": str(root / dirs["cm"] / "model"),
                                            "data": paths.preference_eval or paths.preferences},
                 ("eval_scores",), {"output_dir": str(out)}, group="rounds" if k > 1 else "")


def round_stages(cfg: PipelineConfig, root: Path, paths: DataPaths, k: int) -> list[Stage]:
    """Round k >= 2: red-teaming, the value models on all pairs so far, their scores, PPO-Lag from the round k-1
    policy (also the KL reference) with round k's models and threshold, its evaluation."""
    previous, dirs = round_dirs(k - 1), round_dirs(k)
    on_safeworld = not cfg.preference_data  # SafeWorld's pairs: its annotators can label new ones
    redteam = Stage(round_stage(k, "redteam"), "redteam", root / dirs["redteam"], {
        "policy": str(root / previous["ppo_lag"] / "model"), "cost_model": str(root / previous["cm"] / "model"),
        "probe_prompts": paths.rl_prompts, "rl_prompts": paths.rl_prompts,
        "redteam_prompts": str(root / "world" / "prompts" / "redteam.jsonl") if on_safeworld else "",
        "world": str(root / "world") if on_safeworld else "",
        "annotations": cfg.round_preference_data[k - 2] if len(cfg.round_preference_data) >= k - 1 else "",
        "previous_preferences": paths.preferences if k == 2 else str(root / previous["preferences"]),
        "preferences_out": str(root / dirs["preferences"]), "stream": f"round{k}", "seed": cfg.seed},
        ("redteam",), {"output_dir": str(root / dirs["redteam"])}, group="rounds")
    carried = {}
    previous_metrics = root / previous["ppo_lag"] / "metrics.json"
    if cfg.round_lambda == "carry" and "lambda_init" not in cfg.round_ppo_lag and previous_metrics.is_file():
        # The dual variable continues where round k-1 left it (it ends near 0 when the constraint is slack).
        carried = {"lambda_init": json.loads(previous_metrics.read_text())["lagrange_multiplier"]}
    policy = rl_stage(round_stage(k, "ppo_lag"), "ppo-lag", cfg, root, paths, ("ppo_lag", "round_ppo_lag"), {
        **carried, "actor_model": str(root / previous["ppo_lag"] / "model"),
        "reward_model": str(root / dirs["rm"] / "model"), "cost_model": str(root / dirs["cm"] / "model"),
        "prompt_data": str(root / dirs["redteam"] / "rl_prompts.jsonl"), "threshold": round_threshold(cfg, k),
        **({"threshold_quantile": cfg.round_threshold_quantile, "threshold_data": str(root / dirs["redteam"] / "pairs.jsonl")}
           if cfg.round_threshold_quantile else {}),
        **({"ptx_data": paths.sft, "ptx_coeff": cfg.round_ptx_coeff} if cfg.round_ptx_coeff else {})},
        directory=root / dirs["ppo_lag"], group="rounds")
    return [redteam, value_model("rm", cfg, root, paths, k), value_model("cm", cfg, root, paths, k),
            value_model_scores(round_stage(k, "eval_scores"), cfg, root, paths, k), policy,
            evaluation(round_stage(k, "evaluate"), cfg, root, paths, root / dirs["ppo_lag"] / "model",
                       root / dirs["eval"], group="rounds")]


def prerequisites(cfg: PipelineConfig, table: dict[str, Stage], name: str) -> list[str]:
    """The stages whose outputs stage `name` reads: those whose directory holds one of its input paths (its own
    directory, which may lie inside another stage's, is not an input)."""
    stage = table[name]
    own = str(stage.directory)
    values = [v for value in stage.config_values(cfg).values() for v in (value if isinstance(value, list) else [value])]
    paths = [v for v in values if isinstance(v, str) and v and v != own and not v.startswith(f"{own}/")]
    return [other.name for other in table.values() if other.name != name and other.name not in ALWAYS_RUN
            and any(path == str(other.directory) or path.startswith(f"{other.directory}/") for path in paths)]


def expand_stages(cfg: PipelineConfig, root: Path | None = None) -> list[str]:
    """cfg.stages with each group (`rounds`, `shaping`, `evaluate_shaping`) replaced by its stages; a ConfigError
    naming an unknown stage. `root`: the run directory (default: cfg.output_dir)."""
    root = Path(cfg.output_dir) if root is None else root
    table = plan(cfg, root)
    expanded: list[str] = []
    for name in cfg.stages:
        members = [s.name for s in table.values() if s.group == name]
        if members:
            expanded += members
        elif name in table:
            expanded.append(name)
        elif name != "rounds":  # rounds: 1 has no later rounds
            known = [s.name for s in table.values()] + sorted({s.group for s in table.values() if s.group})
            raise ConfigError(f"unknown pipeline stage(s) {[name]}; known: {known}")
    if not data_paths(cfg, root).uses_world:
        expanded = [s for s in expanded if s != "world"]
    return expanded
