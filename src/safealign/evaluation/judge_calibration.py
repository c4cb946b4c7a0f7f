"""`safealign calibrate-judge`: how far an LLM judge agrees with humans, and the threshold its scores need.

Human labels: PyRIT's scorer evaluations (`data.real_benchmarks.load_human_labels`: other models' answers, labelled by
people). Per task the judge answers one question (`questions`, defaults below) and its score is compared with the
label:
    objective  395  label 1 = the response achieved the (harmful) objective;  default question `complies`
    refusal    169  label 1 = the response refused;                          default question `refusal`
    harm      1005  label 1 = mean human harm score ≥ 0.5;                    default question `unsafe`
    hand-objective, hand-refusal: the same two labels on the policies' own answers, labelled by hand (`hand_labels`)
The items are split in two halves by `seed`; the threshold (the one maximising accuracy) is fitted on the first half
and its accuracy reported on the second, with a Wilson interval; AUROC (ties counted half) on the second half and on
all items, with a bootstrap interval over items. The string refusal matcher (`refusal_match`) is scored on the
refusal task beside the judge. Anything chosen by looking at scores (a question's wording, the threshold) is chosen on
the first half only.

Output (`output_dir`): calibration.json (the judge, the prompt version, per task the metrics and the threshold; give it
to `safealign judge --calibration`), scores/<task>-<question>.jsonl (one row per item as it is scored: a rerun of the
same command resumes after the last item written).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from safealign.config import ConfigError, config_field, save_config
from safealign.data.real_benchmarks import (
    HAND_LABEL_TASKS,
    HAND_LABELS,
    HUMAN_LABEL_TASKS,
    HumanLabel,
    load_hand_labels,
    load_human_labels,
)
from safealign.evaluation.gold import wilson_interval
from safealign.evaluation.llm_judge import PROMPT_VERSION, LLMJudge, make_backend, refusal_match
from safealign.io import atomic_write_json
from safealign.training.common import progress_bar

QUESTIONS = ("complies", "refusal", "unsafe")
DEFAULT_QUESTIONS = {"objective": "complies", "refusal": "refusal", "harm": "unsafe",
                     "hand-objective": "complies", "hand-refusal": "refusal"}
TASKS = HUMAN_LABEL_TASKS + HAND_LABEL_TASKS
CHUNK = 16  # items scored between two appends to the scores file


@dataclass
class JudgeCalibrationConfig:
    """Measure an LLM judge against PyRIT's human labels and fit its thresholds."""

    judge: str = config_field("llm:qwen2.5-coder-0.5b", help="The judge: llm:PATH (a local causal LM or a preset) or openai:MODEL ($OPENAI_BASE_URL, key from api_key_env).")
    tasks: list[str] = config_field(["objective", "refusal"], help="Which human labels: PyRIT's objective (395, harmful objective achieved), refusal (169), harm (1005, graded); hand-objective, hand-refusal (hand_labels: the policies' own answers).")
    hand_labels: str = config_field("", help="The hand-labelled answers of the hand-* tasks; '' = SmolLM2-135M-Instruct's, shipped with safealign.")
    questions: dict[str, str] = config_field({}, help="Per task, the judge's question (complies, refusal or unsafe); default objective: complies, refusal: refusal, harm: unsafe.")
    limit: int = config_field(0, help="Items per task (a seeded random subset); 0: all.")
    seed: int = config_field(0, help="Seed of the halves (threshold fitted on the first, reported on the second), the subset and the bootstrap.")
    output_dir: str = config_field("runs/judge-calibration", help="Where calibration.json and the per-item scores go.")
    batch_size: int = config_field(4, help="Judge inputs per forward pass (llm: backend).")
    dtype: str = config_field("float32", help="The local judge's dtype (float32 or bfloat16).")
    device: str = config_field("auto", help="The local judge's device (auto: the GPU when there is one).")
    max_response_chars: int = config_field(2000, help="Responses longer than this are cut before the judge reads them.")
    chain_of_thought: bool = config_field(False, help="The judge reasons before answering (slower; greedy, cot_tokens tokens).")
    cot_tokens: int = config_field(96, help="Tokens of reasoning with chain_of_thought.")
    bootstrap: int = config_field(1000, help="Bootstrap resamples of the AUROC interval.")
    api_key_env: str = config_field("OPENAI_API_KEY", help="The environment variable holding the openai: endpoint's key (never logged).")
    trust_remote_code: bool = config_field(False, help="Allow model code from the judge's directory.")

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"calibrate-judge: tasks {unknown or self.tasks}: choose from {list(TASKS)}")
        for task, question in self.questions.items():
            if task not in TASKS or question not in QUESTIONS:
                raise ConfigError(f"calibrate-judge: questions {{{task}: {question}}}: tasks are {list(TASKS)}, "
                                  f"questions {list(QUESTIONS)}")

    def question(self, task: str) -> str:
        return self.questions.get(task, DEFAULT_QUESTIONS[task])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """P(a positive's score > a negative's), ties counted half (Mann-Whitney U / (n+ n−)); None with one class only."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average rank within a run of ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t maximising the accuracy of `score ≥ t`: the midpoints between consecutive distinct scores and
    the two ends are tried; ties go to the threshold closest to 0.5."""
    values = np.unique(np.asarray(scores, dtype=np.float64))
    candidates = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-9]])
    labels = np.asarray(labels, dtype=bool)
    accuracies = np.array([np.mean((scores >= t) == labels) for t in candidates])
    best = np.flatnonzero(accuracies == accuracies.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def _accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    correct = int(np.sum((scores >= threshold) == labels))
    low, high = wilson_interval(correct, len(labels))
    return {"accuracy": correct / len(labels), "interval": [low, high], "n": len(labels)}


def _bootstrap_auroc(scores: np.ndarray, labels: np.ndarray, resamples: int, seed: int) -> list[float | None]:
    rng = np.random.default_rng(seed)
    values = [auroc(scores[i], labels[i]) for i in (rng.integers(0, len(scores), len(scores)) for _ in range(resamples))]
    values = [v for v in values if v is not None]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))] if values else [None, None]


def task_metrics(scores: np.ndarray, labels: np.ndarray, first_half: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    """Threshold fitted on `first_half` (a boolean mask), accuracy and AUROC reported on the rest; AUROC on all."""
    second = ~first_half
    threshold = fit_threshold(scores[first_half], labels[first_half])
    return {
        "n": int(len(labels)), "positives": int(labels.sum()),
        "auroc": auroc(scores, labels), "auroc_interval": _bootstrap_auroc(scores, labels, resamples, seed),
        "auroc_second_half": auroc(scores[second], labels[second]),
        "threshold": threshold,  # fitted on the first half
        "second_half": _accuracy(scores[second], labels[second], threshold),
        "second_half_at_0.5": _accuracy(scores[second], labels[second], 0.5),
        "mean_score_positive": float(scores[labels].mean()) if labels.any() else None,
        "mean_score_negative": float(scores[~labels].mean()) if (~labels).any() else None,
    }


def _read_scores(path: Path) -> dict[str, float]:
    """The scores written so far; a line cut by a crash (and anything after it) is cut off the file, to be scored again."""
    if not path.is_file():
        return {}
    scores, kept = {}, 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if not line.endswith("\n"):
                raise ValueError("no newline: the write was cut")
            row = json.loads(line)
            scores[row["source"]] = float(row["score"])
        except (ValueError, KeyError, TypeError):
            break
        kept += len(line.encode("utf-8"))
    with path.open("r+b") as handle:
        handle.truncate(kept)
    return scores


def score_items(judge: LLMJudge, question: str, items: list[HumanLabel], path: Path, description: str) -> np.ndarray:
    """The judge's score of every item, appended to `path` CHUNK items at a time (fsynced), so that a crash loses at
    most one chunk and a rerun scores only what is missing."""
    done = _read_scores(path)
    todo = [item for item in items if item.source not in done]
    ask = {"unsafe": judge.unsafe_probability, "refusal": judge.refusal_probability,
           "complies": lambda p, r: 1.0 - judge.refusal_probability(p, r)}[question]
    path.parent.mkdir(parents=True, exist_ok=True)
    with progress_bar() as bar, path.open("a", encoding="utf-8") as out:
        task = bar.add_task(description, total=len(items), completed=len(items) - len(todo), info=question)
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            values = ask([i.objective for i in chunk], [i.response for i in chunk])
            for item, value in zip(chunk, values):
                done[item.source] = float(value)
                out.write(json.dumps({"source": item.source, "score": float(value), "label": item.label}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.advance(task, len(chunk))
    return np.array([done[item.source] for item in items])


def run(cfg: JudgeCalibrationConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    backend = make_backend(cfg.judge, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device,
                           trust_remote_code=cfg.trust_remote_code, api_key_env=cfg.api_key_env)
    judge = LLMJudge(backend, chain_of_thought=cfg.chain_of_thought, cot_tokens=cfg.cot_tokens,
                     max_response_chars=cfg.max_response_chars)
    tasks: dict[str, Any] = {}
    for task in cfg.tasks:
        if task in HAND_LABEL_TASKS:
            items = load_hand_labels(task, cfg.hand_labels or HAND_LABELS)
        else:
            items = load_human_labels(task)  # type: ignore[arg-type]
        rng = random.Random(f"{cfg.seed}:{task}")
        order = list(range(len(items)))
        rng.shuffle(order)
        if cfg.limit:
            order = order[:cfg.limit]
        items = [items[i] for i in order]
        first_half = np.arange(len(items)) < (len(items) + 1) // 2  # the shuffled order's first half
        question = cfg.question(task)
        scores = score_items(judge, question, items, out / "scores" / f"{task}-{question}.jsonl", f"judging {task}")
        labels = np.array([item.label >= 0.5 for item in items])
        metrics = task_metrics(scores, labels, first_half, cfg.bootstrap, cfg.seed)
        metrics["question"] = question
        if task in ("refusal", "hand-refusal"):
            matched = np.array([refusal_match(item.response) for item in items], dtype=np.float64)
            metrics["string_match"] = {"all": _accuracy(matched, labels, 0.5),
                                       "second_half": _accuracy(matched[~first_half], labels[~first_half], 0.5)}
        tasks[task] = metrics
    summary = {"judge": cfg.judge, "backend": backend.description, "prompt_version": PROMPT_VERSION,
               "chain_of_thought": cfg.chain_of_thought, "max_response_chars": cfg.max_response_chars,
               "hard_label_calls": backend.hard_label_calls, "human_labels": {t: "PyRIT 1.1.0 scorer_evals" if t in HUMAN_LABEL_TASKS else cfg.hand_labels or HAND_LABELS.name
                                 for t in cfg.tasks},
               "seed": cfg.seed, "tasks": tasks,
               "thresholds": {task: m["threshold"] for task, m in tasks.items()}}
    if getattr(backend, "mass_on_options", None):
        summary["mean_mass_on_options"] = float(np.mean(backend.mass_on_options))
    atomic_write_json(out / "calibration.json", summary)
    return summary


@dataclass
class JudgeCalibration:
    """A calibration.json as `safealign judge` and evaluations use it."""

    judge: str
    prompt_version: int
    thresholds: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)  # per task: question, AUROC, second-half accuracy

    @classmethod
    def load(cls, path: str | Path, judge: str) -> "JudgeCalibration":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("judge") != judge:
            raise ConfigError(f"{path}: a calibration of judge {raw.get('judge')!r}, not {judge!r}")
        if raw.get("prompt_version") != PROMPT_VERSION:
            raise ConfigError(f"{path}: calibrated with prompt version {raw.get('prompt_version')}, the judge now asks "
                              f"version {PROMPT_VERSION}: calibrate again")
        agreement = {task: {"question": m["question"], "auroc": m["auroc"],
                            "accuracy": m["second_half"]["accuracy"], "n": m["n"]} for task, m in raw["tasks"].items()}
        return cls(judge, raw["prompt_version"], dict(raw.get("thresholds", {})), agreement)

    def task_for(self, label: str) -> str | None:
        """The calibrated task of a label kind (objective, refusal): PyRIT's, else the hand-labelled one, else None."""
        return next((task for task in (label, f"hand-{label}") if task in self.thresholds), None)

    def threshold(self, label: str) -> float:
        task = self.task_for(label)
        return self.thresholds[task] if task else 0.5

    def question(self, label: str, default: str) -> str:
        task = self.task_for(label)
        return self.agreement[task]["question"] if task in self.agreement else default
