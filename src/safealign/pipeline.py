"""The main job: SafeWorld (or your data) -> SFT -> reward and cost models -> Safe RLHF (PPO-Lagrangian),
the PPO and reward-shaping baselines -> gold evaluation of every policy; then more Safe RLHF rounds with
red-teaming (the paper ran three).

Every stage writes into one run directory (`output_dir/<stage>/`) and is skipped when its
`metrics.json` already exists, so a crashed or extended pipeline re-runs only what is missing (a training stage
that was interrupted continues from its newest checkpoint when its config is unchanged: `resume_interrupted`); each
stage can also be run alone with its own command (`safealign sft`, `safealign rm`, ...). Per-stage
settings are passed through as mappings (`sft: {learning_rate: 1e-3}`) and resolved by that stage's
own config class, so the pipeline adds no second set of names.

Rounds. Round 1 is the `rm`, `cm`, `ppo_lag` and `evaluate_ppo_lag` stages. The `rounds` stage runs rounds
2..`rounds`, each as six stages that skip themselves when done (so a crashed pipeline resumes mid-round):
    round{k}/redteam      gather the prompts the round k−1 policy answers unsafely (its cost model: cost > 0)
                          plus SafeWorld's red-team prompts, sample new pairs from that policy, annotate them
                          (SafeWorld's simulated crowdworkers), add them to all the pairs so far
                          (`safealign.rounds`): round{k}/redteam/, round{k}/preferences.jsonl
    round{k}/rm, /cm      reward and cost models on all the pairs so far: round{k}/rm/, round{k}/cm/
    round{k}/eval_scores  those models on the held-out pairs: eval/round{k}/scores/
    round{k}/ppo_lag      Safe RLHF from the round k−1 policy with round k's models and threshold: round{k}/ppo_lag/
    round{k}/evaluate     gold evaluation of that policy: eval/round{k}/
Round k's reward and cost models start from round k−1's by default (`round_value_models: previous`), trained
for a fraction of an epoch (profile) on all the pairs so far. The paper retrained them from the SFT model
(`round_value_models: sft`): a full retraining per round costs about as much as round 1's (2 × 2 epochs
over a growing set), which the 15-minute CPU budget of the default profile cannot pay twice more; warm
starting keeps round 1's fit, and replaying all the pairs (not only the new ones) keeps it from drifting
towards the new pairs' prompt mix.

Two lanes (`parallel_baselines: true`, as configs/pipeline.yaml sets). After world, SFT, RM and CM, the baselines'
stages (evaluate_sft, eval_scores, ppo, evaluate_ppo, shaping, evaluate_shaping) run in a second process while this
one runs Safe RLHF's (ppo_lag, evaluate_ppo_lag, the rounds), the CPU threads split between them; compare and report
run once both are done. Each stage computes what it would in one lane (measured bit-identical on the CPU:
tests/test_pipeline.py, and on an H100); only the wall time changes. The second lane's output goes to output_dir/logs/baselines.log.

`output_dir/policies.json` (written after every stage) lists every policy and value model the stages
produce, with paths relative to the run directory, for the report and the multi-model comparison;
`output_dir/progress.json` names the stage running now (`safealign seeds` shows it per seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import yaml
from rich.table import Table

from safealign.config import (ConfigError, StageFailed, changed_settings, check_overrides, config_field, load_config,
                              save_config)
from safealign.console import stderr_console
from safealign.io import atomic_write_json

console = stderr_console()
StageConfig = TypeVar("StageConfig")

# Profiles set sizes only; every value can still be overridden in the YAML or on the command line.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "world": {"sft_examples": 3000, "train_pairs": 2000, "test_pairs": 400, "redteam_prompts": 56},
        "sft": {"num_epochs": 1},
        # Half an epoch: the quick profile is a smoke test (<= 4 minutes with round 2), not a calibrated run.
        "rm": {"num_epochs": 0.5},
        "cm": {"num_epochs": 0.5},
        "evaluate": {"limit": 200},
        "ppo_lag": {"max_steps": 8, "per_device_prompt_batch_size": 16},
        "ppo": {"max_steps": 8, "per_device_prompt_batch_size": 16},
        "shaping": {"max_steps": 4, "per_device_prompt_batch_size": 16, "nus": [1.0]},
        # Round 2 at smoke-test size: it exercises every round stage, it does not train much.
        "redteam": {"probe_limit": 64, "pairs": 100},
        "round_rm": {"max_steps": 4},
        "round_cm": {"max_steps": 4},
        "round_ppo_lag": {"max_steps": 2},
    },
    # Sized for a 2-core CPU without AVX-512 (docs/results.md has the measured stage times). SFT keeps its 3
    # epochs: with 2 the policy is undertrained (eval loss 0.305 vs 0.187, benign helpfulness 0.88 vs 2.3,
    # harmful rate 26%, below the calibration band). The cost model gets 1 epoch (sign accuracy 98.4% vs
    # labels, 99.8% vs gold: it saturates first), the reward model the full 2; round 1's RL the budget
    # measured in docs/results.md (60 rollouts of 32 prompts); the shaping sweep 40 rollouts per ν.
    "default": {
        "cm": {"num_epochs": 1},
        # Four sampled answers per test prompt: with one, a round's harmful rate moves by ±3 points from sampling
        # alone (seed 0: 4.8 / 5.2 / 4.8% over rounds 1-3 with one answer, 4.6 / 3.7 / 1.9% with four; docs/results.md).
        "evaluate": {"samples_per_prompt": 4},
        "ppo_lag": {"max_steps": 60},
        "ppo": {"max_steps": 60},
        "shaping": {"max_steps": 40},
        # Rounds 2 and 3 must be cheap. Measured on the docs/results.md models (2 shared cores, load ~3):
        # 1,000 new pairs from probing 256 train prompts + the 280 red-team prompts took 61 CPU-seconds; the
        # reward model warm started from round 1's, half an epoch over all 6,905 pairs (108 steps), 134
        # CPU-seconds, gold agreement 83.1% (round 1: 83.6%). A quarter epoch (~54 steps) halves that.
        "redteam": {"probe_limit": 256, "pairs": 1000},
        "round_rm": {"num_epochs": 0.25},
        "round_cm": {"num_epochs": 0.25},
        # The later rounds end every answer or pay for it (TRL's missing_eos_penalty): without it their policies drift to
        # answers cut at max_new_tokens (39-63% after round 3, against 24% after round 1), text the score models never
        # saw; over three seeds over-refusal after round 3 fell 21.4 -> 15.4% at the same harmful rate and helpfulness.
        # Not in round 1: there it made the policy more harmful (seed 0: 7.0% vs 4.6%). docs/results.md.
        "round_ppo_lag": {"max_steps": 20, "missing_eos_penalty": 1.0},
    },
}
STAGES = ("world", "sft", "evaluate_sft", "rm", "cm", "eval_scores", "ppo_lag", "evaluate_ppo_lag", "ppo", "evaluate_ppo",
          "shaping", "evaluate_shaping", "compare", "report")  # and `rounds`: round{k}/<ROUND_STEPS> for k >= 2
ALWAYS_RUN = {"compare", "report"}  # cheap summaries of the whole run directory: re-done so they see every policy
PROFILE_ROUNDS = {"quick": 2, "default": 3}  # Safe RLHF rounds when `rounds` is 0 (the paper ran 3)
HOW_TO_RUN = ("stages", "parallel_baselines")  # settings that change what runs or how, not what a stage computes
ROUND_STEPS = ("redteam", "rm", "cm", "eval_scores", "ppo_lag", "evaluate")  # the stages of round k >= 2, in order


@dataclass
class PipelineConfig:
    output_dir: str = config_field("runs/demo", help="Run directory: every stage writes a sub-directory here.")
    profile: Literal["default", "quick"] = config_field("default", help="Sizes preset: 'quick' is the smoke-test size.")
    seed: int = config_field(0, help="Seed of the world and of every stage (each stage may override its own).")
    model: str = config_field("tiny", help="Policy: a preset (tiny, small, smollm2) or a local Hugging Face model directory.")
    stages: list[str] = config_field(
        ["world", "sft", "evaluate_sft", "rm", "cm", "eval_scores", "ppo_lag", "evaluate_ppo_lag", "rounds", "ppo",
         "evaluate_ppo", "shaping", "evaluate_shaping", "compare", "report"],
        help="Stages to run, in order (skipped when their metrics.json exists; compare and report always run, they are "
             "cheap and must see every policy). `rounds` = rounds 2.. (round{k}/redteam, /rm, /cm, /eval_scores, "
             "/ppo_lag, /evaluate), each also a stage name.",
    )
    rounds: int = config_field(
        0, help="Safe RLHF rounds (the paper ran 3): round 1 = the ppo_lag stage, rounds 2.. = the rounds stage; 0 = the profile's (default 3, quick 2).")
    round_thresholds: list[float] = config_field(
        [], help="d of each round's PPO-Lag, round 1 first (it replaces ppo_lag's threshold there); [] = ppo_lag's threshold every round.")
    round_value_models: Literal["previous", "sft"] = config_field(
        "previous", help="Round k's reward/cost models start from round k-1's (cheap: see round_rm) or from the SFT model (the paper's retraining: give round_rm/round_cm num_epochs 2).")
    round_lambda: Literal["init", "carry"] = config_field(
        "init", help="λ at the start of round k >= 2: init = ppo_lag's lambda_init again (as separate runs of the paper), "
                     "carry = round k-1's final λ (the dual continues; measured: more helpful, more harmful, docs/results.md).")
    round_preference_data: list[str] = config_field(
        [], help="Your annotated PKU-format pairs of rounds 2, 3, ... (one file each) instead of sampled pairs labelled by SafeWorld's crowdworkers; required with your own preference_data.")
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
    redteam: dict = config_field({}, help="RedTeamConfig overrides of rounds >= 2 (safealign.rounds): pairs, probe_limit, prompt_mix, ...")
    round_rm: dict = config_field({}, help="RewardConfig overrides of rounds >= 2, over rm's (e.g. num_epochs).")
    round_cm: dict = config_field({}, help="CostConfig overrides of rounds >= 2, over cm's (e.g. num_epochs).")
    round_ppo_lag: dict = config_field({}, help="PPOLagConfig overrides of rounds >= 2, over ppo_lag's (e.g. max_steps).")
    compare: dict = config_field({}, help="CompareConfig overrides of the compare stage (safealign evaluate --help): n_bootstrap, seed, ...")
    parallel_baselines: bool = config_field(
        False, help="Run the baselines (evaluate_sft, eval_scores, ppo, shaping and their evaluations) in a second process beside "
                    "the Safe RLHF lane (ppo_lag, rounds), the CPU threads split between the two: faster on a CPU "
                    "(generation uses a second thread poorly) and on a GPU that small models leave idle; both processes "
                    "hold their models on the GPU. The results are the same (docs/results.md); its log: "
                    "output_dir/logs/baselines.log.")


def _stage_settings(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    """Profile values, then the user's mapping for that stage (the user wins)."""
    return {**PROFILES[cfg.profile].get(name, {}), **getattr(cfg, name)}


def round_dirs(k: int) -> dict[str, str]:
    """Where round k's outputs live, relative to the run directory (round 1: the pipeline's first stages)."""
    if k == 1:
        return {"rm": "rm", "cm": "cm", "ppo_lag": "ppo_lag", "eval": "eval/ppo_lag", "scores": "eval/scores"}
    r = f"round{k}"
    return {"redteam": f"{r}/redteam", "preferences": f"{r}/preferences.jsonl", "rm": f"{r}/rm", "cm": f"{r}/cm",
            "ppo_lag": f"{r}/ppo_lag", "eval": f"eval/{r}", "scores": f"eval/{r}/scores"}


def round_stage(k: int, step: str) -> str:
    """The stage that does `step` (rm, cm, eval_scores, ppo_lag, evaluate, redteam) in round k."""
    if k == 1:
        return {"evaluate": "evaluate_ppo_lag"}.get(step, step)
    return f"round{k}/{step}"


def num_rounds(cfg: PipelineConfig) -> int:
    return cfg.rounds or PROFILE_ROUNDS[cfg.profile]


def round_threshold(cfg: PipelineConfig, k: int) -> float:
    """d of round k: round_thresholds[k-1], else the round's PPO-Lag settings (round_ppo_lag over ppo_lag), else 0."""
    if cfg.round_thresholds:
        return float(cfg.round_thresholds[k - 1])
    settings = {**_stage_settings(cfg, "ppo_lag"), **(_stage_settings(cfg, "round_ppo_lag") if k > 1 else {})}
    from safealign.algorithms.ppo_lag import PPOLagConfig

    return float(settings.get("threshold", PPOLagConfig.threshold))


def expand_stages(cfg: PipelineConfig) -> list[str]:
    """cfg.stages with `rounds` replaced by the stages of rounds 2..num_rounds."""
    expanded: list[str] = []
    for name in cfg.stages:
        expanded += ([round_stage(k, step) for k in range(2, num_rounds(cfg) + 1) for step in ROUND_STEPS]
                     if name == "rounds" else [name])
    return expanded


def _check_rounds(cfg: PipelineConfig, stages: list[str]) -> None:
    """Fail before any stage runs when the round settings cannot work."""
    rounds = num_rounds(cfg)
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1 (or 0 for the profile's), got {cfg.rounds}")
    if cfg.round_thresholds and len(cfg.round_thresholds) != rounds:
        raise ConfigError(f"round_thresholds has {len(cfg.round_thresholds)} values for {rounds} rounds: give one per "
                          "round (round 1 first) or none")
    later = [s for s in stages if s.startswith("round") and "/" in s]  # a stage of round k >= 2
    if later and cfg.preference_data and len(cfg.round_preference_data) < rounds - 1:
        raise ConfigError(
            f"rounds 2..{rounds} need annotations of their new pairs. On SafeWorld its simulated crowdworkers give "
            "them; with your own preference_data, annotate each round's pairs (e.g. sampled from the previous "
            f"round's policy) and list the PKU-format files in round_preference_data (one per round >= 2: "
            f"{rounds - 1} needed, {len(cfg.round_preference_data)} given), or set rounds: 1")


def resume_interrupted(config: StageConfig) -> StageConfig:
    """A training stage's config, set to continue the attempt that crashed in its output_dir.

    The pipeline runs a stage again when it has no metrics.json. If that stage left checkpoints under the very same
    config (output_dir/config.yaml, written when it started; `resume` aside), it continues from the newest one
    (`resume: latest`: the same trajectory as an uninterrupted run, as `--resume` of the stage's own command). After
    a config change it starts fresh, with a note. A `resume` the user set in the stage's settings is kept as given.
    """
    from safealign.training.checkpoint import latest_checkpoint  # torch: not at import (fast --help)

    if getattr(config, "resume", None) != "":
        return config
    out = Path(config.output_dir)
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return config
    if changed_settings(config, out / "config.yaml", ignore=("resume",)) != []:
        console.print(f"[yellow]note:[/] {out} holds checkpoints of an interrupted attempt with another config: "
                      "starting it fresh", highlight=False)
        return config
    console.print(f"resuming the interrupted stage in {out} from {checkpoint.name}", highlight=False)
    return dataclasses.replace(config, resume="latest")


def _warn_if_settings_changed(cfg: PipelineConfig, root: Path) -> None:
    """A run directory started with other settings keeps the stages already done (skip-when-done): say which
    settings differ, so that results of two configurations are not mixed unknowingly, and keep the earlier
    config.yaml next to the new one (config.before-<UTC time>.yaml)."""
    changed = changed_settings(cfg, root / "config.yaml", ignore=HOW_TO_RUN)
    if changed:
        # config.yaml will describe this invocation: the one it replaces is kept, since done stages came from it
        kept = root / f"config.before-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.yaml"
        (root / "config.yaml").replace(kept)
        console.print(f"[yellow]warning:[/] {root} was started with other settings ({', '.join(changed)}): the stages already "
                      "done keep their results and are skipped; remove their directories (or use a new output_dir) to "
                      f"redo them with these settings. The earlier settings are kept in {kept.name}.", highlight=False)


def stage_settings_classes() -> dict[str, type]:
    """The config class that reads each per-stage mapping of PipelineConfig (checked before any stage runs)."""
    from safealign.algorithms.cost import CostConfig
    from safealign.algorithms.ppo import PPOConfig
    from safealign.algorithms.ppo_lag import PPOLagConfig
    from safealign.algorithms.reward import RewardConfig
    from safealign.algorithms.reward_shaping import RewardShapingConfig
    from safealign.algorithms.sft import SFTConfig
    from safealign.data.safeworld.generate import WorldConfig
    from safealign.evaluation.compare import CompareConfig
    from safealign.evaluation.gold import GoldEvalConfig
    from safealign.evaluation.scores import ScoreEvalConfig
    from safealign.rounds import RedTeamConfig

    return {"world": WorldConfig, "sft": SFTConfig, "rm": RewardConfig, "cm": CostConfig, "evaluate": GoldEvalConfig,
            "eval_scores": ScoreEvalConfig, "ppo_lag": PPOLagConfig, "ppo": PPOConfig, "shaping": RewardShapingConfig,
            "redteam": RedTeamConfig, "round_rm": RewardConfig, "round_cm": CostConfig, "round_ppo_lag": PPOLagConfig,
            "compare": CompareConfig}


def check_config(cfg: PipelineConfig) -> list[str]:
    """The stages cfg runs (`rounds` expanded); a ConfigError before anything runs when the settings cannot work:
    unknown stages, round settings that do not fit, a per-stage mapping with a key or value its stage rejects."""
    stages = expand_stages(cfg)
    _check_rounds(cfg, stages)
    for key, config_class in stage_settings_classes().items():
        check_overrides(config_class, getattr(cfg, key), f"pipeline setting '{key}'")
    if cfg.parallel_baselines and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("parallel_baselines starts a second pipeline process: run the pipeline without accelerate "
                          "launch / torchrun, or set parallel_baselines: false")
    known = list(STAGES) + [round_stage(k, step) for k in range(2, num_rounds(cfg) + 1) for step in ROUND_STEPS]
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ConfigError(f"unknown pipeline stage(s) {unknown}; known: {known + ['rounds']}")
    return stages


def _stage_table(cfg: PipelineConfig, root: Path) -> tuple[dict[str, tuple[Callable[[], dict], Path]], bool]:
    """{stage: (the function that runs it, its directory)} for every stage cfg can run, and whether the run uses
    SafeWorld (False when the user gave every file: no world stage)."""
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

        return stage.run(resume_interrupted(load_config(stage.SFTConfig, None, {
            "model": cfg.model, "train_data": paths["sft_data"], "seed": cfg.seed,
            **_stage_settings(cfg, "sft"), "output_dir": str(root / "sft")})))

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

        threshold = {"threshold": round_threshold(cfg, 1)} if cfg.round_thresholds else {}
        return stage.run(resume_interrupted(load_config(stage.PPOLagConfig, None, {
            **rl_settings("ppo_lag"), **threshold, "output_dir": str(root / "ppo_lag")})))

    def ppo() -> dict:
        from safealign.algorithms import ppo as stage

        settings = {k: v for k, v in rl_settings("ppo").items() if k != "cost_model"}  # PPO has no cost model
        return stage.run(resume_interrupted(load_config(stage.PPOConfig, None, {**settings, "output_dir": str(root / "ppo")})))

    def shaping() -> dict:
        """One shaped-PPO policy per ν into shaping/nu-{ν} (each skipped when done); metrics keyed nu=ν/..."""
        from safealign.algorithms import reward_shaping as stage

        flat: dict[str, Any] = {}
        for nu in shaping_nus(cfg):
            out = root / "shaping" / f"nu-{nu:g}"
            if (out / "metrics.json").exists():
                metrics = json.loads((out / "metrics.json").read_text())
            else:
                metrics = stage.run(resume_interrupted(load_config(stage.RewardShapingConfig, None, {
                    **rl_settings("shaping"), "nus": [], "nu": nu, "output_dir": str(out)})))
            flat.update({f"nu={nu:g}/{k}": v for k, v in metrics.items()})
        atomic_write_json(root / "shaping" / "metrics.json", flat)
        return flat

    def evaluate_shaping() -> dict:
        flat: dict[str, Any] = {}
        for nu in shaping_nus(cfg):
            out = root / "eval" / "shaping" / f"nu-{nu:g}"
            if (out / "metrics.json").exists():
                metrics = json.loads((out / "metrics.json").read_text())
            else:
                metrics = gold_eval(root / "shaping" / f"nu-{nu:g}" / "model", out)
            flat.update({f"nu={nu:g}/{k}": v for k, v in metrics.items()})
        atomic_write_json(root / "eval" / "shaping" / "metrics.json", flat)
        return flat

    def value_model(key: str, k: int = 1) -> Callable[[], dict]:
        """The reward (key rm) or cost (cm) model of round k: round 1 from the SFT model on the first pairs;
        round k >= 2 on all pairs so far, from round k-1's model (or the SFT model), with round_{key} settings."""
        def train() -> dict:
            from safealign.algorithms import cost, reward

            stage, config_class = (reward, reward.RewardConfig) if key == "rm" else (cost, cost.CostConfig)
            init, train_data, settings = root / "sft" / "model", paths["preference_data"], _stage_settings(cfg, key)
            if k > 1:
                if cfg.round_value_models == "previous":
                    init = root / round_dirs(k - 1)[key] / "model"
                train_data = str(root / round_dirs(k)["redteam"] / "train_preferences.jsonl")  # new pairs × new_pairs_weight
                if not Path(train_data).is_file():  # a run directory from before train_preferences.jsonl existed
                    train_data = str(root / round_dirs(k)["preferences"])
                settings = {**settings, **_stage_settings(cfg, f"round_{key}")}
            return stage.run(resume_interrupted(load_config(config_class, None, {
                "model": str(init), "train_data": train_data, "eval_data": paths["preference_eval_data"],
                "seed": cfg.seed, **settings, "output_dir": str(root / round_dirs(k)[key])})))

        return train

    def eval_scores(k: int = 1) -> Callable[[], dict]:
        def score() -> dict:
            from safealign.evaluation import scores as stage

            dirs = round_dirs(k)
            return stage.run(load_config(stage.ScoreEvalConfig, None, {
                "reward_model": str(root / dirs["rm"] / "model"), "cost_model": str(root / dirs["cm"] / "model"),
                "data": paths["preference_eval_data"] or paths["preference_data"], **_stage_settings(cfg, "eval_scores"),
                "output_dir": str(root / dirs["scores"])}))

        return score

    def redteam(k: int) -> Callable[[], dict]:
        def gather() -> dict:
            from safealign import rounds as stage

            previous, dirs = round_dirs(k - 1), round_dirs(k)
            on_safeworld = not cfg.preference_data  # SafeWorld's pairs: its annotators can label new ones
            annotations = cfg.round_preference_data[k - 2] if len(cfg.round_preference_data) >= k - 1 else ""
            return stage.run(load_config(stage.RedTeamConfig, None, {
                "policy": str(root / previous["ppo_lag"] / "model"), "cost_model": str(root / previous["cm"] / "model"),
                "probe_prompts": paths["rl_prompts"], "rl_prompts": paths["rl_prompts"],
                "redteam_prompts": str(world_dir / "prompts" / "redteam.jsonl") if on_safeworld else "",
                "world": str(world_dir) if on_safeworld else "", "annotations": annotations,
                "previous_preferences": paths["preference_data"] if k == 2 else str(root / previous["preferences"]),
                "preferences_out": str(root / dirs["preferences"]), "stream": f"round{k}", "seed": cfg.seed,
                **_stage_settings(cfg, "redteam"), "output_dir": str(root / dirs["redteam"])}))

        return gather

    def round_ppo_lag(k: int) -> Callable[[], dict]:
        """Safe RLHF again, from the round k-1 policy (also the KL reference), with round k's models and d."""
        def train() -> dict:
            from safealign.algorithms import ppo_lag as stage

            previous, dirs = round_dirs(k - 1), round_dirs(k)
            carried = {}
            if cfg.round_lambda == "carry" and "lambda_init" not in cfg.round_ppo_lag:
                # The dual variable continues where round k-1 left it (round k-1 ends with λ ≈ 0.05 when the
                # constraint is slack). With λ_0 = 1 instead, the first rollouts of a short later round are
                # mostly constraint: safer, fewer redirections, less helpful (docs/results.md).
                carried = {"lambda_init": json.loads((root / previous["ppo_lag"] / "metrics.json").read_text())["lagrange_multiplier"]}
            return stage.run(resume_interrupted(load_config(stage.PPOLagConfig, None, {
                **rl_settings("ppo_lag"), **_stage_settings(cfg, "round_ppo_lag"), **carried,
                "actor_model": str(root / previous["ppo_lag"] / "model"),
                "reward_model": str(root / dirs["rm"] / "model"), "cost_model": str(root / dirs["cm"] / "model"),
                "prompt_data": str(root / dirs["redteam"] / "rl_prompts.jsonl"), "threshold": round_threshold(cfg, k),
                "output_dir": str(root / dirs["ppo_lag"])})))

        return train

    def compare() -> dict:
        from safealign.evaluation.compare import compare_run_dir

        return compare_run_dir(root, _stage_settings(cfg, "compare"))

    def report() -> dict:
        from safealign.evaluation.report import build_report

        content = build_report(root)
        console.print(f"report: {root / 'report.html'} (and report.md, report.json)")
        return {"report_html": str(root / "report.html"),
                "figures": sum(b["type"] == "figure" for s in content["sections"] for b in s["blocks"])}

    stage_fns: dict[str, tuple[Callable[[], dict], Path]] = {
        "world": (world, world_dir),
        "sft": (sft, root / "sft"),
        "evaluate_sft": (evaluate("sft"), root / "eval" / "sft"),
        "rm": (value_model("rm"), root / "rm"),
        "cm": (value_model("cm"), root / "cm"),
        "eval_scores": (eval_scores(), root / "eval" / "scores"),
        "ppo_lag": (ppo_lag, root / "ppo_lag"),
        "evaluate_ppo_lag": (evaluate("ppo_lag"), root / "eval" / "ppo_lag"),
        "ppo": (ppo, root / "ppo"),
        "evaluate_ppo": (evaluate("ppo"), root / "eval" / "ppo"),
        "shaping": (shaping, root / "shaping"),
        "evaluate_shaping": (evaluate_shaping, root / "eval" / "shaping"),
        "compare": (compare, root / "eval" / "compare"),
        "report": (report, root / "report"),
    }
    for k in range(2, num_rounds(cfg) + 1):
        dirs = round_dirs(k)
        policy = root / dirs["ppo_lag"] / "model"
        stage_fns.update({
            round_stage(k, "redteam"): (redteam(k), root / dirs["redteam"]),
            round_stage(k, "rm"): (value_model("rm", k), root / dirs["rm"]),
            round_stage(k, "cm"): (value_model("cm", k), root / dirs["cm"]),
            round_stage(k, "eval_scores"): (eval_scores(k), root / dirs["scores"]),
            round_stage(k, "ppo_lag"): (round_ppo_lag(k), root / dirs["ppo_lag"]),
            round_stage(k, "evaluate"): (lambda policy=policy, out=root / dirs["eval"]: gold_eval(policy, out), root / dirs["eval"]),
        })

    return stage_fns, uses_world


def run(cfg: PipelineConfig) -> dict[str, Any]:
    stages = check_config(cfg)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _warn_if_settings_changed(cfg, root)
    save_config(cfg, root / "config.yaml")
    table, uses_world = _stage_table(cfg, root)
    if not uses_world:
        stages = [s for s in stages if s != "world"]
    atomic_write_json(root / "policies.json", policies_manifest(cfg, root, set(stages)))
    runner = _StageRunner(cfg, root, table, stages)
    head, side, tail = ([s for s in stages if s in names] for names in (LANE_HEAD, BASELINE_LANE, ALWAYS_RUN))
    main = [s for s in stages if s not in {*head, *side, *tail}]
    both_lanes_busy = any(not runner.done(s) for s in side) and any(not runner.done(s) for s in main)
    if cfg.parallel_baselines and both_lanes_busy and _enough_threads():
        runner.run_all(head)
        _run_beside(runner, main=main, side=side)
        runner.run_all(tail)
    else:
        runner.run_all(stages)

    atomic_write_json(root / "progress.json", {"stage": None, "number": len(stages), "stages": len(stages),
                                               "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def in_order(values: dict[str, Any]) -> dict[str, Any]:  # the lanes finish their stages out of order
        return {name: values[name] for name in stages if name in values}

    summary = _summary(in_order(runner.results), in_order(runner.timings), in_order(runner.cpu_timings))
    summary.update(_round_headlines(cfg, summary))
    atomic_write_json(root / "metrics.json", summary)
    _print_summary(summary, num_rounds(cfg))
    return summary


class _StageRunner:
    """Runs stages in one process: skips a stage whose done file exists (loading its metrics), times the others,
    and after each one rewrites policies.json (and progress.json when this process is the one people watch)."""

    def __init__(self, cfg: PipelineConfig, root: Path, table: dict[str, tuple[Callable[[], dict], Path]],
                 stages: list[str], watched: bool = True) -> None:
        self.cfg, self.root, self.table, self.stages, self.watched = cfg, root, table, stages, watched
        self.results: dict[str, dict] = {}
        self.timings: dict[str, float] = {}  # wall seconds of the stages that ran
        self.cpu_timings: dict[str, float] = {}  # CPU seconds of this process (all threads): on a busy shared machine, close to a quiet run's wall time
        self.before_each: Callable[[], None] = lambda: None  # the lanes' thread rebalancing

    def done_file(self, name: str) -> Path:
        return self.table[name][1] / ("world.json" if name == "world" else "metrics.json")

    def done(self, name: str) -> bool:
        return self.done_file(name).exists() and name not in ALWAYS_RUN

    def run_all(self, names: list[str]) -> None:
        for name in names:
            self.run_one(name)

    def run_one(self, name: str) -> None:
        fn, _ = self.table[name]
        if self.done(name):
            console.print(f"[dim]skip {name}: {self.done_file(name)} exists[/]")
            self.results[name] = json.loads(self.done_file(name).read_text())
            return
        self.before_each()
        if self.watched:  # progress.json: which stage runs now, for whoever watches the run (`safealign seeds`, a dashboard)
            self.write_progress(name)
        console.rule(f"[bold]{name}")
        start, cpu_start = time.perf_counter(), time.process_time()
        self.results[name] = fn()
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.cpu_timings[name] = round(time.process_time() - cpu_start, 1)
        atomic_write_json(self.root / "policies.json", policies_manifest(self.cfg, self.root, set(self.stages)))

    def write_progress(self, name: str, **extra: Any) -> None:
        atomic_write_json(self.root / "progress.json", {
            "stage": name, "number": self.stages.index(name) + 1 if name in self.stages else len(self.results),
            "stages": len(self.stages), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra})


# --------------------------------------------------------------------------------------------------
# Two lanes (`parallel_baselines`): the baselines in a second process beside Safe RLHF's rounds
# --------------------------------------------------------------------------------------------------
# After SFT and the round-1 reward and cost models, the baselines depend on nothing else and nothing depends on
# them but compare/report. On a CPU, generation-heavy stages use a second thread poorly (PPO-Lag on 2 threads:
# 1.23× its speed on 1; reward-model training 1.88×, docs/results.md), so two one-thread lanes get through the RL
# and evaluation stages faster than one two-thread lane. A lane takes the other's threads back when that one ends.
LANE_HEAD = ("world", "sft", "rm", "cm")  # every baseline stage needs these; they run first, with all threads
BASELINE_LANE = ("evaluate_sft", "eval_scores", "ppo", "evaluate_ppo", "shaping", "evaluate_shaping")
LANE_LOG = "logs/baselines.log"  # the second lane's output (stages, warnings, a traceback if it fails)
LANE_RESULT = "logs/baselines.json"  # its stage times, or the stage that failed and why
LANE_REQUEST = "logs/baselines-request.json"  # what it runs: the pipeline config, its stages, its threads
LANE_MAIN_DONE = "logs/safe_rlhf_lane.done"  # written when the main lane ends: the second takes all the threads


def _enough_threads() -> bool:
    """At least two CPU threads to split between the lanes (else the stages run one after another, with a note)."""
    import torch

    if torch.get_num_threads() < 2:
        console.print("[yellow]note:[/] parallel_baselines needs at least 2 CPU threads (torch has "
                      f"{torch.get_num_threads()}): the stages run one after another", highlight=False)
        return False
    return True


def _run_beside(runner: _StageRunner, main: list[str], side: list[str]) -> None:
    """Run `side` in a second process while this one runs `main`; each lane gets half the threads, and whichever
    finishes first hands its threads to the other at the other's next stage. A stage that fails in the second
    lane fails the pipeline once `main` is done (StageFailed naming the log); one failing here stops the second
    lane (re-running the command resumes both: done stages are skipped, interrupted ones resume from checkpoints)."""
    import subprocess
    import sys

    import torch

    total = torch.get_num_threads()
    root = runner.root
    log, result, main_done = root / LANE_LOG, root / LANE_RESULT, root / LANE_MAIN_DONE
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    main_done.unlink(missing_ok=True)
    request = root / LANE_REQUEST
    atomic_write_json(request, {"config": dataclasses.asdict(runner.cfg), "stages": runner.stages, "names": side,
                                "threads": total - total // 2, "total_threads": total, "parent_pid": os.getpid()})
    console.print(f"baselines ({', '.join(s for s in side if not runner.done(s))}) run in a second process beside the "
                  f"Safe RLHF lane, {total // 2} + {total - total // 2} threads; its log: {log}", highlight=False)
    # A fresh interpreter (not fork: no torch, CUDA or Accelerate state is inherited; not multiprocessing's spawn,
    # which re-runs the caller's main script when it has no __main__ guard).
    with open(log, "ab") as out:
        lane = subprocess.Popen([sys.executable, "-c", "import sys; from safealign.pipeline import side_lane; "
                                 "side_lane(sys.argv[1])", str(request)], stdout=out, stderr=subprocess.STDOUT)
    torch.set_num_threads(total // 2)

    def rebalance() -> None:
        if lane.poll() is not None and torch.get_num_threads() != total:
            torch.set_num_threads(total)

    runner.before_each = rebalance
    try:
        runner.run_all(main)
    except BaseException:
        lane.terminate()
        lane.wait()
        console.print(f"[yellow]the baselines lane was stopped[/] (its log: {log}); the same command resumes it",
                      highlight=False)
        raise
    finally:
        runner.before_each = lambda: None
        torch.set_num_threads(total)
    main_done.touch()
    if lane.poll() is None:
        runner.write_progress("baselines lane", log=LANE_LOG)
        console.print(f"waiting for the baselines lane (its log: {log})", highlight=False)
    lane.wait()
    outcome = json.loads(result.read_text()) if result.is_file() else {}
    if lane.returncode != 0 or outcome.get("error"):
        failure = outcome.get("error") or {"stage": "?", "message": f"the process ended with exit code {lane.returncode}"}
        raise StageFailed(f"pipeline stage {failure['stage']} failed in the baselines lane: {failure['message']} "
                          f"(traceback in {log}). The Safe RLHF lane finished; re-run the same command to resume.")
    runner.timings.update(outcome["timings"])
    runner.cpu_timings.update(outcome["cpu_timings"])
    for name in side:  # the lane's results, as a skipped stage's
        runner.results[name] = json.loads(runner.done_file(name).read_text())


def side_lane(request_path: str) -> None:
    """The second lane's process (started by `_run_beside`): runs the requested stages with its share of the
    threads (all of them once the main lane is done), then writes their times, or the stage that failed, to
    LANE_RESULT."""
    import sys
    import traceback

    import torch

    request = json.loads(Path(request_path).read_text())
    _die_with_parent(request["parent_pid"])
    torch.set_num_threads(request["threads"])
    cfg = PipelineConfig(**request["config"])
    root = Path(cfg.output_dir)
    runner = _StageRunner(cfg, root, _stage_table(cfg, root)[0], request["stages"], watched=False)

    def rebalance() -> None:
        if (root / LANE_MAIN_DONE).exists() and torch.get_num_threads() != request["total_threads"]:
            torch.set_num_threads(request["total_threads"])

    runner.before_each = rebalance
    error = None
    for name in request["names"]:
        try:
            runner.run_one(name)
        except Exception as err:  # reported to the main process, which raises it after its own lane
            traceback.print_exc()
            error = {"stage": name, "message": f"{type(err).__name__}: {err}"}
            break
    atomic_write_json(root / LANE_RESULT, {"timings": runner.timings, "cpu_timings": runner.cpu_timings, "error": error})
    sys.exit(1 if error else 0)


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, the second lane gets SIGTERM when the pipeline process that started it dies (even by SIGKILL): a
    re-run must not find an orphaned lane still training into the same directories. Elsewhere it runs on, so stop
    it yourself before re-running."""
    import ctypes
    import signal
    import sys

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request took effect
        sys.exit(1)


def shaping_nus(cfg: PipelineConfig) -> list[float]:
    return [float(nu) for nu in _stage_settings(cfg, "shaping").get("nus") or SHAPING_NUS]


def policies_manifest(cfg: PipelineConfig, root: Path, stages: set[str]) -> dict[str, list[dict[str, Any]]]:
    """policies.json: every policy and value model that `stages` produce or the run directory already holds
    (paths relative to it; a consumer skips an entry whose files do not exist yet)."""
    def wanted(stage: str, entry: dict[str, Any], key: str = "model") -> bool:
        return stage in stages or (root / entry[key]).exists()

    candidates: list[tuple[str, dict[str, Any]]] = [
        ("sft", {"name": "sft", "kind": "sft", "model": "sft/model", "train_dir": "sft", "eval_dir": "eval/sft"})]
    for k in range(1, num_rounds(cfg) + 1):
        dirs = round_dirs(k)
        trained = root / dirs["ppo_lag"] / "config.yaml"  # the d a finished or running stage used, else the configured one
        threshold = float(yaml.safe_load(trained.read_text())["threshold"]) if trained.is_file() else round_threshold(cfg, k)
        candidates.append((round_stage(k, "ppo_lag"), {
            "name": f"safe_rlhf_r{k}", "kind": "safe_rlhf", "round": k, "threshold": threshold,
            "model": f"{dirs['ppo_lag']}/model", "train_dir": dirs["ppo_lag"], "eval_dir": dirs["eval"]}))
    candidates.append(("ppo", {"name": "ppo", "kind": "ppo", "model": "ppo/model", "train_dir": "ppo", "eval_dir": "eval/ppo"}))
    for nu in shaping_nus(cfg):
        candidates.append(("shaping", {
            "name": f"shaping_nu{nu:g}", "kind": "shaping", "nu": nu, "model": f"shaping/nu-{nu:g}/model",
            "train_dir": f"shaping/nu-{nu:g}", "eval_dir": f"eval/shaping/nu-{nu:g}"}))
    value_models = []
    for k in range(1, num_rounds(cfg) + 1):
        dirs = round_dirs(k)
        entry = {"round": k, "reward_model": f"{dirs['rm']}/model", "cost_model": f"{dirs['cm']}/model",
                 "scores_dir": dirs["scores"]}
        if wanted(round_stage(k, "rm"), entry, "reward_model") or wanted(round_stage(k, "cm"), entry, "cost_model"):
            value_models.append(entry)
    return {"policies": [entry for stage, entry in candidates if wanted(stage, entry)], "value_models": value_models}


SHAPING_NUS = [0.1, 1.0, 10.0]  # the pipeline's default ν sweep (small: stays harmful; large: over-refuses)

HEADLINE = {
    "rm": ["eval_accuracy", "gold_agreement"],
    "cm": ["eval_ranking_accuracy", "eval_sign_accuracy", "gold_sign_accuracy"],
    "eval_scores": ["reward_accuracy", "cost_sign_accuracy", "reward_margin_compliance_vs_refusal"],
    "ppo_lag": ["lagrange_multiplier", "episode_cost", "kl", "reward"],
    "ppo": ["kl", "reward"],
}
# The policy table: one row per evaluated policy, gold-judged on the test prompts.
POLICY_METRICS = ["harmful_rate", "harmful_rate_low", "harmful_rate_high", "helpfulness_benign", "helpfulness_harmful",
                  "over_refusal", "redirection_share"]  # _low/_high: the 95% Wilson interval of the harmful rate
# round{k}/<metric> in metrics.json: the same names for round 1 (evaluate_ppo_lag, ppo_lag) and later rounds.
ROUND_HEADLINE = {"evaluate": ["harmful_rate", "helpfulness_benign", "over_refusal", "redirection_share"],
                  "ppo_lag": ["lagrange_multiplier", "episode_cost"]}
# The rounds table: (column, step of round k, metric); the redteam step measures the policy entering round k.
ROUND_COLUMNS = [("d", None, "threshold"), ("harmful", "evaluate", "harmful_rate"),
                 ("helpful", "evaluate", "helpfulness_benign"), ("over-refusal", "evaluate", "over_refusal"),
                 ("λ", "ppo_lag", "lagrange_multiplier"), ("J_C", "ppo_lag", "episode_cost"),
                 ("new pairs", "redteam", "pairs"), ("red-team unsafe", "redteam", "redteam_unsafe_rate"),
                 ("RM gold", "rm", "gold_agreement"), ("CM gold sign", "cm", "gold_sign_accuracy")]


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


def _round_headlines(cfg: PipelineConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """round{k}/<metric> (ROUND_HEADLINE) and round{k}/threshold of every round whose results are in `summary`."""
    flat: dict[str, Any] = {}
    for k in range(1, num_rounds(cfg) + 1):
        for step, keys in ROUND_HEADLINE.items():
            flat.update({f"round{k}/{key}": summary[f"{round_stage(k, step)}/{key}"] for key in keys
                         if f"{round_stage(k, step)}/{key}" in summary})
        if f"{round_stage(k, 'ppo_lag')}/global_step" in summary:
            flat[f"round{k}/threshold"] = round_threshold(cfg, k)
    return flat


def _policy_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(policy name, metric prefix) of every evaluated policy in the summary, SFT first."""
    rows = [(name, f"evaluate_{name}/") for name in ("sft", "ppo", "ppo_lag")
            if f"evaluate_{name}/harmful_rate" in summary]
    later = sorted({int(key.split("/")[0].removeprefix("round")) for key in summary
                    if key.startswith("round") and key.endswith("/evaluate/harmful_rate")})
    rows += [(f"ppo_lag r{k}", f"round{k}/evaluate/") for k in later]
    nus = sorted({key.split("/")[1] for key in summary if key.startswith("evaluate_shaping/nu=")},
                 key=lambda s: float(s.removeprefix("nu=")))
    rows += [(f"shaping {nu}", f"evaluate_shaping/{nu}/") for nu in nus]
    return rows


def _format(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_rounds(summary: dict[str, Any], rounds: int) -> None:
    present = [k for k in range(1, rounds + 1) if f"round{k}/threshold" in summary or f"round{k}/harmful_rate" in summary]
    if not any(k > 1 for k in present):
        return
    table = Table(title="Safe RLHF rounds: harmful, helpful (benign), over-refusal by the gold judges on the test "
                        "prompts; red-team unsafe = the policy entering the round, by the previous round's cost model")
    table.add_column("round")
    for column, _, _ in ROUND_COLUMNS:
        table.add_column(column, justify="right")
    for k in present:
        def value(step: str | None, key: str) -> Any:
            return summary.get(f"round{k}/{key}" if step is None else f"{round_stage(k, step)}/{key}")
        table.add_row(str(k), *[_format(value(step, key)) for _, step, key in ROUND_COLUMNS])
    console.print(table)


def _print_summary(summary: dict[str, Any], rounds: int = 1) -> None:
    _print_rounds(summary, rounds)
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
