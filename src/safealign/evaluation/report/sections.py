"""The run report's sections (listed in the package's docstring), built from the run that `reading.read_run` reads:
the policies' here, how they were made (value models, training curves) in `training`.

A section whose piece of the run is missing (a stage not run) says so in its notes; one that fails to build says why
instead of stopping the report.
"""

from __future__ import annotations

from typing import Any, Callable

from safealign.evaluation.report.document import Column, FigureBlock, Section, TableBlock, guarded_section
from safealign.evaluation.report.figures import category_figure, elo_plane_figure, frontier_figure, per_round_figure
from safealign.evaluation.report.reading import Run, read_jsonl
from safealign.evaluation.report.family import family_section, has_family
from safealign.evaluation.report.training import training_section, value_models_section

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
                  ("over_refusal/refusal", "of which refusals", "pct"),
                  ("over_refusal/redirection", "redirections", "pct"),
                  ("over_refusal/filler", "filler or empty", "pct"), ("over_refusal/cut", "cut off", "pct"),
                  ("redirection_share", "redirections / (redirections + refusals)", "pct"),
                  ("distinct_1", "distinct-1", "num"), ("distinct_2", "distinct-2", "num"),
                  ("mean_response_tokens", "mean tokens", "num"), ("num_prompts", "prompts", "int"),
                  ("num_responses", "responses", "int")]
MODEL_JUDGE_COLUMNS = [("mean_reward", "mean reward", "num"), ("mean_cost", "mean cost", "num"),
                       ("cost_positive_rate", "cost > 0 (all prompts)", "pct"),
                       ("cost_positive_rate_harmful", "cost > 0 (harmful prompts)", "pct"),
                       ("proxy/cost_recall", "cost > 0 on gold-unsafe answers (recall)", "pct"),
                       ("proxy/cost_precision", "gold-unsafe among cost > 0 (precision)", "pct"),
                       ("proxy/cost_flagged_not_harmful", "cost > 0 (benign, borderline)", "pct"),
                       ("proxy/reward_gold_agreement", "reward agrees with gold (own pairs)", "pct"),
                       ("proxy/reward_prefers_longer_gold_does_not", "reward prefers the longer, gold does not", "pct")]


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
        "score; over-refusal: share of the answers to borderline (benign but harmful-looking) prompts that get no help "
        "(a refusal, a redirection, filler or an empty answer, an answer cut mid-sentence; the four columns after its "
        "interval split it); "
        "redirection share: on harmful prompts, safe redirections among redirections and bare refusals; distinct-n: "
        "unique word n-grams over all n-grams (low = mode collapse). 95% low / high: the Wilson score interval of the "
        "rate before them, the answers to one request (one prompt, where the prompts name no request) counted as one "
        "cluster: the sampling noise of the measurement, so two "
        "policies whose intervals overlap widely are not shown to differ.")
    columns = [c for c in POLICY_COLUMNS if any(p.metrics.get(c[0]) is not None for p in evaluated)]
    section.blocks.append(TableBlock("Gold judges" if run.safeworld else "Responses (no gold judges)", [
        Column("policy"), Column("kind")] + [Column(title, style) for _, title, style in columns],
        [[p.name, p.entry.kind] + [p.metrics.get(key) for key, _, _ in columns] for p in evaluated]))
    judged = (run.comparison or {}).get("policies", {})
    columns = [c for c in MODEL_JUDGE_COLUMNS if any(c[0] in m for m in judged.values())]
    if columns:
        if any(key.startswith("proxy/") for key, _, _ in columns):
            section.paragraphs.append(
                "The model judges against the gold judges on each policy's own answers: the cost model's recall and "
                "precision of the answers gold calls unsafe (flagged: cost > 0) and the share of answers to benign and "
                "borderline prompts it flags; on pairs of one policy's answers to the same prompt, how often the reward "
                "model orders them as the gold helpfulness judge does, and, where gold does not find the longer answer "
                "more helpful, how often the reward model prefers it. A policy trained against these models finds "
                "their blind spots: low recall on its answers is harm the constraint cannot see.")
        section.blocks.append(TableBlock("Model judges (reward and cost models of the last round, on the compared prompts)",
                                         [Column("policy")] + [Column(title, style) for _, title, style in columns],
                                         [[name] + [m.get(key) for key, _, _ in columns] for name, m in judged.items()]))
    elif run.comparison is None:
        section.notes.append("No model-judge numbers: the compare stage has not written eval/compare/comparison.json.")
    _diversity(section, run)
    return section


DIVERSITY_COLUMNS = [("diversity/distinct_1", "distinct-1 (per prompt)", "num"),
                     ("diversity/distinct_2", "distinct-2 (per prompt)", "num"),
                     ("diversity/self_rouge_l", "self-ROUGE-L", "num"),
                     ("diversity/semantic", "semantic diversity", "num"),
                     ("diversity/num_prompts", "prompts", "int"), ("diversity/semantic_prompts", "prompts (semantic)", "int")]


def _diversity(section: Section, run: Run) -> None:
    """How different a policy's answers to one prompt are from each other (the compare stage's `diversity/` numbers),
    beside SFT's: RLHF is known to narrow them."""
    judged = (run.comparison or {}).get("policies", {})
    columns = [c for c in DIVERSITY_COLUMNS if any(m.get(c[0]) is not None for m in judged.values())]
    if not columns:
        return
    section.paragraphs.append(
        "Diversity of each policy's answers to one prompt, averaged over the compared prompts with two answers or more: "
        "distinct-n, the unique word n-grams among one prompt's answers over all of them (higher = more diverse); "
        "self-ROUGE-L, the mean ROUGE-L F1 between two answers of one prompt (lower = more diverse); semantic "
        "diversity, the mean 1 − clip(cos, 0, 1) between two answers' sentence embeddings (all-MiniLM-L6-v2; higher = "
        "more diverse), over the first prompts only (its own prompt count). Compare policies sampled alike: more or "
        "longer answers move every number.")
    section.blocks.append(TableBlock("Diversity of the answers to one prompt", [Column("policy")] + [
        Column(title, style) for _, title, style in columns], [[name] + [m.get(key) for key, _, _ in columns]
                                                               for name, m in judged.items()]))


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
    samples = {p.name: [row for row in read_jsonl(p.samples) if row.get("sample", 0) == 0] for p in policies}
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


def report_sections(run: Run, notes: list[str], samples_per_kind: int) -> list[Section]:
    """Every section of the run's report, in order; `notes`: what reading the run directory noted."""
    builders: list[tuple[str, str, Callable[[], Section]]] = [
        ("about", "What this report shows", lambda: _about(run, notes)),
        ("policies", "Policies", lambda: _policies(run)),
        ("elo", "Elo ratings, win rates and the arena", lambda: _elo(run)),
        ("harm", "Harmful rate per round and per harm category", lambda: _harm(run)),
        ("value_models", "Reward and cost models", lambda: value_models_section(run)),
        ("training", "RL training curves", lambda: training_section(run)),
        ("frontier", "Reward shaping vs Safe RLHF", lambda: _frontier(run)),
        *([("family", "The family side by side", lambda: family_section(run))] if has_family(run) else []),
        ("samples", "Sample responses, side by side", lambda: _samples(run, samples_per_kind)),
    ]
    return [guarded_section(key, title, build) for key, title, build in builders]
