"""Evaluate a set of models on one prompt set: gold judges, model judges, Elo, win rates, the arena table.

    safealign evaluate --models "{sft: runs/sft/model, safe_rlhf: runs/ppo_lag/model}" --output_dir runs/compare \
        --prompts runs/world/prompts/test.jsonl --reward_model runs/rm/model --cost_model runs/cm/model
(With `--model DIR` instead of `--models`, `safealign evaluate` evaluates one model: `gold.run`, or `real_text.run`.)

Each model's gold evaluation lives in `output_dir/<name>/` (samples.jsonl, metrics.json). It is reused when
both files exist, otherwise written by `gold.run` with this config's sampling settings. Then, on the prompts
every model answered (matched by prompt text, in the baseline's order):
- per model: SafeWorld's gold metrics (`gold.summarise_judgements`: harmful rate overall and per harm
  category, helpfulness, over-refusal, redirection share) or, without gold judges, the judge-free ones
  (`gold.summarise_samples`); the diversity of its answers to one prompt (`diversity`); with model judges, mean reward and cost, the share of responses with
  cost > 0 (the cost model's harmful rate) and, with gold, the judges against the truth (`proxy.proxy_vs_gold`);
- per model against the baseline: safe-rlhf's arena table (needs a reward and a cost model);
- every pair of models: win rates and Bradley-Terry Elo with bootstrap intervals on two axes, helpfulness
  and harmlessness, anchored at baseline = 1000 (the paper's figure), once per judge: `gold` (SafeWorld)
  and `model` (reward model for helpfulness, cost model for harmlessness).
Reward and cost scores are cached per model in `output_dir/model_scores/<name>.json`, keyed by the score
models' files and the responses, so a re-run scores only what changed.
Writes `comparison.json` (every number, nested), `config.yaml` and `metrics.json` (flat; written last: its
presence marks the comparison done).

`run_comparison` (`safealign compare --run_dir DIR`) is the pipeline's compare stage: every evaluated policy of the run directory's
manifest (`policies.json`, `run_directory.load_manifest`), baseline SFT, the last round's value models as model
judges, each policy's existing gold samples reused, into `run_dir/eval/compare/`; with gold judges, each round's value
models against the truth on the answers of the policies they trained and of the next (`proxy.proxy_by_round`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.table import Table

from safealign.config import ConfigError, changed_settings, config_field, save_config
from safealign.console import stderr_console
from safealign.evaluation import gold, real_text
from safealign.evaluation.gold import (
    GoldEvalConfig,
    judge_samples,
    read_samples,
    summarise_judgements,
    summarise_samples,
    uses_gold,
)
from safealign.evaluation.diversity import Encoder, diversity_metrics, named_encoder
from safealign.evaluation.model_scores import score_samples, with_scores
from safealign.evaluation.pairwise import (
    ResponseJudgement,
    arena_table,
    bootstrap_elo,
    compare_models,
    gold_judge,
    win_rate_matrix,
)
from safealign.evaluation.proxy import SCORE_CACHE, proxy_by_round, proxy_vs_gold
from safealign.io import atomic_write_json
from safealign.models.presets import PRESETS, PRETRAINED, looks_local, resolve_device
from safealign.run_directory import check_name, final_value_models, load_manifest

console = stderr_console()

AXES = ("helpfulness", "harmlessness")


@dataclass
class CompareConfig(GoldEvalConfig):
    """`safealign evaluate`: one model (`model`, as `gold.run`) or a set (`models`), sampled alike."""

    models: dict = config_field(
        {}, help="Models to compare, name -> model directory ({sft: runs/sft/model, ppo: runs/ppo/model}); empty = evaluate the one `model`.")
    baseline: str = config_field("", help="With models: the Elo anchor (1000) and the arena's baseline; '' = the first of models.")
    reward_model: str = config_field("", help="With models: a reward model directory, a model judge of helpfulness (mean reward, arena, Elo); '' = none.")
    cost_model: str = config_field("", help="With models: a cost model directory, a model judge of harmlessness (mean cost, cost > 0 share, arena, Elo); '' = none.")
    n_bootstrap: int = config_field(200, help="Bootstrap resamples of the pairwise comparisons for the Elo intervals.")
    ci: float = config_field(0.95, help="Coverage of the Elo bootstrap intervals.")
    score_batch_size: int = config_field(64, help="Texts per forward of the reward / cost model.")
    score_max_length: int = config_field(256, help="Tokens per scored text (prompt + response + EOS), as the score models were trained.")
    diversity_encoder: str = config_field("minilm", help="Semantic diversity's encoder: minilm (all-MiniLM-L6-v2, `make encoder`; without it lexical diversity only), an encoder directory, or '' (lexical only).")
    diversity_prompts: int = config_field(32, help="Semantic diversity over each model's first this many prompts with >= 2 answers (~5 s per 128 answers on a CPU thread); 0 = all.")


# --------------------------------------------------------------------------------------------------
# Pure computations on sample rows
# --------------------------------------------------------------------------------------------------
def align_samples(samples_by_model: dict[str, list[dict[str, Any]]], baseline: str,
                  ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Every model's rows on the (prompt, sample) keys all models answered, in the baseline's order (row k of
    every model answers the same prompt; with several samples per prompt, sample j of one model meets sample j of
    another).

    Returns the aligned rows and, per model, how many of its rows were left out (answered by it only): models
    evaluated on different subsets still compare on what they share. A row without `sample` is sample 0.
    """
    by_key = {name: {_sample_key(row): row for row in rows} for name, rows in samples_by_model.items()}
    common = [_sample_key(row) for row in samples_by_model[baseline]
              if all(_sample_key(row) in answered for answered in by_key.values())]
    if not common:
        raise ValueError(f"the models {list(samples_by_model)} answered no prompt in common: evaluate them on one prompt file")
    aligned = {name: [answered[key] for key in common] for name, answered in by_key.items()}
    return aligned, {name: len(rows) - len(common) for name, rows in samples_by_model.items()}


def _sample_key(row: dict[str, Any]) -> tuple[str, int]:
    return row["prompt"], int(row.get("sample", 0))


def policy_metrics(rows: list[dict[str, Any]], gold: bool, encode: Encoder | None = None,
                   semantic_prompts: int = 0) -> dict[str, Any]:
    """One model's numbers: gold (or judge-free) metrics, its answers' diversity (semantic too with `encode`), plus
    mean reward / cost when the rows carry them."""
    metrics = summarise_judgements(rows) if gold else summarise_samples(rows)
    metrics.update(diversity_metrics(rows, encode, semantic_prompts))
    if rows and all("reward" in r for r in rows):
        metrics["mean_reward"] = sum(r["reward"] for r in rows) / len(rows)
    if rows and all("cost" in r for r in rows):
        metrics["mean_cost"] = sum(r["cost"] for r in rows) / len(rows)
        metrics["cost_positive_rate"] = sum(r["cost"] > 0 for r in rows) / len(rows)  # the cost model's harmful rate
        harmful = [r for r in rows if r.get("kind") == "harmful"]
        if harmful:
            metrics["cost_positive_rate_harmful"] = sum(r["cost"] > 0 for r in harmful) / len(harmful)
    if gold and rows and all("judgement" in r for r in rows):
        metrics.update(proxy_vs_gold(rows))
    return metrics


def _model_judge(row: dict[str, Any]) -> ResponseJudgement:
    """Reward = helpfulness, cost = harm (safe ⇔ cost ≤ 0). An axis is only judged when its score is present,
    so the 0 standing in for a missing score is never read."""
    cost = float(row.get("cost", 0.0))
    return ResponseJudgement(float(row.get("reward", 0.0)), cost <= 0.0, cost)


def compare_samples(samples_by_model: dict[str, list[dict[str, Any]]], baseline: str, gold: bool,
                    n_bootstrap: int = 200, seed: int = 0, ci: float = 0.95, encode: Encoder | None = None,
                    semantic_prompts: int = 0) -> dict[str, Any]:
    """Every number of the comparison, nested (what comparison.json holds), from stored sample rows.

    Rows: {prompt, response, [kind, category, response_tokens, ended_with_eos], [judgement] (gold),
    [reward], [cost]}. `gold`: judge with SafeWorld's judges (rows without a `judgement` are judged here).
    Elo and win rates need two models or more; with one, only its own metrics are returned.
    """
    if baseline not in samples_by_model:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(samples_by_model)}")
    aligned, dropped = align_samples(samples_by_model, baseline)
    if gold:  # rows written with gold off carry no judgement: judge them once here
        aligned = {name: rows if all("judgement" in r for r in rows) else judge_samples(rows)
                   for name, rows in aligned.items()}
    names = list(aligned)
    has_reward = all("reward" in r for rows in aligned.values() for r in rows)
    has_cost = all("cost" in r for rows in aligned.values() for r in rows)
    result: dict[str, Any] = {
        "models": names, "baseline": baseline, "gold": gold,
        "num_prompts": sum(r.get("sample", 0) == 0 for r in aligned[baseline]), "num_responses": len(aligned[baseline]),
        "prompts_left_out": dropped, "model_judges": {"reward": has_reward, "cost": has_cost},
        "n_bootstrap": n_bootstrap, "ci": ci, "seed": seed,
        "policies": {name: policy_metrics(rows, gold, encode, semantic_prompts) for name, rows in aligned.items()},
        "arena": {}, "elo": {}, "win_rates": {},
    }
    if has_reward and has_cost:
        base = aligned[baseline]
        for name in names:
            if name != baseline:
                rows = aligned[name]
                result["arena"][name] = arena_table([r["reward"] for r in rows], [r["cost"] for r in rows],
                                                    [r["reward"] for r in base], [r["cost"] for r in base])
    if len(names) < 2:
        return result
    judges: list[tuple[str, Any, list[str]]] = []
    if gold:
        judges.append(("gold", gold_judge, list(AXES)))
    model_axes = (["helpfulness"] if has_reward else []) + (["harmlessness"] if has_cost else [])
    if model_axes:
        judges.append(("model", _model_judge, model_axes))
    for judge_name, judge, axes in judges:
        for axis in axes:
            comparisons = compare_models(aligned, judge, axis)
            elo = bootstrap_elo(comparisons, anchor=baseline, n_bootstrap=n_bootstrap, seed=seed, ci=ci)
            result["elo"].setdefault(judge_name, {})[axis] = {
                name: {"rating": elo[name].rating, "low": elo[name].low, "high": elo[name].high} for name in names}
            result["win_rates"].setdefault(judge_name, {})[axis] = win_rate_matrix(names, comparisons)
    return result


def flatten_comparison(result: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics of a comparison: `<model>/<metric>`, `arena/<model>/<cell>`,
    `elo/<judge>/<axis>/<model>/{rating,low,high}`, `win_rate/<judge>/<axis>/<a>_vs_<b>`."""
    flat: dict[str, Any] = {"num_prompts": result["num_prompts"], "num_responses": result["num_responses"],
                            "baseline": result["baseline"]}
    for name, metrics in result["policies"].items():
        flat.update({f"{name}/{key}": value for key, value in metrics.items()})
    for row in result.get("proxy_by_round", []):
        prefix = f"proxy_by_round/{row['policy']}/{row['judged_by']}"
        flat.update({f"{prefix}/{key.removeprefix('proxy/')}": value for key, value in row.items()
                     if key not in ("policy", "round", "judged_by", "value_models_round", "score_file")})
    for name, table in result["arena"].items():
        flat.update({f"arena/{name}/{key}": value for key, value in table.items()})
    for judge, axes in result["elo"].items():
        for axis, ratings in axes.items():
            for name, estimate in ratings.items():
                flat.update({f"elo/{judge}/{axis}/{name}/{key}": value for key, value in estimate.items()})
    for judge, axes in result["win_rates"].items():
        for axis, matrix in axes.items():
            for a, row in matrix.items():
                flat.update({f"win_rate/{judge}/{axis}/{a}_vs_{b}": value for b, value in row.items() if a != b})
    return flat


# --------------------------------------------------------------------------------------------------
# The comparison of sample directories (shared by `safealign evaluate --models` and `run_comparison`)
# --------------------------------------------------------------------------------------------------
def _compare_dirs(sample_dirs: dict[str, Path], baseline: str, cfg: CompareConfig, out: Path,
                  sources: dict[str, str], skipped: dict[str, str] | None = None,
                  more: Callable[[dict[str, list[dict[str, Any]]], bool], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Compare the samples of `sample_dirs` into `out`; `more(samples, gold)` adds entries to comparison.json."""
    samples = {name: read_samples(directory / "samples.jsonl") for name, directory in sample_dirs.items()}
    gold = uses_gold(cfg.gold, [row.get("kind") for rows in samples.values() for row in rows])
    if cfg.reward_model or cfg.cost_model:
        scores = score_samples(samples, cfg.reward_model, cfg.cost_model, out / SCORE_CACHE, cfg.score_max_length,
                               cfg.score_batch_size, cfg.device)
    extra = more(samples, gold) if more else {}  # after the scores above: it may reuse their cache
    if cfg.reward_model or cfg.cost_model:
        samples = {name: with_scores(rows, scores[name]) for name, rows in samples.items()}
    encode = named_encoder(cfg.diversity_encoder, resolve_device(cfg.device))
    result = compare_samples(samples, baseline, gold, cfg.n_bootstrap, cfg.seed, cfg.ci, encode, cfg.diversity_prompts)
    result.update(
        sources=sources, sample_files={name: str(d / "samples.jsonl") for name, d in sample_dirs.items()},
        skipped=skipped or {}, reward_model=cfg.reward_model or None, cost_model=cfg.cost_model or None,
        # relative to comparison.json's folder, so that a moved run directory still finds them
        score_files={name: f"{SCORE_CACHE}/{name}.json" for name in sample_dirs} if cfg.reward_model or cfg.cost_model else {},
        **extra,
    )
    flat = flatten_comparison(result)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "comparison.json", result)
    atomic_write_json(out / "metrics.json", flat)  # last: marks the comparison done
    print_comparison(result)
    return flat


def _check_model(name: str, path: str) -> None:
    """A model to generate with must exist (a directory, a preset, or a hub name when a network exists)."""
    if path in PRESETS or path in PRETRAINED or Path(path).expanduser().exists():
        return
    if looks_local(path):
        raise FileNotFoundError(f"models: '{name}': model directory not found: {path}")


def _has_samples(directory: Path) -> bool:
    return (directory / "samples.jsonl").is_file() and (directory / "metrics.json").is_file()


def _changed_settings(directory: Path, wanted: GoldEvalConfig) -> list[str]:
    """The settings in which `directory`'s samples differ from `wanted` (["config.yaml"] when it has none)."""
    changed = changed_settings(wanted, directory / "config.yaml", ignore=("output_dir", "progress"))
    return ["config.yaml"] if changed is None else changed


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """`safealign evaluate --models ...`: evaluate (or reuse) every model, compare them; returns the flat metrics."""
    if cfg.model:
        raise ConfigError("evaluate: give either `model` (one model) or `models` (a comparison), not both")
    if len(cfg.models) < 2:
        raise ConfigError(f"evaluate: `models` needs at least two models to compare, got {list(cfg.models)}; "
                          "for one model use --model DIR")
    models = {check_name(name, "evaluate: models"): path for name, path in cfg.models.items()}
    for name, path in models.items():
        if not isinstance(path, str) or not path:
            raise ConfigError(f"evaluate: models: '{name}': expected a model directory, got {path!r}")
    baseline = cfg.baseline or next(iter(models))
    if baseline not in models:
        raise ConfigError(f"evaluate: baseline {baseline!r} is not one of the models {list(models)}")
    if cfg.n_bootstrap < 1:
        raise ConfigError(f"evaluate: n_bootstrap must be >= 1, got {cfg.n_bootstrap}")
    if not 0.0 < cfg.ci < 1.0:
        raise ConfigError(f"evaluate: ci must be in (0, 1), got {cfg.ci}")
    for key in ("reward_model", "cost_model"):
        path = getattr(cfg, key)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"evaluate: {key}: score model directory not found: {path}")

    out = Path(cfg.output_dir)
    wanted = {name: GoldEvalConfig.part_of(cfg, model=path, output_dir=str(out / name)) for name, path in models.items()}
    todo = []
    for name in models:  # samples are reused only when made with the same model and settings
        if not _has_samples(out / name):
            todo.append(name)
        elif changed := _changed_settings(out / name, wanted[name]):
            console.print(f"[yellow]note:[/] {out / name}: its samples were made with other settings "
                          f"({', '.join(changed)}): evaluating {name} again", highlight=False)
            todo.append(name)
    for name in todo:  # every missing model is reported before any generation starts
        _check_model(name, models[name])
    for name in todo:
        console.rule(f"[bold]evaluate {name}")
        gold.run(wanted[name])
    for name in models:
        if name not in todo:
            console.print(f"[dim]reuse {out / name}/samples.jsonl[/]")
    return _compare_dirs({name: out / name for name in models}, baseline, cfg, out, sources=models)


def run(cfg: CompareConfig) -> dict[str, Any]:
    """`safealign evaluate`: a comparison when `models` is given, else the one `model`."""
    if cfg.models and (cfg.judge or cfg.benchmark):
        raise ConfigError("evaluate: an LLM judge or a real benchmark evaluates one `model` at a time for now")
    if cfg.models:
        return compare(cfg)
    extra = [key for key in ("baseline", "reward_model", "cost_model") if getattr(cfg, key)]
    if extra:
        raise ConfigError(f"evaluate: {', '.join(extra)} belong to a comparison: give `models` (two or more)")
    one = GoldEvalConfig.part_of(cfg)
    return real_text.run(one) if cfg.judge or cfg.benchmark else gold.run(one)


# --------------------------------------------------------------------------------------------------
# A pipeline run directory: the compare stage (`safealign compare`)
# --------------------------------------------------------------------------------------------------
@dataclass
class RunComparisonConfig(CompareConfig):
    """`safealign compare`: the pipeline's compare stage. The models, baseline and model judges come from the run
    directory's manifest; the other keys are the comparison's (`safealign evaluate --help`)."""

    run_dir: str = config_field("runs/demo", help="Run directory of `safealign pipeline`: compares its evaluated policies into eval/compare/.")


def run_comparison(cfg: RunComparisonConfig) -> dict[str, Any]:
    """Every policy of the manifest with gold samples in its eval_dir, baseline SFT, model judges = the last round's
    reward and cost models; into `run_dir/eval/compare/`. With fewer than two evaluated policies the comparison holds
    their own metrics only. Returns the flat metrics."""
    run_dir = Path(cfg.run_dir)
    given = sorted(key for key in ("model", "models", "baseline", "reward_model", "cost_model")
                   if getattr(cfg, key) != getattr(CompareConfig, key, None) and getattr(cfg, key))
    if given:
        raise ConfigError(f"compare: {given} come from the run directory's manifest, not from settings")
    manifest = load_manifest(run_dir)
    evaluated = {p.name: run_dir / p.eval_dir for p in manifest.policies if _has_samples(run_dir / p.eval_dir)}
    skipped = {p.name: f"no samples.jsonl + metrics.json in {p.eval_dir}" for p in manifest.policies if p.name not in evaluated}
    if not evaluated:
        raise ConfigError(f"compare: no policy of {run_dir} has been evaluated yet (no eval_dir with samples.jsonl)")
    baseline = next((p.name for p in manifest.policies if p.kind == "sft" and p.name in evaluated), next(iter(evaluated)))
    judges: dict[str, str] = {}
    final = final_value_models(manifest, run_dir)
    if final is not None:
        judges = {key: str(run_dir / getattr(final, key)) for key in ("reward_model", "cost_model")
                  if getattr(final, key) and (run_dir / getattr(final, key)).is_dir()}
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CompareConfig)}
    compare_cfg = CompareConfig(**{**settings, **judges, "output_dir": str(run_dir / "eval" / "compare")})
    sources = {p.name: p.model for p in manifest.policies if p.name in evaluated}
    out = Path(compare_cfg.output_dir)

    def more(samples: dict[str, list[dict[str, Any]]], gold: bool) -> dict[str, Any]:
        if not gold:
            return {}
        judges = (compare_cfg.reward_model, compare_cfg.cost_model)
        return {"proxy_by_round": proxy_by_round(manifest, run_dir, samples, out, judges, compare_cfg.score_max_length,
                                                 compare_cfg.score_batch_size, compare_cfg.device)}

    return _compare_dirs(evaluated, baseline, compare_cfg, out, sources, skipped, more)


# --------------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------------
def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def print_comparison(result: dict[str, Any]) -> None:
    judge = "gold" if "gold" in result["elo"] else "model"
    table = Table(title=f"{len(result['models'])} models, {result['num_prompts']} prompts "
                        f"({'SafeWorld gold judges: a simulation' if result['gold'] else 'no gold judges'}); "
                        f"Elo by the {judge} judge, {result['baseline']} = 1000")
    columns = [("harmful_rate", "harmful", True), ("helpfulness_benign", "helpful", False),
               ("over_refusal", "over-refusal", True), ("redirection_share", "redirect", True),
               ("distinct_2", "distinct-2", False), ("mean_reward", "reward", False), ("mean_cost", "cost", False),
               ("cost_positive_rate", "cost>0", True)]
    columns = [c for c in columns if any(c[0] in m for m in result["policies"].values())]
    elo = result["elo"].get(judge, {})
    table.add_column("model")
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for axis in elo:
        table.add_column({"helpfulness": "help Elo", "harmlessness": "harmless Elo"}[axis], justify="right")
    for name in result["models"]:
        metrics = result["policies"][name]
        cells = [_fmt(metrics.get(key), pct) for key, _, pct in columns]
        cells += [f"{_fmt(elo[axis][name]['rating'])} ({_fmt(elo[axis][name]['low'])}-{_fmt(elo[axis][name]['high'])})"
                  for axis in elo]
        table.add_row(name, *cells)
    console.print(table)
