"""The run directory of `safealign pipeline`: its format, written and read here only.

    run_dir/
      config.yaml            the pipeline's resolved settings
      policies.json          the manifest: every policy and value model the run has (paths relative to run_dir)
      metrics.json           every stage's numbers, flat (`<stage>/<metric>`, `round{k}/<metric>`, `time_s/<stage>`)
      progress.json          the stage running now (or `finished_utc`)
      world/ sft/ rm/ cm/ ppo_lag/ ppo/ shaping/nu-{ν}/   stage outputs (each with its own config.yaml, metrics.json)
      round{k}/redteam/ round{k}/rm/ round{k}/cm/ round{k}/ppo_lag/   rounds k >= 2 (`round_dirs`)
      eval/<policy>/ eval/scores/ eval/round{k}/ eval/compare/        evaluations
      report.html report.md report.json

A policy entry names its model, training and evaluation directories; a value-model entry the reward and cost models
of one round and their `eval-scores` directory. A run directory without policies.json (an older single-round run) is
read from its fixed layout (`Manifest.source == "discovered"`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from safealign.config import ConfigError
from safealign.io import atomic_write_json

MANIFEST = "policies.json"
METRICS = "metrics.json"
PROGRESS = "progress.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a policy name is a directory name under eval/compare
RESERVED_NAMES = ("model_scores",)  # eval/compare/ keeps the model judges' score cache under this name


@dataclass(frozen=True)
class PolicyEntry:
    """One policy of a run directory; paths are relative to it."""

    name: str
    kind: str  # sft, safe_rlhf, ppo, shaping, ...
    model: str = ""
    train_dir: str = ""
    eval_dir: str = ""
    round: int | None = None  # Safe RLHF round (1, 2, ...)
    threshold: float | None = None  # Safe RLHF cost threshold d
    nu: float | None = None  # reward-shaping weight


@dataclass(frozen=True)
class ValueModelEntry:
    """The reward and cost models of one round, and their `eval-scores` directory; paths relative to the run."""

    round: int
    reward_model: str = ""
    cost_model: str = ""
    scores_dir: str = ""


@dataclass
class Manifest:
    policies: list[PolicyEntry]
    value_models: list[ValueModelEntry]
    source: str  # "policies.json", or "discovered" (a run directory without one: its fixed layout was read)


def round_dirs(k: int) -> dict[str, str]:
    """Where round k's outputs live, relative to the run directory (round 1: the pipeline's first stages)."""
    if k == 1:
        return {"rm": "rm", "cm": "cm", "ppo_lag": "ppo_lag", "eval": "eval/ppo_lag", "scores": "eval/scores"}
    r = f"round{k}"
    return {"redteam": f"{r}/redteam", "preferences": f"{r}/preferences.jsonl", "rm": f"{r}/rm", "cm": f"{r}/cm",
            "ppo_lag": f"{r}/ppo_lag", "eval": f"eval/{r}", "scores": f"eval/{r}/scores"}


def check_name(name: Any, source: str) -> str:
    """A policy (model) name: a plain directory name, not one the comparison reserves."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise ConfigError(f"{source}: model name {name!r} must be a plain directory name "
                          f"(letters, digits, _ . + -, not {', '.join(repr(n) for n in RESERVED_NAMES)})")
    return name


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def write_manifest(root: Path, manifest: Manifest) -> None:
    """policies.json: the entries' set fields, in order."""
    def entry(value: Any) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}

    atomic_write_json(root / MANIFEST, {"policies": [entry(p) for p in manifest.policies],
                                        "value_models": [entry(v) for v in manifest.value_models]})


def write_metrics(root: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(root / METRICS, metrics)


def write_progress(root: Path, stage: str | None, number: int, stages: int, **extra: Any) -> None:
    """progress.json: the stage running now (`stage` None: the run has finished)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(root / PROGRESS, {"stage": stage, "number": number, "stages": stages,
                                        "finished_utc" if stage is None else "started_utc": now, **extra})


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def read_json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or not valid JSON (a run still writing, or crashed)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(root: Path) -> dict[str, Any]:
    """The run's flat metrics.json ({} before the pipeline has finished once)."""
    return read_json_or_none(Path(root) / METRICS) or {}


def read_progress(root: Path) -> dict[str, Any] | None:
    return read_json_or_none(Path(root) / PROGRESS)


def _entry(cls: type, raw: Any, where: str, required: tuple[str, ...]) -> Any:
    """A manifest entry: known fields type-checked, unknown ones ignored (newer pipelines may add some)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object, got {raw!r}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw or raw[f.name] is None:
            if f.name in required:
                raise ConfigError(f"{where}: field '{f.name}' is required")
            continue
        value = raw[f.name]
        numeric = f.name in ("round", "threshold", "nu")
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: field '{f.name}': expected a number, got {value!r}")
        if not numeric and not isinstance(value, str):
            raise ConfigError(f"{where}: field '{f.name}': expected a string, got {value!r}")
        values[f.name] = int(value) if f.name == "round" else float(value) if numeric else value
    return cls(**values)


def _discover(run_dir: Path) -> Manifest:
    """The layout the single-round pipeline writes (sft, ppo_lag, ppo, shaping/nu-*, rm, cm), as a manifest."""
    threshold = None
    if (run_dir / "ppo_lag" / "config.yaml").is_file():
        threshold = (yaml.safe_load((run_dir / "ppo_lag" / "config.yaml").read_text()) or {}).get("threshold")
    candidates = [
        PolicyEntry("sft", "sft", "sft/model", "sft", "eval/sft"),
        PolicyEntry("safe_rlhf_r1", "safe_rlhf", "ppo_lag/model", "ppo_lag", "eval/ppo_lag", round=1, threshold=threshold),
        PolicyEntry("ppo", "ppo", "ppo/model", "ppo", "eval/ppo"),
    ]
    nus = {float(d.name.removeprefix("nu-")) for base in ("shaping", "eval/shaping")
           for d in (run_dir / base).glob("nu-*") if re.fullmatch(r"nu-[0-9.e+-]+", d.name)}
    candidates += [PolicyEntry(f"shaping_nu{nu:g}", "shaping", f"shaping/nu-{nu:g}/model", f"shaping/nu-{nu:g}",
                               f"eval/shaping/nu-{nu:g}", nu=nu) for nu in sorted(nus)]
    policies = [p for p in candidates if (run_dir / p.train_dir).exists() or (run_dir / p.eval_dir).exists()]
    value_models = [ValueModelEntry(1, "rm/model", "cm/model", "eval/scores")] if (
        (run_dir / "rm").exists() or (run_dir / "cm").exists()) else []
    return Manifest(policies, value_models, "discovered")


def load_manifest(run_dir: str | Path) -> Manifest:
    """`run_dir/policies.json` ({"policies": [...], "value_models": [...]}), or the discovered layout without one.

    Policy fields: name, kind, eval_dir (required), model, train_dir, round, threshold, nu; value-model
    fields: round, reward_model, cost_model, scores_dir. Errors name the file and the field.
    """
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        return _discover(run_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("policies"), list):
        raise ConfigError(f"{path}: expected an object with a 'policies' list")
    policies = [_entry(PolicyEntry, p, f"{path}: policies[{i}]", ("name", "kind", "eval_dir"))
                for i, p in enumerate(raw["policies"])]
    names = [p.name for p in policies]
    for i, name in enumerate(names):
        check_name(name, f"{path}: policies[{i}]: field 'name'")
        if name in names[:i]:
            raise ConfigError(f"{path}: policies[{i}]: field 'name': {name!r} appears twice")
    value_models = raw.get("value_models") or []
    if not isinstance(value_models, list):
        raise ConfigError(f"{path}: field 'value_models': expected a list")
    values = [_entry(ValueModelEntry, {"round": i + 1, **v} if isinstance(v, dict) else v,
                     f"{path}: value_models[{i}]", ("round",)) for i, v in enumerate(value_models)]
    return Manifest(policies, values, "policies.json")


def final_value_models(manifest: Manifest, run_dir: Path) -> ValueModelEntry | None:
    """The last round's value models that exist on disk (the best judges the run has), or None."""
    present = [v for v in manifest.value_models
               if (v.reward_model and (run_dir / v.reward_model).is_dir()) or (v.cost_model and (run_dir / v.cost_model).is_dir())]
    return max(present, key=lambda v: v.round) if present else None
