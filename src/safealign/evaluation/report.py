"""The report of a run directory: `report.html` (self-contained), `report.md` (+ `report/*.png`), `report.json`.

    safealign report --run_dir runs/demo          # the pipeline's last stage calls build_report(run_dir)

It reads what the stages wrote, through the run directory's manifest (`policies.json`, see
`compare.load_manifest`): each policy's gold evaluation (`eval_dir/metrics.json`, `samples.jsonl`), the
comparison (`eval/compare/comparison.json`: Elo, win rates, arena, per-sample reward and cost), the value
models' `eval-scores` directories and the RL runs' TensorBoard logs. Sections:
1. what the numbers are (SafeWorld is a simulation; its judges are hidden rule-based programs);
2. the policy table (harmful rate, helpfulness, over-refusal, redirection share, distinct-n);
3. the Elo plane (helpfulness vs harmlessness Elo, SFT = 1000, bootstrap intervals), win rates, arena;
4. harmful rate per round and per harm category;
5. value models: score distributions per round, and reward / cost of SFT vs final Safe RLHF samples;
6. RL training curves: λ, episode cost J_C, reward, cost, KL;
7. the reward-shaping frontier (harmful rate vs helpfulness per ν) with the Safe RLHF point(s);
8. sample responses of every policy to the same prompts (harmful, benign, borderline).
A piece that does not exist yet (a stage not run) makes its section say so; nothing here raises on a
partial run. All three files come from one in-memory report, so the HTML, the Markdown and the JSON show
the same numbers: every table cell is formatted by `format_value` from the value report.json holds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from safealign.config import ConfigError, config_field
from safealign.evaluation.compare import Manifest, PolicyEntry, load_manifest
from safealign.io import atomic_path, atomic_write_json, atomic_write_text

COMPARISON = Path("eval") / "compare" / "comparison.json"
SCORE_FIGURES = ("reward_distribution.png", "cost_distribution.png", "reward_vs_cost.png")  # from `eval-scores`
# RL scalars (rl_loop logs every one as train/<name>) and what the report calls them.
CURVES = {"lagrange_multiplier": "λ (Lagrange multiplier)", "episode_cost": "episode cost J_C",
          "reward": "reward", "cost": "cost", "kl": "KL(π‖π_ref)"}

SIMULATION_STATEMENT = (
    "SafeWorld is a simulation. The prompts, the crowdworkers who labelled the preference pairs and the "
    "judges who scored these policies are programs. The gold judges are hidden, rule-based readers of the "
    "response text: they decide helpfulness and harm from the moves a response makes (helpful steps, "
    "refusal, safe redirection, harmful compliance, filler), and no policy or value model ever saw them "
    "during training. Every number in this report is the simulation's measurement, not a human judgement: "
    "it shows whether the algorithms move a policy where their objectives say, in a world where harm and "
    "helpfulness are defined exactly, and it says nothing about real language, real harm or real people."
)
NO_GOLD_STATEMENT = (
    "These policies were not judged by SafeWorld's gold judges (the prompts carry no SafeWorld kind). "
    "The model-judge numbers come from the reward and cost models, the same models the RL stages optimised "
    "against, so they measure agreement with the training signal, not an independent judgement."
)


@dataclass
class ReportConfig:
    run_dir: str = config_field("runs/demo", help="Run directory of `safealign pipeline` (with policies.json, or its fixed layout).")
    samples_per_kind: int = config_field(3, help="Prompts shown side by side per prompt kind (harmful, benign, borderline).")


# --------------------------------------------------------------------------------------------------
# The report in memory: sections of paragraphs, notes, tables and figures
# --------------------------------------------------------------------------------------------------
@dataclass
class Column:
    name: str
    style: str = "text"  # text, pct (a rate shown as %), num (3 decimals), elo (integer points), int


@dataclass
class TableBlock:
    title: str
    columns: list[Column]
    rows: list[list[Any]]


@dataclass
class FigureBlock:
    name: str  # file name under report/
    caption: str
    png: bytes
    data: Any  # the numbers drawn, for report.json


@dataclass
class Section:
    key: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is missing, and why
    blocks: list[TableBlock | FigureBlock] = field(default_factory=list)


def format_value(value: Any, style: str) -> str:
    """How a table cell is shown (HTML and Markdown alike); None / NaN: 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if style == "pct":
        return f"{100 * value:.1f}%"
    if style == "num":
        return f"{value:.3f}"
    if style == "elo":
        return f"{value:.0f}"
    if style == "int":
        return str(int(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------------------
@dataclass
class Policy:
    entry: PolicyEntry
    metrics: dict[str, Any] | None  # eval_dir/metrics.json (gold evaluation)
    samples: Path | None  # eval_dir/samples.jsonl

    @property
    def name(self) -> str:
        return self.entry.name


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _label(policy: Policy) -> str:
    return policy.name


def elo_plane_figure(elo: dict[str, dict[str, dict[str, float]]], baseline: str, judge: str) -> bytes:
    """Helpfulness Elo (x) vs harmlessness Elo (y) per model with bootstrap intervals, as the paper's figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    helpful, harmless = elo["helpfulness"], elo["harmlessness"]
    for name in helpful:
        x, y = helpful[name], harmless[name]
        ax.errorbar(x["rating"], y["rating"], xerr=[[x["rating"] - x["low"]], [x["high"] - x["rating"]]],
                    yerr=[[y["rating"] - y["low"]], [y["high"] - y["rating"]]], fmt="o", capsize=3, label=name)
        ax.annotate(name, (x["rating"], y["rating"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axvline(1000, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(1000, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title(f"Elo plane ({judge} judge; {baseline} = 1000)")
    ax.legend(fontsize=7)  # models at one point overlap their labels; the colours still tell them apart
    return figure_png(fig)


def per_round_figure(rows: list[dict[str, Any]]) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.4))
    rounds = [r["round"] for r in rows]
    for ax, (key, title) in zip(axes, (("harmful_rate", "harmful rate (harmful prompts)"),
                                       ("helpfulness_benign", "helpfulness (benign)"),
                                       ("over_refusal", "over-refusal (borderline)"))):
        values = [math.nan if r[key] is None else r[key] for r in rows]
        ax.plot(rounds, values, marker="o")
        if all(r.get(f"{key}_low") is not None and r.get(f"{key}_high") is not None for r in rows):
            ax.fill_between(rounds, [r[f"{key}_low"] for r in rows], [r[f"{key}_high"] for r in rows], alpha=0.2,
                            label="95% interval")
            ax.legend(fontsize=7)
        ax.set_xticks(sorted(set(rounds)))
        ax.set_xlabel("round (0 = SFT)")
        ax.set_title(title)
    return figure_png(fig)


def category_figure(categories: list[str], policies: list[str], values: list[list[float | None]]) -> bytes:
    """Heatmap: harmful rate per harm category (rows) and policy (columns)."""
    plt = pyplot()
    import numpy as np

    grid = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)  # size = (C, P)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(policies), 1.2 + 0.38 * len(categories)))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(categories)), categories, fontsize=7)
    for i in range(len(categories)):
        for j in range(len(policies)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="harmful rate")
    ax.set_title("harmful rate per harm category (%)")
    return figure_png(fig)


def histogram_figure(scores: dict[str, dict[str, list[float]]]) -> tuple[bytes, dict[str, Any]]:
    """Reward and cost histograms of each policy's samples (shared bins); returns the PNG and the bin counts."""
    plt = pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.6))
    data: dict[str, Any] = {}
    for ax, kind in zip(axes, ("reward", "cost")):
        streams = {name: s[kind] for name, s in scores.items() if s.get(kind)}
        if not streams:
            ax.set_visible(False)
            continue
        everything = np.concatenate([np.asarray(v, dtype=float) for v in streams.values()])
        edges = np.histogram_bin_edges(everything, bins=30)
        data[kind] = {"bin_edges": edges.tolist()}
        for name, values in streams.items():
            counts, _ = np.histogram(values, bins=edges)
            data[kind][name] = {"counts": counts.tolist(), "mean": float(np.mean(values))}
            ax.hist(values, bins=edges, alpha=0.55, label=f"{name} (mean {np.mean(values):.2f})")
        if kind == "cost":
            ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"{kind} model score")
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
    return figure_png(fig), data


def curves_figure(series: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(11.0, 6.0))
    flat = axes.ravel()
    for ax, (tag, title) in zip(flat, CURVES.items()):
        for run_name, scalars in series.items():
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, label=run_name)
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
    flat[-1].set_visible(False)
    return figure_png(fig)


def frontier_figure(points: list[dict[str, Any]]) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    shaping = sorted((p for p in points if p["kind"] == "shaping"), key=lambda p: p["nu"] or 0.0)
    if shaping:
        ax.plot([p["helpfulness_benign"] for p in shaping], [p["harmful_rate"] for p in shaping], "o-",
                color="tab:blue", label="reward shaping (ν sweep)")
        for p in shaping:
            ax.annotate(f"ν={p['nu']:g}", (p["helpfulness_benign"], p["harmful_rate"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    styles = {"safe_rlhf": ("*", "tab:red", 180), "sft": ("s", "grey", 60), "ppo": ("^", "tab:orange", 70)}
    for p in points:
        if p["kind"] in styles:
            marker, colour, size = styles[p["kind"]]
            ax.scatter(p["helpfulness_benign"], p["harmful_rate"], marker=marker, color=colour, s=size, zorder=3)
            ax.annotate(p["policy"], (p["helpfulness_benign"], p["harmful_rate"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=8)
    ax.set_xlabel("helpfulness on benign prompts (gold)")
    ax.set_ylabel("harmful rate on harmful prompts (gold)")
    ax.set_title("reward-shaping frontier and Safe RLHF (lower right is better)")
    if shaping:
        ax.legend(fontsize=8)
    return figure_png(fig)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def _about(run: Run, notes: list[str]) -> Section:
    section = Section("about", "What this report shows")
    section.paragraphs.append(SIMULATION_STATEMENT if run.safeworld else NO_GOLD_STATEMENT)
    section.paragraphs.append(
        f"Run directory: {run.root}. Policies come from "
        f"{'its manifest (policies.json)' if run.manifest.source == 'policies.json' else 'its fixed single-round layout'}. "
        "Responses are sampled (temperature 1), so every rate is a property of the policy's distribution.")
    rows = []
    for p in run.policies:
        e = p.entry
        status = "evaluated" if p.metrics is not None else "trained, not evaluated" if (
            e.model and (run.root / e.model).exists()) else "missing"
        rows.append([e.name, e.kind, e.round, e.threshold, e.nu, e.model or None, status])
    section.blocks.append(TableBlock("Policies of this run", [
        Column("policy"), Column("kind"), Column("round", "int"), Column("threshold d", "num"), Column("ν", "num"),
        Column("model"), Column("status")], rows))
    section.notes.extend(notes)
    if not run.policies:
        section.notes.append("No policy was found in this run directory.")
    return section


POLICY_COLUMNS = [("harmful_rate", "harmful rate (harmful prompts)", "pct"),
                  ("harmful_rate_low", "95% low", "pct"), ("harmful_rate_high", "95% high", "pct"),
                  ("helpfulness_benign", "helpfulness (benign)", "num"),
                  ("helpfulness_harmful", "helpfulness (harmful)", "num"),
                  ("over_refusal", "over-refusal (borderline)", "pct"),
                  ("over_refusal_low", "95% low", "pct"), ("over_refusal_high", "95% high", "pct"),
                  ("redirection_share", "redirections / (redirections + refusals)", "pct"),
                  ("distinct_1", "distinct-1", "num"), ("distinct_2", "distinct-2", "num"),
                  ("mean_response_tokens", "mean tokens", "num"), ("num_prompts", "prompts", "int"),
                  ("num_responses", "responses", "int")]
MODEL_JUDGE_COLUMNS = [("mean_reward", "mean reward", "num"), ("mean_cost", "mean cost", "num"),
                       ("cost_positive_rate", "cost > 0 (all prompts)", "pct"),
                       ("cost_positive_rate_harmful", "cost > 0 (harmful prompts)", "pct")]


def _policies(run: Run) -> Section:
    section = Section("policies", "Policies")
    evaluated = run.evaluated()
    if not evaluated:
        section.notes.append("No policy has a gold evaluation yet (eval_dir/metrics.json).")
        return section
    answers = " or ".join(f"{k:g}" for k in sorted({_answers_per_prompt(p.metrics) for p in evaluated}))
    section.paragraphs.append(
        f"Each policy answered every evaluation prompt with {answers} sampled response(s) (responses column: all of "
        "them). Harmful rate: share of the answers to harmful prompts that are unsafe; helpfulness: the gold judge's "
        "score; over-refusal: share of the answers to borderline (benign but harmful-looking) prompts that refuse; "
        "redirection share: on harmful prompts, safe redirections among redirections and bare refusals; distinct-n: "
        "unique word n-grams over all n-grams (low = mode collapse). 95% low / high: the Wilson score interval of the "
        "rate before them, a prompt's answers counted as one cluster: the sampling noise of the measurement, so two "
        "policies whose intervals overlap widely are not shown to differ.")
    columns = [c for c in POLICY_COLUMNS if any(p.metrics.get(c[0]) is not None for p in evaluated)]
    section.blocks.append(TableBlock("Gold judges" if run.safeworld else "Responses (no gold judges)", [
        Column("policy"), Column("kind")] + [Column(title, style) for _, title, style in columns],
        [[p.name, p.entry.kind] + [p.metrics.get(key) for key, _, _ in columns] for p in evaluated]))
    judged = (run.comparison or {}).get("policies", {})
    columns = [c for c in MODEL_JUDGE_COLUMNS if any(c[0] in m for m in judged.values())]
    if columns:
        section.blocks.append(TableBlock("Model judges (reward and cost models of the last round, on the compared prompts)",
                                         [Column("policy")] + [Column(title, style) for _, title, style in columns],
                                         [[name] + [m.get(key) for key, _, _ in columns] for name, m in judged.items()]))
    elif run.comparison is None:
        section.notes.append("No model-judge numbers: the compare stage has not written eval/compare/comparison.json.")
    return section


def _answers_per_prompt(numbers: dict[str, Any]) -> float:
    """Sampled answers per prompt of an evaluation's or a comparison's numbers (1 for those written before
    `num_responses` existed)."""
    prompts = numbers.get("num_prompts") or 0
    return numbers.get("num_responses", prompts) / prompts if prompts else 1.0


def _elo(run: Run) -> Section:
    section = Section("elo", "Elo ratings, win rates and the arena")
    comparison = run.comparison
    if comparison is None:
        section.notes.append("The compare stage has not run (no eval/compare/comparison.json): no Elo, win rates or arena.")
        return section
    missing = [p.name for p in run.evaluated() if p.name not in comparison.get("models", [])]
    if missing:
        section.notes.append(f"Evaluated after the last comparison, so not in it: {', '.join(missing)} (re-run the compare stage).")
    baseline = comparison["baseline"]
    per_prompt = _answers_per_prompt(comparison)
    samples = f" ({per_prompt:g} sampled responses each, sample j against sample j)" if per_prompt > 1 else ""
    section.paragraphs.append(
        f"Every pair of models is compared on each of the {comparison['num_prompts']} shared prompts{samples}; a Bradley-Terry "
        f"model fitted to the outcomes gives ratings on the 400-point Elo scale with {baseline} at 1000 and "
        f"{100 * comparison['ci']:.0f}% bootstrap intervals ({comparison['n_bootstrap']} resamples). Helpfulness: the more "
        "helpful response wins. Harmlessness: a safe response beats an unsafe one, two safe ones tie, and between two "
        "unsafe ones the less severe wins. Ties count half.")
    judge_names = {"gold": "SafeWorld gold judges", "model": "reward model (helpfulness) and cost model (harmlessness)"}
    for judge, axes in comparison.get("elo", {}).items():
        if set(axes) >= {"helpfulness", "harmlessness"}:
            section.blocks.append(FigureBlock(f"elo_plane_{judge}.png", f"Elo plane, judged by the {judge_names.get(judge, judge)}",
                                              elo_plane_figure(axes, baseline, judge), axes))
        columns, names = [Column("model")], comparison["models"]
        for axis in axes:
            columns += [Column(f"{axis} Elo", "elo"), Column("low", "elo"), Column("high", "elo")]
        rows = [[name] + [axes[axis][name][k] for axis in axes for k in ("rating", "low", "high")] for name in names]
        section.blocks.append(TableBlock(f"Elo, {judge_names.get(judge, judge)}", columns, rows))
    if not comparison.get("elo"):
        section.notes.append("Fewer than two models were compared: no Elo ratings.")
    for judge, axes in comparison.get("win_rates", {}).items():
        for axis, matrix in axes.items():
            names = list(matrix)
            section.blocks.append(TableBlock(
                f"Win rate of the row model against the column model, {axis}, {judge} judge",
                [Column("model")] + [Column(f"vs {n}", "pct") for n in names],
                [[a] + [matrix[a][b] if a != b else None for b in names] for a in names]))
    arena = comparison.get("arena", {})
    if arena:
        cells = [("better_and_safe", "better & safe"), ("better_but_unsafe", "better & unsafe"),
                 ("worse_but_safe", "worse & safe"), ("worse_and_unsafe", "worse & unsafe")]
        section.blocks.append(TableBlock(
            f"Arena vs {baseline} (reward and cost models; better: higher reward than {baseline}'s response to the "
            "same prompt; safe: cost ≤ 0)",
            [Column("model")] + [Column(title, "pct") for _, title in cells] + [
                Column("mean reward", "num"), Column("mean cost", "num"), Column("safe rate", "pct"),
                Column(f"{baseline} safe rate", "pct")],
            [[name] + [t[key] for key, _ in cells] + [t["mean_reward_a"], t["mean_cost_a"], t["safe_rate_a"], t["safe_rate_b"]]
             for name, t in arena.items()]))
    elif not (comparison.get("model_judges") or {}).get("cost"):
        section.notes.append("No arena table: the comparison had no reward and cost models as judges.")
    return section


def _harm(run: Run) -> Section:
    section = Section("harm", "Harmful rate per round and per harm category")
    if not run.safeworld:
        section.notes.append("No gold judges in this run: harmful rates are not measured.")
        return section
    baseline = next(iter(run.of_kind("sft")), None)
    rounds = ([(0, baseline)] if baseline else []) + sorted(
        ((p.entry.round or 1, p) for p in run.of_kind("safe_rlhf")), key=lambda rp: rp[0])
    keys = ("harmful_rate", "harmful_rate_low", "harmful_rate_high", "helpfulness_benign", "over_refusal",
            "over_refusal_low", "over_refusal_high", "redirection_share")  # per_round_figure bands both rates
    if len(rounds) >= 1:
        rows = [{"round": r, "policy": p.name, **{k: p.metrics.get(k) for k in keys}} for r, p in rounds]
        section.blocks.append(TableBlock("Per round (round 0 = SFT; round k = Safe RLHF after k rounds)", [
            Column("round", "int"), Column("policy"), Column("harmful rate", "pct"), Column("95% low", "pct"),
            Column("95% high", "pct"), Column("helpfulness (benign)", "num"),
            Column("over-refusal", "pct"), Column("95% low", "pct"), Column("95% high", "pct"),
            Column("redirection share", "pct")],
            [[r["round"], r["policy"]] + [r[k] for k in keys] for r in rows]))
        if len(rows) >= 2:
            section.blocks.append(FigureBlock("per_round.png", "Harmful rate, helpfulness and over-refusal per round",
                                              per_round_figure(rows), rows))
    if not run.of_kind("safe_rlhf"):
        section.notes.append("No Safe RLHF policy has been evaluated yet: no rounds to show.")
    evaluated = [p for p in run.evaluated() if any(k.startswith("harmful_rate/") for k in p.metrics)]
    categories = sorted({k.removeprefix("harmful_rate/") for p in evaluated for k in p.metrics if k.startswith("harmful_rate/")})
    if categories:
        values = [[p.metrics.get(f"harmful_rate/{c}") for p in evaluated] for c in categories]
        names = [p.name for p in evaluated]
        section.blocks.append(TableBlock("Harmful rate per harm category (harmful prompts of that category)",
                                         [Column("category")] + [Column(n, "pct") for n in names],
                                         [[c] + row for c, row in zip(categories, values)]))
        section.blocks.append(FigureBlock("harm_categories.png", "Harmful rate per harm category and policy",
                                          category_figure(categories, names, values),
                                          {"categories": categories, "policies": names, "harmful_rate": values}))
    return section


VALUE_METRICS = [("reward_accuracy", "reward accuracy (labels)", "pct"), ("gold_agreement", "reward vs gold order", "pct"),
                 ("cost_ranking_accuracy", "cost ranking accuracy", "pct"), ("cost_sign_accuracy", "cost sign accuracy", "pct"),
                 ("gold_sign_accuracy", "cost sign vs gold safety", "pct"),
                 ("reward_margin_compliance_vs_refusal", "reward margin: compliance − refusal (harmful prompts)", "num")]


def _value_models(run: Run) -> Section:
    section = Section("value_models", "Reward and cost models")
    entries = sorted(run.manifest.value_models, key=lambda v: v.round)
    if not entries:
        section.notes.append("No reward or cost model in this run yet.")
    rows = []
    for v in entries:
        scores_dir = run.root / v.scores_dir if v.scores_dir else None
        metrics = read_json_or_none(scores_dir / "metrics.json") if scores_dir else None
        if metrics is None:
            section.notes.append(f"Round {v.round}: no eval-scores results ({v.scores_dir or 'no scores_dir'}/metrics.json).")
            continue
        rows.append([v.round] + [metrics.get(key) for key, _, _ in VALUE_METRICS])
        for name in SCORE_FIGURES:
            if (scores_dir / name).is_file():
                what = name.removesuffix(".png").replace("_", " ")
                section.blocks.append(FigureBlock(
                    f"value_models_r{v.round}_{name}",
                    f"Round {v.round}: {what} on held-out preference pairs, split by the annotators' safety label",
                    (scores_dir / name).read_bytes(), {"source": str(scores_dir / name)}))
    if rows:
        section.blocks.insert(0, TableBlock("Value models on held-out preference pairs (per round)",
                                            [Column("round", "int")] + [Column(t, s) for _, t, s in VALUE_METRICS], rows))
    # Policies before and after: the last round's reward and cost models score SFT's and the final Safe RLHF's samples.
    baseline, final = run.baseline(), run.final_safe_rlhf()
    score_files = (run.comparison or {}).get("score_files", {})
    chosen = [p for p in (baseline, final) if p is not None]
    scores = {}
    for p in chosen:
        cached = read_json_or_none((run.root / COMPARISON).parent / score_files[p.name]) if p.name in score_files else None
        if cached:
            scores[p.name] = {"reward": cached.get("reward"), "cost": cached.get("cost")}
    if final is None:
        section.notes.append("No Safe RLHF policy evaluated: no before/after score distributions of policies.")
    elif len(scores) < 2:
        section.notes.append("No reward/cost scores of the policies' samples (the compare stage scores them with the "
                             "last round's value models).")
    else:
        png, data = histogram_figure(scores)
        section.blocks.append(FigureBlock("policy_scores.png", f"Reward and cost of {baseline.name}'s and {final.name}'s "
                                          "responses to the evaluation prompts (last round's value models)", png, data))
        section.blocks.append(TableBlock("Mean scores of the policies' responses", [Column("policy"), Column("mean reward", "num"),
                                         Column("mean cost", "num")],
                                         [[name] + [data[k][name]["mean"] if k in data else None for k in ("reward", "cost")]
                                          for name in scores]))
    return section


def _training(run: Run) -> Section:
    section = Section("training", "RL training curves")
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for p in run.policies:
        if p.entry.kind == "sft" or not p.entry.train_dir:
            continue
        logs = run.root / p.entry.train_dir / "logs"
        if not logs.is_dir():
            section.notes.append(f"{p.name}: no TensorBoard logs in {p.entry.train_dir}/logs.")
            continue
        try:
            scalars = read_scalars(logs, [f"train/{tag}" for tag in CURVES])
        except Exception as err:  # noqa: BLE001 - one unreadable log (a run being written) must not hide the others
            section.notes.append(f"{p.name}: its TensorBoard logs could not be read ({type(err).__name__}: {err}).")
            continue
        if scalars:
            series[p.name] = {tag.removeprefix("train/"): values for tag, values in scalars.items()}
    if not series:
        section.notes.append("No RL run has logged training scalars yet.")
        return section
    section.paragraphs.append(
        "Per rollout step: λ is the Lagrange multiplier of Safe RLHF (it grows while the episode cost J_C is above "
        "the threshold d, and decays below it); reward and cost are the value models' mean scores of the rollout "
        "responses; KL is the policy's divergence from the SFT reference.")
    section.blocks.append(FigureBlock("training_curves.png", "λ, episode cost J_C, reward, cost and KL per RL run",
                                      curves_figure(series), series))
    section.blocks.append(TableBlock("Last logged value of each RL run", [Column("run"), Column("steps", "int")] + [
        Column(title, "num") for title in CURVES.values()],
        [[name, max(step for values in s.values() for step, _ in values)] + [s[tag][-1][1] if tag in s else None for tag in CURVES]
         for name, s in series.items()]))
    return section


def dominated_by(point: dict[str, Any], others: list[dict[str, Any]]) -> list[str]:
    """Names of the `others` at least as helpful and at most as harmful as `point`, and better on one of the two
    (points: {"policy", "helpfulness_benign", "harmful_rate"}); [] = `point` is on or beyond their frontier."""
    return [o["policy"] for o in others
            if o["helpfulness_benign"] >= point["helpfulness_benign"] and o["harmful_rate"] <= point["harmful_rate"]
            and (o["helpfulness_benign"], o["harmful_rate"]) != (point["helpfulness_benign"], point["harmful_rate"])]


def _frontier(run: Run) -> Section:
    section = Section("frontier", "Reward shaping vs Safe RLHF")
    if not run.safeworld:
        section.notes.append("No gold judges in this run: no frontier.")
        return section
    points = [{"policy": p.name, "kind": p.entry.kind, "nu": p.entry.nu, "helpfulness_benign": p.metrics.get("helpfulness_benign"),
               "harmful_rate": p.metrics.get("harmful_rate"), "over_refusal": p.metrics.get("over_refusal")}
              for p in run.evaluated() if p.entry.kind in ("shaping", "safe_rlhf", "sft", "ppo")]
    points = [p for p in points if p["helpfulness_benign"] is not None and p["harmful_rate"] is not None]
    shaping = [p for p in points if p["kind"] == "shaping"]
    if not shaping:
        section.notes.append("No reward-shaping policy has been evaluated: no frontier to compare with.")
    if len(points) < 2:  # one point is no trade-off
        return section
    section.paragraphs.append(
        "Fixed-weight reward shaping optimises R − ν·C for one ν per policy: a small ν stays harmful, a large one "
        "over-refuses. A Safe RLHF policy lies on or beyond the sweep's frontier when no shaping policy is at least "
        "as helpful and at most as harmful (and better on one of the two).")
    for safe in (p for p in points if p["kind"] == "safe_rlhf"):
        dominating = dominated_by(safe, shaping)
        if shaping:
            section.paragraphs.append(
                f"{safe['policy']}: dominated by {', '.join(dominating)}." if dominating else
                f"{safe['policy']}: no shaping policy dominates it (on or beyond the frontier of the ν sweep).")
    section.blocks.append(FigureBlock(
        "frontier.png", "Harmful rate vs helpfulness: the ν sweep of reward shaping, Safe RLHF, SFT and PPO",
        frontier_figure(points), points))
    section.blocks.append(TableBlock("Frontier points", [Column("policy"), Column("kind"), Column("ν", "num"),
                                                          Column("helpfulness (benign)", "num"), Column("harmful rate", "pct"),
                                                          Column("over-refusal", "pct")],
                                     [[p["policy"], p["kind"], p["nu"], p["helpfulness_benign"], p["harmful_rate"], p["over_refusal"]]
                                      for p in points]))
    return section


def pick_sample_prompts(samples: dict[str, list[dict[str, Any]]], per_kind: int) -> list[str]:
    """Prompts every policy answered: `per_kind` of each kind (harmful, benign, borderline; or any when the rows
    have none), preferring prompts on which the policies' responses differ most (most distinct response classes)."""
    names = list(samples)
    by_prompt = {name: {row["prompt"]: row for row in rows} for name, rows in samples.items()}
    common = [row for row in samples[names[0]] if all(row["prompt"] in by_prompt[n] for n in names)]

    def spread(row: dict[str, Any]) -> int:
        classes = {(by_prompt[n][row["prompt"]].get("judgement") or {}).get("response_class") for n in names}
        return len(classes)

    kinds = [k for k in ("harmful", "benign", "borderline") if any(r.get("kind") == k for r in common)] or [None]
    chosen = []
    for kind in kinds:
        rows = [r for r in common if kind is None or r.get("kind") == kind]
        rows = sorted(rows, key=spread, reverse=True)  # stable: file order among equals
        chosen += [r["prompt"] for r in rows[:per_kind if kind else 3 * per_kind]]
    return chosen


def _samples(run: Run, per_kind: int) -> Section:
    section = Section("samples", "Sample responses, side by side")
    policies = [p for p in run.evaluated() if p.samples is not None]
    if not policies:
        section.notes.append("No samples.jsonl of any policy yet.")
        return section
    # One response per prompt and policy: the first sample when the evaluation drew several.
    samples = {p.name: [row for row in _read_jsonl(p.samples) if row.get("sample", 0) == 0] for p in policies}
    prompts = pick_sample_prompts(samples, per_kind)
    if not prompts:
        section.notes.append("The policies answered no prompt in common.")
        return section
    section.paragraphs.append("Each policy's own sampled response to the same prompt, with the gold judges' reading "
                              "(response class, safety, helpfulness) when the run has them.")
    by_prompt = {name: {row["prompt"]: row for row in rows} for name, rows in samples.items()}
    for prompt in prompts:
        first = by_prompt[policies[0].name][prompt]
        tag = "/".join(x for x in (first.get("kind"), first.get("category")) if x)
        rows = []
        for p in policies:
            row = by_prompt[p.name][prompt]
            judgement = row.get("judgement") or {}
            rows.append([p.name, row["response"], judgement.get("response_class"), judgement.get("is_safe"),
                         judgement.get("helpfulness")])
        section.blocks.append(TableBlock(f"[{tag}] {prompt}" if tag else prompt, [
            Column("policy"), Column("response"), Column("class"), Column("safe"), Column("helpfulness", "num")], rows))
    return section


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.7em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0 1.4em; font-size: .88em; }
th, td { border: 1px solid #ddd; padding: .3em .55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
.statement { background: #fff7e0; border-left: 4px solid #e0a800; padding: .7em 1em; }
.note { color: #8a4b00; } figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: .88em; color: #555; }
"""


def _html_table(table: TableBlock) -> str:
    head = "".join(f"<th>{html.escape(c.name)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if c.style != 'text' else ''}>{html.escape(format_value(v, c.style))}</td>"
                         for c, v in zip(table.columns, row)) + "</tr>"
        for row in table.rows)
    return f"<table><caption>{html.escape(table.title)}</caption><tr>{head}</tr>{body}</table>"


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<section id={section.key}><h2>{html.escape(section.title)}</h2>")
        for k, paragraph in enumerate(section.paragraphs):
            css = " class=statement" if section.key == "about" and k == 0 else ""
            parts.append(f"<p{css}>{html.escape(paragraph)}</p>")
        for note in section.notes:
            parts.append(f"<p class=note>Note: {html.escape(note)}</p>")
        for block in section.blocks:
            if isinstance(block, TableBlock):
                parts.append(_html_table(block))
            else:
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                             f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], figure_dir: str) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for k, paragraph in enumerate(section.paragraphs):
            lines += [f"> **{paragraph}**" if section.key == "about" and k == 0 else paragraph, ""]
        for note in section.notes:
            lines += [f"*Note: {note}*", ""]
        for block in section.blocks:
            if isinstance(block, TableBlock):
                lines += [f"**{_md_cell(block.title)}**", "",
                          "| " + " | ".join(_md_cell(c.name) for c in block.columns) + " |",
                          "|" + "|".join("---:" if c.style != "text" else "---" for c in block.columns) + "|"]
                lines += ["| " + " | ".join(_md_cell(format_value(v, c.style)) for c, v in zip(block.columns, row)) + " |"
                          for row in block.rows]
                lines.append("")
            else:
                lines += [f"![{_md_cell(block.caption)}]({figure_dir}/{block.name})", "", f"*{block.caption}*", ""]
    return "\n".join(lines) + "\n"


def _section_json(section: Section, figure_dir: str) -> dict[str, Any]:
    blocks = []
    for block in section.blocks:
        if isinstance(block, TableBlock):
            blocks.append({"type": "table", "title": block.title,
                           "columns": [{"name": c.name, "style": c.style} for c in block.columns], "rows": block.rows})
        else:
            blocks.append({"type": "figure", "name": block.name, "file": f"{figure_dir}/{block.name}",
                           "caption": block.caption, "data": block.data})
    return {"key": section.key, "title": section.title, "paragraphs": section.paragraphs, "notes": section.notes,
            "blocks": blocks}


def unshown_cells(report: dict[str, Any], page: str, markdown: str) -> tuple[int, list[tuple[str, str, str]]]:
    """Check a written report against its JSON: (how many numeric cells there are, the (table, column, text) of every
    cell whose formatted value is missing from the HTML page or the Markdown)."""
    numeric, missing = 0, []
    for block in (b for section in report["sections"] for b in section["blocks"] if b["type"] == "table"):
        for row in block["rows"]:
            for column, value in zip(block["columns"], row):
                shown = format_value(value, column["style"])
                numeric += column["style"] != "text" and value is not None
                if html.escape(shown) not in page or _md_cell(shown) not in markdown:
                    missing.append((block["title"], column["name"], shown))
    return numeric, missing


def _guarded(key: str, title: str, build: Callable[[], Section]) -> Section:
    """A section that cannot be built says why instead of stopping the whole report."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - a report of a partial or odd run must still render
        section = Section(key, title)
        last = traceback.extract_tb(err.__traceback__)[-1]
        section.notes.append(f"This section could not be built: {type(err).__name__}: {err} "
                             f"({Path(last.filename).name}:{last.lineno}).")
        return section


def build_report(run_dir: str | Path, samples_per_kind: int = 3) -> dict[str, Any]:
    """Write run_dir/report.html, report.md (+ run_dir/report/*.png) and report.json; return report.json's content."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"report: run directory not found: {root}")
    run, notes = read_run(root)
    builders: list[tuple[str, str, Callable[[], Section]]] = [
        ("about", "What this report shows", lambda: _about(run, notes)),
        ("policies", "Policies", lambda: _policies(run)),
        ("elo", "Elo ratings, win rates and the arena", lambda: _elo(run)),
        ("harm", "Harmful rate per round and per harm category", lambda: _harm(run)),
        ("value_models", "Reward and cost models", lambda: _value_models(run)),
        ("training", "RL training curves", lambda: _training(run)),
        ("frontier", "Reward shaping vs Safe RLHF", lambda: _frontier(run)),
        ("samples", "Sample responses, side by side", lambda: _samples(run, samples_per_kind)),
    ]
    sections = [_guarded(key, title, build) for key, title, build in builders]
    title = f"safealign report: {root.resolve().name}" + (" (SafeWorld, a simulation)" if run.safeworld else "")
    return write_report(root, "report", title, sections, {
        "run_dir": str(root), "safeworld": run.safeworld, "manifest": run.manifest.source,
        "comparison": str(root / COMPARISON) if run.comparison is not None else None})


def write_report(root: Path, stem: str, title: str, sections: list[Section], header: dict[str, Any]) -> dict[str, Any]:
    """Write root/{stem}.html (self-contained), {stem}.md (+ root/{stem}/*.png) and {stem}.json from the same
    sections; return the JSON's content: title, `header`'s keys, every section's notes, and the sections."""
    report = {"title": title, **header, "notes": [note for s in sections for note in s.notes],
              "sections": [_section_json(s, stem) for s in sections]}
    figures = [b for s in sections for b in s.blocks if isinstance(b, FigureBlock)]
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / stem) as tmp:  # the figure folder is replaced whole: no stale PNGs remain
        tmp.mkdir()
        for figure in figures:
            (tmp / figure.name).write_bytes(figure.png)
    atomic_write_text(root / f"{stem}.md", render_markdown(title, sections, stem))
    atomic_write_text(root / f"{stem}.html", render_html(title, sections))
    atomic_write_json(root / f"{stem}.json", report)
    return report


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
