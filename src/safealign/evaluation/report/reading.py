"""What the report reads of a run directory: its manifest's policies with their gold evaluations, the comparison,
and the RL runs' TensorBoard scalars. A partial run reads without error: what is missing or unreadable becomes None
and a note, and the report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safealign.run_directory import Manifest, PolicyEntry, load_manifest, read_json_or_none

COMPARISON = Path("eval") / "compare" / "comparison.json"


@dataclass
class Policy:
    entry: PolicyEntry
    metrics: dict[str, Any] | None  # eval_dir/metrics.json (gold evaluation)
    samples: Path | None  # eval_dir/samples.jsonl

    @property
    def name(self) -> str:
        return self.entry.name


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a report shows what it can read
    return rows


def read_scalars(log_dir: Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the TensorBoard event files in log_dir (all points, resumed runs included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    present = set(accumulator.Tags().get("scalars", []))
    return {tag: [(int(e.step), float(e.value)) for e in accumulator.Scalars(tag)] for tag in tags if tag in present}


@dataclass
class Run:
    root: Path
    manifest: Manifest
    policies: list[Policy]
    comparison: dict[str, Any] | None
    safeworld: bool

    def evaluated(self) -> list[Policy]:
        return [p for p in self.policies if p.metrics is not None]

    def of_kind(self, kind: str) -> list[Policy]:
        return [p for p in self.evaluated() if p.entry.kind == kind]

    def baseline(self) -> Policy | None:
        return next(iter(self.of_kind("sft") or self.evaluated()), None)

    def final_safe_rlhf(self) -> Policy | None:
        safe = self.of_kind("safe_rlhf")
        return max(reversed(safe), key=lambda p: p.entry.round or 0) if safe else None


def read_run(root: Path) -> tuple[Run, list[str]]:
    """The run directory as the report sees it, and notes on what of it is missing or unreadable."""
    manifest = load_manifest(root)
    notes = []
    if manifest.source == "discovered":
        notes.append("No policies.json in the run directory: the policies were found in the single-round layout "
                     "(sft, ppo_lag, ppo, shaping/nu-*).")
    policies = []
    for entry in manifest.policies:
        eval_dir = root / entry.eval_dir
        metrics = read_json_or_none(eval_dir / "metrics.json")
        samples = eval_dir / "samples.jsonl" if (eval_dir / "samples.jsonl").is_file() else None
        if metrics is None and (eval_dir / "metrics.json").is_file():
            notes.append(f"Policy {entry.name}: {entry.eval_dir}/metrics.json is unreadable (not valid JSON): left out of the "
                         "tables; delete it and re-run its evaluation.")
        elif metrics is None:
            notes.append(f"Policy {entry.name}: not evaluated yet ({entry.eval_dir}/metrics.json missing): left out of the tables.")
        policies.append(Policy(entry, metrics, samples))
    comparison = read_json_or_none(root / COMPARISON)
    safeworld = (root / "world").is_dir() or any((p.metrics or {}).get("harmful_rate") is not None for p in policies)
    return Run(root, manifest, policies, comparison, safeworld), notes

