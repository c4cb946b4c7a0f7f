"""The report's section on the whole family: every evaluated policy (SFT, Safe RLHF, PPO, the DPO family, best-of-n)
on one helpfulness–harmlessness plane, with its harmful-rate interval, over-refusal and the compute of its stage."""

from __future__ import annotations

from typing import Any

from safealign.evaluation.report.document import Column, FigureBlock, Section, TableBlock
from safealign.evaluation.report.figures import family_figure
from safealign.evaluation.report.reading import Run
from safealign.run_directory import METRICS, read_json_or_none

BASELINE_KINDS = ("sft", "safe_rlhf", "ppo")  # drawn beside the family for reference


def _stage_of(kind: str, name: str, round_: int | None) -> str:
    """The pipeline stage that made the policy (its time_s / cpu_time_s keys)."""
    if kind == "safe_rlhf":
        return "ppo_lag" if (round_ or 1) == 1 else f"round{round_}/ppo_lag"
    return name


def has_family(run: Run) -> bool:
    """Whether the run evaluated a method beyond the main job's (the section is left out of the report otherwise)."""
    return any(p.entry.kind not in (*BASELINE_KINDS, "shaping") for p in run.evaluated())


def family_section(run: Run) -> Section:
    section = Section("family", "The family side by side")
    evaluated = run.evaluated()
    times = read_json_or_none(run.root / METRICS) or {}
    points: list[dict[str, Any]] = []
    for p in evaluated:
        if p.entry.kind == "shaping" or p.metrics.get("harmful_rate") is None or p.metrics.get("helpfulness_benign") is None:
            continue
        stage = _stage_of(p.entry.kind, p.name, p.entry.round)
        points.append({"policy": p.name, "kind": p.entry.kind, **{k: p.metrics.get(k) for k in (
            "harmful_rate", "harmful_rate_low", "harmful_rate_high", "helpfulness_benign", "over_refusal")},
            "cpu_s": times.get(f"cpu_time_s/{stage}"), "wall_s": times.get(f"time_s/{stage}")})
    section.paragraphs.append(
        "Each policy on SafeWorld's test prompts, judged by the gold judges: the harmful rate's interval clusters the "
        "answers by prompt. Compute is the CPU (or GPU host) seconds of the stage that made the policy alone: SACPO's "
        "second step excludes the helpful DPO run it starts from, P-SACPO is a merge, best-of-n's is its sampling "
        "and scoring, Safe RLHF's excludes the reward and cost models (shared by C-DPO, MODPO and best-of-n).")
    if len(points) >= 2:
        section.blocks.append(FigureBlock("family.png", "Harmful rate vs helpfulness of every method", family_figure(points), points))
    section.blocks.append(TableBlock("Every method", [
        Column("policy"), Column("kind"), Column("harmful rate", "pct"), Column("low", "pct"), Column("high", "pct"),
        Column("helpfulness (benign)", "num"), Column("over-refusal", "pct"), Column("CPU s", "int"), Column("wall s", "int")],
        [[p["policy"], p["kind"], p["harmful_rate"], p["harmful_rate_low"], p["harmful_rate_high"], p["helpfulness_benign"],
          p["over_refusal"], p["cpu_s"], p["wall_s"]] for p in points]))
    return section
