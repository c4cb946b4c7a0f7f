"""The report's sections on how the policies were made: the reward and cost models (against gold, per round, on the
policies' own answers) and the RL training curves."""

from __future__ import annotations

from typing import Any

from safealign.evaluation.report.document import Column, FigureBlock, Section, TableBlock
from safealign.evaluation.report.figures import CURVES, curves_figure, histogram_figure, round_scatter_figure
from safealign.evaluation.report.reading import COMPARISON, Run, read_jsonl, read_scalars
from safealign.run_directory import read_json_or_none

SCORE_FIGURES = ("reward_distribution.png", "cost_distribution.png", "reward_vs_cost.png")  # from `eval-scores`


VALUE_METRICS = [("reward_accuracy", "reward accuracy (labels)", "pct"), ("gold_agreement", "reward vs gold order", "pct"),
                 ("cost_ranking_accuracy", "cost ranking accuracy", "pct"), ("cost_sign_accuracy", "cost sign accuracy", "pct"),
                 ("gold_sign_accuracy", "cost sign vs gold safety", "pct"),
                 ("reward_margin_compliance_vs_refusal", "reward margin: compliance − refusal (harmful prompts)", "num")]


def _round_scatter_panels(run: Run, proxy: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One panel per round: the policy's harmful-prompt answers with the scores of the models it trained against
    (SFT: the first round's, which it is trained against next); a round whose scores or samples are gone is left out."""
    panels = []
    policies = {p.name: p for p in run.policies}
    for row in proxy:
        trained_against = row["judged_by"] == "own" or row["round"] == 0  # SFT has no own models: round 1's
        if not trained_against or row["policy"] not in policies or "score_file" not in row:
            continue
        cached = read_json_or_none((run.root / COMPARISON).parent / row["score_file"])
        samples_file = run.root / policies[row["policy"]].entry.eval_dir / "samples.jsonl"
        if not cached or not cached.get("reward") or not cached.get("cost") or not samples_file.is_file():
            continue
        samples = read_jsonl(samples_file)
        if len(samples) != len(cached["cost"]):
            continue
        harmful = [k for k, r in enumerate(samples) if r.get("kind") == "harmful" and "judgement" in r]
        panels.append({"title": f"round {row['round']} ({row['policy']}), models of round {row['value_models_round']}",
                       "reward": [cached["reward"][k] for k in harmful], "cost": [cached["cost"][k] for k in harmful],
                       "unsafe": [not samples[k]["judgement"]["is_safe"] for k in harmful], "d": row["d"]})
    return panels


PROXY_COLUMNS = [("proxy/cost_recall", "cost recall", "pct"), ("proxy/cost_precision", "cost precision", "pct"),
                 ("proxy/cost_flagged_not_harmful", "cost > 0 (benign, borderline)", "pct"),
                 ("proxy/cost_recall_at_d", "recall at d", "pct"), ("proxy/cost_precision_at_d", "precision at d", "pct"),
                 ("proxy/cost_flagged_not_harmful_at_d", "cost > d (benign, borderline)", "pct"),
                 ("proxy/reward_gold_agreement", "reward vs gold (own pairs)", "pct"),
                 ("proxy/reward_prefers_longer_gold_does_not", "reward prefers the longer, gold does not", "pct")]


def value_models_section(run: Run) -> Section:
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
    proxy = (run.comparison or {}).get("proxy_by_round", [])
    if proxy:
        section.paragraphs.append(
            "Per round, on each policy's own evaluation answers (round 0: SFT), the reward and cost models it was "
            "trained against (own: round k's) and those retrained on pairs sampled from it (next: round k+1's), "
            "against the gold judges: the cost model's recall and precision of gold-unsafe answers and its flags on "
            "benign and borderline answers, with cost > 0 and with cost > d (the threshold of the round whose models "
            "judge); the reward model's agreement with gold on pairs of the policy's answers to one prompt. The "
            "constraint only sees the harm the cost model recalls; a round closes the blind spot when next's recall "
            "exceeds own's.")
        section.blocks.insert(1 if rows else 0, TableBlock(
            "The proxy against the truth, per round, on each policy's own answers",
            [Column("round", "int"), Column("policy"), Column("judged by"), Column("models of round", "int"),
             Column("d", "num")] + [Column(title, style) for _, title, style in PROXY_COLUMNS],
            [[r["round"], r["policy"], r["judged_by"], r["value_models_round"], r["d"]]
             + [r.get(key) for key, _, _ in PROXY_COLUMNS] for r in proxy]))
        panels = _round_scatter_panels(run, proxy)
        if panels:
            section.blocks.insert(2 if rows else 1, FigureBlock(
                "round_scores.png", "Per round: reward against cost of the policy's answers to harmful prompts, by the "
                "value models it was trained against (round 0: SFT by round 1's), coloured by the gold verdict",
                round_scatter_figure(panels),
                [{k: v for k, v in p.items() if k in ("title", "d")} | {"answers": len(p["cost"]), "gold_unsafe": sum(p["unsafe"])}
                 for p in panels]))
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


def training_section(run: Run) -> Section:
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
    category_multipliers(run, section)
    return section


def category_multipliers(run: Run, section: Section) -> None:
    """With one λ per harm category (`constraint_per_category`), each category's last λ_k and d_k per run, from the run's
    metrics.json: the curves' λ is their mean, which hides a category the policy still trades away."""
    finals: dict[str, dict[str, float]] = {}
    for p in run.policies:
        metrics = read_json_or_none(run.root / p.entry.train_dir / "metrics.json") if p.entry.train_dir else None
        if metrics and any(key.startswith("lagrange_multiplier/") for key in metrics):
            finals[p.name] = metrics
    if not finals:
        return
    categories = sorted({key.split("/", 1)[1] for m in finals.values() for key in m if key.startswith("lagrange_multiplier/")})
    section.paragraphs.append(
        "With one multiplier per prompt category (constraint_per_category), the λ above is the mean of the λ_k; each "
        "category's own λ_k and threshold d_k at the end of each run follow ('none': the prompts without a category).")
    section.blocks.append(TableBlock(
        "λ_k and d_k per prompt category at the end of each run",
        [Column("category")] + [Column(f"λ_k {name}", "num") for name in finals] + [Column(f"d_k {name}", "num") for name in finals],
        [[c] + [m.get(f"lagrange_multiplier/{c}") for m in finals.values()] + [m.get(f"threshold/{c}") for m in finals.values()]
         for c in categories]))
