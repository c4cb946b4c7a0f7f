"""The pipeline's flat metrics.json and the tables it prints at the end."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from safealign.console import stderr_console
from safealign.pipeline.config import PipelineConfig, num_rounds
from safealign.pipeline.stages import round_stage, round_threshold

console = stderr_console()

HEADLINE = {
    "rm": ["eval_accuracy"],
    "cm": ["eval_ranking_accuracy", "eval_sign_accuracy"],
    "eval_scores": ["reward_accuracy", "gold_agreement", "cost_sign_accuracy", "gold_sign_accuracy",
                    "reward_margin_compliance_vs_refusal"],
    "ppo_lag": ["lagrange_multiplier", "episode_cost", "kl", "reward"],
    "ppo": ["kl", "reward"],
}
# The policy table: one row per evaluated policy, gold-judged on the test prompts.
POLICY_METRICS = ["harmful_rate", "harmful_rate_low", "harmful_rate_high", "helpfulness_benign", "helpfulness_harmful",
                  "over_refusal", "redirection_share"]  # _low/_high: the 95% Wilson interval of the harmful rate
# round{k}/<metric> in metrics.json: the same names for round 1 (evaluate_ppo_lag, ppo_lag) and later rounds.
ROUND_HEADLINE = {"evaluate": ["harmful_rate", "helpfulness_benign", "over_refusal", "redirection_share"],
                  "ppo_lag": ["lagrange_multiplier", "episode_cost"]}
# The rounds table: (column, step of round k, metric); the redteam step measures the policy entering round k.
ROUND_COLUMNS = [("d", None, "threshold"), ("harmful", "evaluate", "harmful_rate"),
                 ("helpful", "evaluate", "helpfulness_benign"), ("over-refusal", "evaluate", "over_refusal"),
                 ("λ", "ppo_lag", "lagrange_multiplier"), ("J_C", "ppo_lag", "episode_cost"),
                 ("new pairs", "redteam", "pairs"), ("red-team unsafe", "redteam", "redteam_unsafe_rate"),
                 ("labels' precision (gold)", "redteam", "label_unsafe_precision_gold"),
                 ("RM gold", "eval_scores", "gold_agreement"), ("CM gold sign", "eval_scores", "gold_sign_accuracy")]


def summarise(cfg: PipelineConfig, results: dict[str, dict], timings: dict[str, float],
              cpu_timings: dict[str, float]) -> dict[str, Any]:
    """One flat JSON object: `<stage>/<metric>` for every stage's numbers, stage run times (wall, CPU), and
    `round{k}/<metric>` for the headline numbers of every round (`ROUND_HEADLINE`)."""
    flat: dict[str, Any] = {}
    for stage, metrics in results.items():
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                flat[f"{stage}/{key}"] = value
    for stage, seconds in timings.items():
        flat[f"time_s/{stage}"] = seconds
    for stage, seconds in cpu_timings.items():
        flat[f"cpu_time_s/{stage}"] = seconds
    flat.update(_round_headlines(cfg, flat))
    return flat


def _round_headlines(cfg: PipelineConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """round{k}/<metric> (ROUND_HEADLINE) and round{k}/threshold of every round whose results are in `summary`."""
    flat: dict[str, Any] = {}
    for k in range(1, num_rounds(cfg) + 1):
        for step, keys in ROUND_HEADLINE.items():
            flat.update({f"round{k}/{key}": summary[f"{round_stage(k, step)}/{key}"] for key in keys
                         if f"{round_stage(k, step)}/{key}" in summary})
        if f"{round_stage(k, 'ppo_lag')}/global_step" in summary:  # d as the stage used it (threshold_quantile computes it)
            flat[f"round{k}/threshold"] = summary.get(f"{round_stage(k, 'ppo_lag')}/threshold", round_threshold(cfg, k))
    return flat


def _policy_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(policy name, metric prefix) of every evaluated policy in the summary, SFT first."""
    rows = [(name, f"evaluate_{name}/") for name in ("sft", "ppo", "ppo_lag")
            if f"evaluate_{name}/harmful_rate" in summary]
    later = sorted({int(key.split("/")[0].removeprefix("round")) for key in summary
                    if key.startswith("round") and key.endswith("/evaluate/harmful_rate")})
    rows += [(f"ppo_lag r{k}", f"round{k}/evaluate/") for k in later]
    nus = sorted({key.split("/")[1] for key in summary if key.startswith("evaluate_shaping/nu=")},
                 key=lambda s: float(s.removeprefix("nu=")))
    rows += [(f"shaping {nu}", f"evaluate_shaping/{nu}/") for nu in nus]
    return rows


def _format(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_rounds(summary: dict[str, Any], rounds: int) -> None:
    present = [k for k in range(1, rounds + 1) if f"round{k}/threshold" in summary or f"round{k}/harmful_rate" in summary]
    if not any(k > 1 for k in present):
        return
    table = Table(title="Safe RLHF rounds: harmful, helpful (benign), over-refusal by the gold judges on the test "
                        "prompts; red-team unsafe = the policy entering the round, by the previous round's cost model")
    table.add_column("round")
    for column, _, _ in ROUND_COLUMNS:
        table.add_column(column, justify="right")
    for k in present:
        def value(step: str | None, key: str) -> Any:
            return summary.get(f"round{k}/{key}" if step is None else f"{round_stage(k, step)}/{key}")
        table.add_row(str(k), *[_format(value(step, key)) for _, step, key in ROUND_COLUMNS])
    console.print(table)


def print_summary(summary: dict[str, Any], rounds: int = 1) -> None:
    _print_rounds(summary, rounds)
    policies = _policy_rows(summary)
    if policies:
        table = Table(title="Policies, judged by SafeWorld's gold judges on the test prompts (a simulation)")
        table.add_column("policy")
        for key in POLICY_METRICS:
            table.add_column(key, justify="right")
        for name, prefix in policies:
            table.add_row(name, *[_format(summary.get(prefix + key)) for key in POLICY_METRICS])
        console.print(table)
    table = Table(title="safealign pipeline (SafeWorld is a simulation: numbers are measured by its gold judges)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for stage, keys in HEADLINE.items():
        for key in keys:
            value = summary.get(f"{stage}/{key}")
            if value is not None:
                table.add_row(f"{stage}/{key}", f"{value:.3f}" if isinstance(value, float) else str(value))
    for key, value in summary.items():
        if key.startswith(("time_s/", "cpu_time_s/")):
            table.add_row(key, f"{value:.1f}")
    console.print(table)
