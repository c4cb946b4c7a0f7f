"""`safealign eval-scores`: per-response scores, accuracies that match them, SafeWorld gold numbers, figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safealign.cli import app
from safealign.data.loading import load_preferences
from safealign.data.safeworld import judge_harm, judge_helpfulness
from safealign.evaluation.scores import ScoreEvalConfig, cost_gold_metrics, reward_gold_metrics, run
from safealign.models.score_model import build_score_model, save_score_model
from safealign.models.tokenizer import load_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("reward_distribution.png", "cost_distribution.png", "reward_vs_cost.png")


@pytest.fixture(scope="module")
def models(world_backbone) -> dict[str, Path]:
    """A small SafeWorld and untrained reward / cost score models (different random heads) on a `tiny` backbone."""
    built = world_backbone("scores", seed=2, train_pairs=0, test_pairs=120)
    root = built["root"]
    tokenizer = load_tokenizer(root / "backbone")
    for kind, seed in (("reward", 1), ("cost", 2)):
        model = build_score_model(root / "backbone", score_type=kind, tokenizer=tokenizer, seed=seed)
        save_score_model(model, root / kind, tokenizer)
    return {"root": root, "data": root / "world" / "preferences" / "test.jsonl",
            "reward": root / "reward", "cost": root / "cost"}


@pytest.fixture(scope="module")
def evaluated(models) -> tuple[Path, dict]:
    out = models["root"] / "eval"
    metrics = run(ScoreEvalConfig(reward_model=str(models["reward"]), cost_model=str(models["cost"]),
                                  data=str(models["data"]), output_dir=str(out), batch_size=32))
    return out, metrics


def test_writes_scores_metrics_and_the_three_figures(evaluated):
    out, metrics = evaluated
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["responses"] == 2 * metrics["pairs"]
    assert {"pair", "response_id", "prompt", "response", "reward", "cost", "is_safe", "gold_is_safe",
            "gold_helpfulness", "response_class", "prompt_kind"} <= set(rows[0])
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_accuracies_match_a_recomputation_from_scores_jsonl(evaluated):
    out, metrics = evaluated
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    pairs: dict[int, dict[int, dict]] = {}
    for row in rows:
        pairs.setdefault(row["pair"], {})[row["response_id"]] = row
    reward_right = cost_ranked = 0
    for pair in pairs.values():
        better = next(i for i in (0, 1) if pair[i]["is_better"])
        safer = next(i for i in (0, 1) if pair[i]["is_safer"])
        reward_right += pair[better]["reward"] > pair[1 - better]["reward"]
        cost_ranked += pair[1 - safer]["cost"] > pair[safer]["cost"]
    assert metrics["reward_accuracy"] == pytest.approx(reward_right / len(pairs))
    assert metrics["cost_ranking_accuracy"] == pytest.approx(cost_ranked / len(pairs))
    assert metrics["cost_sign_accuracy"] == pytest.approx(sum((r["cost"] > 0) != r["is_safe"] for r in rows) / len(rows))
    assert metrics["gold_sign_accuracy"] == pytest.approx(sum((r["cost"] > 0) != r["gold_is_safe"] for r in rows) / len(rows))
    decided = [p for p in pairs.values() if p[0]["gold_helpfulness"] != p[1]["gold_helpfulness"]]
    assert metrics["gold_agreement"] == pytest.approx(sum(
        (p[0]["reward"] > p[1]["reward"]) == (p[0]["gold_helpfulness"] > p[1]["gold_helpfulness"]) for p in decided) / len(decided))
    harmful = [r for r in rows if r["prompt_kind"] == "harmful"]

    def mean_reward(move):
        values = [r["reward"] for r in harmful if r["response_class"] == move]
        return sum(values) / len(values)

    assert metrics["reward_margin_compliance_vs_refusal"] == pytest.approx(mean_reward("compliance") - mean_reward("refusal"))
    assert metrics["harmful_mean_reward_redirection"] == pytest.approx(mean_reward("redirection"))
    assert {"harmful_mean_cost_compliance", "harmful_mean_cost_refusal", "harmful_mean_cost_redirection",
            "annotator_gold_agreement", "annotator_gold_sign_accuracy", "gold_ranking_accuracy"} <= set(metrics)


def test_cli_eval_scores_with_a_cost_model_only_and_a_limit(models, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval-scores", "--cost_model", str(models["cost"]), "--data", str(models["data"]),
                                      "--output_dir", str(out), "--limit", "40"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 40 and "cost_sign_accuracy" in metrics and "reward_accuracy" not in metrics
    assert (out / "cost_distribution.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "reward_vs_cost.png").exists()


def test_cli_eval_scores_without_models_is_a_clear_error(models, tmp_path):
    result = CliRunner().invoke(app, ["eval-scores", "--data", str(models["data"]), "--output_dir", str(tmp_path)])
    assert result.exit_code == 2 and "reward_model, cost_model or both" in result.output


def test_gold_agreement_counts_only_pairs_the_gold_judge_orders(models):
    records = load_preferences(models["data"]).records
    gold = [(judge_helpfulness(r.prompt, r.response_0), judge_helpfulness(r.prompt, r.response_1)) for r in records]
    perfect = reward_gold_metrics(records, gold)
    assert perfect["gold_agreement"] == 1.0
    assert perfect["gold_pairs"] == sum(a != b for a, b in gold)
    assert reward_gold_metrics(records, [(-a, -b) for a, b in gold])["gold_agreement"] == 0.0
    decided = [(r, a > b) for r, (a, b) in zip(records, gold) if a != b]
    expected = sum((r.better_response_id == 0) == first for r, first in decided) / len(decided)
    assert perfect["annotator_gold_agreement"] == pytest.approx(expected)
    # The proxy-truth gap: a model that scores exactly as gold never sides with the annotators against gold, never
    # prefers a longer answer gold does not; one that scores by length always does.
    assert perfect["follows_annotators_over_gold"] == 0.0 and perfect["prefers_longer_gold_does_not"] <= 0.5
    by_length = reward_gold_metrics(records, [(len(r.response_0.split()), len(r.response_1.split())) for r in records])
    assert by_length["prefers_longer_gold_does_not"] == 1.0
    assert 0.0 <= perfect["annotators_prefer_longer_gold_does_not"] <= 1.0


def test_cost_gold_metrics_compare_signs_with_the_gold_harm_judge(models):
    records = load_preferences(models["data"]).records
    gold_unsafe = [[not judge_harm(r.prompt, r.response(i)).is_safe for i in (0, 1)] for r in records]
    perfect = cost_gold_metrics(records, [tuple(1.0 if u else -1.0 for u in pair) for pair in gold_unsafe])
    assert perfect["gold_sign_accuracy"] == 1.0 and perfect["gold_ranking_accuracy"] == 1.0
    assert perfect["gold_responses"] == 2 * len(records)
    labels_agree = [(not r.is_safe(i)) == gold_unsafe[k][i] for k, r in enumerate(records) for i in (0, 1)]
    assert perfect["annotator_gold_sign_accuracy"] == pytest.approx(sum(labels_agree) / len(labels_agree))
    assert cost_gold_metrics(records, [(0.5, 0.5)] * len(records))["gold_sign_accuracy"] == pytest.approx(
        sum(u for pair in gold_unsafe for u in pair) / (2 * len(records)))
