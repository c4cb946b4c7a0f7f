"""The report's matplotlib figures, each drawn from plain numbers and returned as PNG bytes.

matplotlib (and numpy) are imported when a figure is drawn, not with this module: `safealign report --help`
imports the report and must stay instant.
"""

from __future__ import annotations

import io
import math
from typing import Any

# RL scalars (the RL loop logs every one as train/<name>) and what the report calls them.
CURVES = {"lagrange_multiplier": "λ (Lagrange multiplier)", "episode_cost": "episode cost J_C",
          "reward": "reward", "cost": "cost", "kl": "KL(π‖π_ref)"}


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures are only saved, never shown (no display needed)."""
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


def round_scatter_figure(panels: list[dict[str, Any]]) -> bytes:
    """The paper's Figure 5 per round: reward against cost of a policy's answers to harmful prompts, scored by the
    value models it was trained against, coloured by the gold verdict; the cost model's boundary (0) and d dashed.
    Each panel: {title, reward, cost, unsafe (gold), d}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False, sharey=False)
    for ax, panel in zip(axes[0], panels):
        for unsafe, colour, label in ((False, "tab:green", "gold: safe"), (True, "tab:red", "gold: unsafe")):
            points = [(r, c) for r, c, u in zip(panel["reward"], panel["cost"], panel["unsafe"]) if u == unsafe]
            ax.scatter([r for r, _ in points], [c for _, c in points], s=5, alpha=0.45, color=colour,
                       label=f"{label} ({len(points)})")
        ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
        if panel["d"] != 0.0:
            ax.axhline(panel["d"], color="tab:blue", linewidth=0.8, linestyle=":", label=f"d = {panel['d']:g}")
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("reward")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("cost (> 0: the cost model says unsafe)")
    return figure_png(fig)


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



def family_figure(points: list[dict[str, Any]]) -> bytes:
    """Harmful rate (with its interval) against helpfulness, one point per policy: the methods side by side."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for p in points:
        low, high = p.get("harmful_rate_low"), p.get("harmful_rate_high")
        errors = [[p["harmful_rate"] - low], [high - p["harmful_rate"]]] if low is not None and high is not None else None
        ax.errorbar(p["helpfulness_benign"], p["harmful_rate"], yerr=errors, fmt="o", capsize=3, markersize=5)
        ax.annotate(p["policy"], (p["helpfulness_benign"], p["harmful_rate"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    ax.set_xlabel("helpfulness on benign prompts (gold)")
    ax.set_ylabel("harmful rate on harmful prompts (gold, 95% interval)")
    ax.set_title("every method: helpfulness vs harmfulness (lower right is better)")
    return figure_png(fig)
