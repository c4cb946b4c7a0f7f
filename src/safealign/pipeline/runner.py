"""The main job: SafeWorld (or your data) -> SFT -> reward and cost models -> Safe RLHF (PPO-Lagrangian), the PPO and
reward-shaping baselines -> gold evaluation of every policy; then more Safe RLHF rounds with red-teaming (the paper
ran three). `safealign pipeline --config configs/pipeline.yaml`.

Every stage writes into one run directory (`safealign.run_directory` has its format) and is skipped when its done
file (`metrics.json`) exists, so a crashed or extended pipeline re-runs only what is missing; a training stage that
was interrupted continues from its newest checkpoint when its config is unchanged (`resume_interrupted`). Each stage
is one command of `safealign` run with its own config (`stages.plan`: the stage table; `stage_runner.py` runs one), so the pipeline adds no second
set of names: per-stage settings are mappings (`sft: {learning_rate: 1e-3}`) that the stage's config class reads.

Rounds. Round 1 is the `rm`, `cm`, `eval_scores`, `ppo_lag` and `evaluate_ppo_lag` stages. `rounds` stands for the
stages of rounds 2..`rounds`, each six stages (`stages.round_stages`):
    round{k}/redteam      gather the prompts the round k−1 policy answers unsafely (its cost model: cost > 0)
                          plus SafeWorld's red-team prompts, sample new pairs from that policy, annotate them
                          (SafeWorld's simulated crowdworkers), add them to all the pairs so far (`pipeline.redteam`)
    round{k}/rm, /cm      reward and cost models on all the pairs so far
    round{k}/eval_scores  those models on the held-out pairs
    round{k}/ppo_lag      Safe RLHF from the round k−1 policy with round k's models and threshold
    round{k}/evaluate     gold evaluation of that policy
Round k's reward and cost models start from round k−1's by default (`round_value_models: previous`), trained for a
fraction of an epoch (profile) on all the pairs so far; the paper retrained them from the SFT model (`sft`).

Two lanes (`parallel_baselines`): `lanes.py`. `policies.json` (written after every stage) lists every policy and value
model the stages produce (`manifest.py`); `progress.json` names the stage running now; `metrics.json`, written at the
end, every stage's numbers, flat (`summary.py`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from safealign.algorithms.lagrangian import NO_CATEGORY, require_a_categorised_prompt
from safealign.config import ConfigError, changed_settings, check_overrides, save_config
from safealign.console import quiet_steps, stderr_console
from safealign.data.loading import load_prompts
from safealign.pipeline.commands import COMMANDS
from safealign.pipeline.config import HOW_TO_RUN, PipelineConfig, num_rounds, stage_settings
from safealign.pipeline.lanes import BASELINE_LANE, LANE_HEAD, enough_threads, run_beside
from safealign.pipeline.manifest import policies_manifest
from safealign.pipeline.stage_runner import StageRunner
from safealign.pipeline.stages import ALWAYS_RUN, SETTINGS_COMMANDS, expand_stages

EVALUATIONS = ("evaluate-policy", "eval-scores", "bon")  # commands whose outputs only the comparison and the report read
from safealign.pipeline.summary import print_summary, summarise
from safealign.run_directory import write_manifest, write_metrics, write_progress

console = stderr_console()

__all__ = ["PipelineConfig", "check_config", "run"]


def check_config(cfg: PipelineConfig) -> list[str]:
    """The stages cfg runs (groups expanded); a ConfigError before anything runs when the settings cannot work:
    unknown stages, round settings that do not fit, a per-stage mapping with a key or value its stage rejects."""
    rounds = num_rounds(cfg)
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1 (or 0 for the profile's), got {cfg.rounds}")
    if cfg.round_thresholds and len(cfg.round_thresholds) != rounds:
        raise ConfigError(f"round_thresholds has {len(cfg.round_thresholds)} values for {rounds} rounds: give one per "
                          "round (round 1 first) or none")
    if not 0.0 <= cfg.round_threshold_quantile < 1.0 or (cfg.round_threshold_quantile and cfg.round_thresholds):
        raise ConfigError("round_threshold_quantile must be in [0, 1), and not given together with round_thresholds")
    if cfg.round_ptx_coeff < 0:
        raise ConfigError(f"round_ptx_coeff must be >= 0 (0 = no PTX term in rounds >= 2), got {cfg.round_ptx_coeff}")
    if cfg.first_round_ptx_coeff < 0:
        raise ConfigError(f"first_round_ptx_coeff must be >= 0 (0 = no PTX term in round 1), got {cfg.first_round_ptx_coeff}")
    for key, command in SETTINGS_COMMANDS.items():
        config_class, _ = COMMANDS[command].load()
        check_overrides(config_class, getattr(cfg, key), f"pipeline setting '{key}'")
    stages = expand_stages(cfg, Path(cfg.output_dir))
    later = [s for s in stages if s.startswith("round") and "/" in s]  # a stage of round k >= 2
    if later and cfg.preference_data and len(cfg.round_preference_data) < rounds - 1:
        raise ConfigError(
            f"rounds 2..{rounds} need annotations of their new pairs. On SafeWorld its simulated crowdworkers give "
            "them; with your own preference_data, annotate each round's pairs (e.g. sampled from the previous "
            f"round's policy) and list the PKU-format files in round_preference_data (one per round >= 2: "
            f"{rounds - 1} needed, {len(cfg.round_preference_data)} given), or set rounds: 1")
    _check_prompt_categories(cfg, stages)
    if cfg.parallel_baselines and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("parallel_baselines starts a second pipeline process: run the pipeline without accelerate "
                          "launch / torchrun, or set parallel_baselines: false")
    return stages


def _check_prompt_categories(cfg: PipelineConfig, stages: list[str]) -> None:
    """A loose d for the uncategorised prompts (configs/pipeline.yaml) needs categorised ones beside them: with your own
    RL prompts and none of them categorised, say so now rather than after SFT and the value models have trained."""
    ppo_lag = stage_settings(cfg, "ppo_lag")
    own_prompts = cfg.rl_prompts or cfg.preference_data
    if (not own_prompts or not any(s == "ppo_lag" or s.endswith("/ppo_lag") for s in stages)
            or not ppo_lag.get("constraint_per_category") or NO_CATEGORY not in ppo_lag.get("category_thresholds", {})
            or stage_settings(cfg, "cm").get("category_head")):
        return
    require_a_categorised_prompt(ppo_lag["category_thresholds"], load_prompts(own_prompts), own_prompts)


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


def run(cfg: PipelineConfig) -> dict[str, Any]:
    stages = check_config(cfg)
    quiet_steps()  # one progress bar per stage; every logged scalar still goes to TensorBoard and metrics
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _warn_if_settings_changed(cfg, root)
    save_config(cfg, root / "config.yaml")
    write_manifest(root, policies_manifest(cfg, root, set(stages)))
    runner = StageRunner(cfg, root, stages)
    table = {name: runner.stage(name) for name in stages}
    groups = {name: table[name].group or name for name in stages}
    head, baselines, tail = ([s for s in stages if groups[s] in names] for names in (LANE_HEAD, BASELINE_LANE, ALWAYS_RUN))
    # The second lane also takes the Safe RLHF rounds' evaluations, which no later round reads: the training chain
    # stays in this lane, and the second waits for a round's policy or value models where it must.
    evaluations = [s for s in stages if table[s].command in EVALUATIONS and s not in {*head, *baselines, *tail}]
    side = baselines + evaluations
    main = [s for s in stages if s not in {*head, *side, *tail}]
    both_lanes_busy = any(not runner.done(s) for s in side) and any(not runner.done(s) for s in main)
    def in_order(values: dict[str, Any]) -> dict[str, Any]:  # the lanes finish their stages out of order
        return {name: values[name] for name in stages if name in values}

    def write_summary() -> dict[str, Any]:
        summary = summarise(cfg, in_order(runner.results), in_order(runner.timings), in_order(runner.cpu_timings))
        write_metrics(root, summary)
        return summary

    if cfg.parallel_baselines and both_lanes_busy and enough_threads():
        runner.run_all(head)
        run_beside(runner, main=main, side=side)
    else:
        runner.run_all([s for s in stages if s not in tail])
    write_summary()  # the report reads every stage's time from it
    runner.run_all(tail)
    write_progress(root, None, len(stages), len(stages))
    summary = write_summary()
    print_summary(summary, num_rounds(cfg))
    if "report" in stages:
        console.print(f"report: {root / 'report.html'} (and report.md, report.json)", highlight=False)
    return summary
