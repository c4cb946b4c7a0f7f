"""The report of a run directory: `report.html` (self-contained), `report.md` (+ `report/*.png`), `report.json`.

    safealign report --run_dir runs/demo          # the pipeline's last stage calls build_report(run_dir)

It reads what the stages wrote, through the run directory's manifest (`policies.json`, see
`run_directory.load_manifest`): each policy's gold evaluation (`eval_dir/metrics.json`, `samples.jsonl`), the
comparison (`eval/compare/comparison.json`: Elo, win rates, arena, per-sample reward and cost), the value
models' `eval-scores` directories and the RL runs' TensorBoard logs (`reading`). Sections (`sections`; 5 and 6 in
`training`):
1. what the numbers are (SafeWorld is a simulation; its judges are hidden rule-based programs);
2. the policy table (harmful rate, helpfulness, over-refusal, redirection share, distinct-n);
3. the Elo plane (helpfulness vs harmlessness Elo, SFT = 1000, bootstrap intervals), win rates, arena;
4. harmful rate per round and per harm category;
5. value models: accuracy per round, score distributions, each round's models against gold on the policies' own
   answers (table and reward-vs-cost scatter), and reward / cost of every policy's samples;
6. RL training curves: λ, episode cost J_C, reward, cost, KL;
7. the reward-shaping frontier (harmful rate vs helpfulness per ν) with the Safe RLHF point(s);
8. sample responses of every policy to the same prompts (harmful, benign, borderline).
A piece that does not exist yet (a stage not run) makes its section say so; nothing here raises on a
partial run. All three files come from one in-memory report (`document`), so the HTML, the Markdown and the JSON
show the same numbers: every table cell is formatted by `format_value` from the value report.json holds.
Figures are drawn in `figures`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safealign.config import ConfigError, config_field
from safealign.evaluation.report.document import write_report
from safealign.evaluation.report.reading import COMPARISON, read_run
from safealign.evaluation.report.sections import report_sections


@dataclass
class ReportConfig:
    run_dir: str = config_field("runs/demo", help="Run directory of `safealign pipeline` (with policies.json, or its fixed layout).")
    samples_per_kind: int = config_field(3, help="Prompts shown side by side per prompt kind (harmful, benign, borderline).")


def build_report(run_dir: str | Path, samples_per_kind: int = 3) -> dict[str, Any]:
    """Write run_dir/report.html, report.md (+ run_dir/report/*.png) and report.json; return report.json's content."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"report: run directory not found: {root}")
    run, notes = read_run(root)
    sections = report_sections(run, notes, samples_per_kind)
    title = f"safealign report: {root.resolve().name}" + (" (SafeWorld, a simulation)" if run.safeworld else "")
    return write_report(root, "report", title, sections, {
        "run_dir": str(root), "safeworld": run.safeworld, "manifest": run.manifest.source,
        "comparison": str(root / COMPARISON) if run.comparison is not None else None})


def run(cfg: ReportConfig) -> dict[str, Any]:
    """`safealign report`: build the report; returns where it is and what is missing."""
    if cfg.samples_per_kind < 0:
        raise ConfigError(f"report: samples_per_kind must be >= 0, got {cfg.samples_per_kind}")
    report = build_report(Path(cfg.run_dir), cfg.samples_per_kind)
    root = Path(cfg.run_dir)
    return {"report_html": str(root / "report.html"), "report_md": str(root / "report.md"),
            "report_json": str(root / "report.json"),
            "figures": sum(b["type"] == "figure" for s in report["sections"] for b in s["blocks"]),
            "notes": report["notes"]}
