"""The summary over runs: statistics, the claims checked per run and counted, and the files, on hand-made run
directories whose numbers are known (a real pipeline run is summarised in tests/pipeline/test_pipeline.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safealign.cli import app
from safealign.config import ConfigError
from safealign.evaluation.aggregate import AggregateConfig, aggregate, check_claims, describe
from safealign.evaluation.report.document import unshown_cells


def test_describe_gives_sample_statistics_over_the_runs_with_a_value():
    stats = describe({"a": 0.1, "b": 0.3, "c": None, "d": 0.2})
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(0.2)
    assert stats["std"] == pytest.approx(0.1)  # sample std (n − 1): sqrt((0.01 + 0.01 + 0) / 2)
    assert (stats["min"], stats["max"]) == (0.1, 0.3) and stats["values"]["c"] is None
    one = describe({"a": 2.0})
    assert one["std"] is None and one["mean"] == 2.0
    assert describe({"a": None})["n"] == 0 and describe({"a": None})["mean"] is None


def claims_by_key(**kwargs) -> dict:
    args = {"sft": {"harmful_rate": 0.5, "helpfulness_benign": 2.0, "over_refusal": 0.10},
            "rounds": [{"harmful_rate": 0.08}, {"harmful_rate": 0.05},
                       {"harmful_rate": 0.03, "helpfulness_benign": 2.0, "over_refusal": 0.12}],
            "ppo": {"harmful_rate": 0.9}, "shaping": [{"policy": "nu1", "helpfulness_benign": 1.5, "harmful_rate": 0.01}],
            "harmful_target": 0.03, "over_refusal_margin": 0.02,
            "final_proxy": {"proxy/cost_recall_at_d": 0.9, "proxy/cost_precision_at_d": 0.8,
                            "proxy/cost_flagged_not_harmful_at_d": 0.05, "d": -2.0}, **kwargs}
    return {c.key: c for c in check_claims(**args)}


def test_claims_hold_at_their_boundaries():
    claims = claims_by_key()
    assert all(c.met is True for c in claims.values()), {k: c.shown for k, c in claims.items()}
    assert claims["harmful_at_most_target"].shown == "3.0%"  # exactly the target: met
    assert claims["over_refusal_within_margin"].shown == "12.0% vs 10.0%"  # SFT + 2 points exactly: met
    assert claims["harmful_falls_every_round"].shown == "8.0% → 5.0% → 3.0%"
    assert claims["beyond_shaping_frontier"].shown == "not dominated by 1 ν"
    assert claims["cost_model_sees_final_policy"].shown == "recall 90.0%, precision 80.0%, flags 5.0% (d = -2)"


def test_claims_fail_where_the_numbers_say():
    rounds = [{"harmful_rate": 0.05}, {"harmful_rate": 0.05},
              {"harmful_rate": 0.031, "helpfulness_benign": 1.99, "over_refusal": 0.121}]
    claims = claims_by_key(rounds=rounds, ppo={"harmful_rate": 0.02},
                           shaping=[{"policy": "nu1", "helpfulness_benign": 2.5, "harmful_rate": 0.031}],
                           final_proxy={"proxy/cost_recall_at_d": 0.95, "proxy/cost_precision_at_d": 0.9,
                                        "proxy/cost_flagged_not_harmful_at_d": 0.051})
    assert {k: c.met for k, c in claims.items()} == {
        "harmful_at_most_target": False, "helpfulness_at_least_sft": False, "over_refusal_within_margin": False,
        "harmful_falls_every_round": False, "harmful_never_rises": True,  # 5 → 5 → 3.1: flat, then down
        "ppo_more_harmful": False, "beyond_shaping_frontier": False,
        "cost_model_sees_final_policy": False}  # one benign flag too many
    for key, value in (("recall", 0.89), ("precision", 0.79)):
        proxy = {"proxy/cost_recall_at_d": 0.9, "proxy/cost_precision_at_d": 0.8, "proxy/cost_flagged_not_harmful_at_d": 0.0}
        assert claims_by_key(final_proxy={**proxy, f"proxy/cost_{key}_at_d": value})["cost_model_sees_final_policy"].met is False
    assert claims["beyond_shaping_frontier"].shown == "dominated by nu1"  # as helpful or more, as harmful: dominates


def test_claims_a_run_cannot_decide_are_not_counted():
    claims = claims_by_key(ppo=None, shaping=[], rounds=[{"harmful_rate": 0.2, "helpfulness_benign": 2.1, "over_refusal": 0.1}])
    assert claims["ppo_more_harmful"].met is None and claims["ppo_more_harmful"].shown == "n/a"
    assert claims["beyond_shaping_frontier"].met is None
    assert claims["harmful_falls_every_round"].met is None  # one round: no trajectory
    assert claims_by_key(final_proxy=None)["cost_model_sees_final_policy"].met is None  # no compare stage yet
    assert claims["harmful_at_most_target"].met is False and claims["helpfulness_at_least_sft"].met is True
    assert all(c.met is None for c in check_claims(None, [], None, [], 0.03, 0.02))


# Three runs: (SFT, round 1, round 2, PPO) harmful rates; helpfulness and over-refusal follow from the seed.
RUNS = {0: (0.50, 0.10, 0.02, 0.90), 1: (0.40, 0.08, 0.09, 0.95), 2: (0.45, 0.06, 0.04, None)}


def make_run(root: Path, seed: int) -> Path:
    sft, r1, r2, ppo = RUNS[seed]
    policies = [("sft", "sft", None, sft), ("safe_rlhf_r1", "safe_rlhf", 1, r1), ("safe_rlhf_r2", "safe_rlhf", 2, r2)]
    if ppo is not None:
        policies.append(("ppo", "ppo", None, ppo))
    manifest = {"policies": [{"name": n, "kind": k, "round": r, "eval_dir": f"eval/{n}", "model": f"{n}/model"}
                             for n, k, r, _ in policies]}
    run_dir = root / f"seed-{seed}"
    for name, _, _, harmful in policies:
        (run_dir / "eval" / name).mkdir(parents=True)
        (run_dir / "eval" / name / "metrics.json").write_text(json.dumps({
            "harmful_rate": harmful, "helpfulness_benign": 2.0 + 0.1 * seed, "over_refusal": 0.1,
            "redirection_share": 0.5, "distinct_2": 0.3}))
    (run_dir / "policies.json").write_text(json.dumps(manifest))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "output_dir": str(run_dir)}))
    (run_dir / "metrics.json").write_text(json.dumps({
        "eval_scores/gold_agreement": 0.85 + 0.01 * seed, "round2/eval_scores/gold_sign_accuracy": 0.99,
        "time_s/sft": 60.0 * (seed + 1), "round2/ppo_lag/lagrange_multiplier": 0.1 * (seed + 1), "note": "not a number"}))
    elo = {axis: {n: {"rating": 1000.0 + (10.0 * seed if n != "sft" else 0.0), "low": 0, "high": 0} for n, *_ in policies}
           for axis in ("helpfulness", "harmlessness")}
    (run_dir / "eval" / "compare").mkdir(parents=True)
    # round 2's models on round 2's answers (own) and on round 1's (next); recall 0.9 + 0.05 * seed
    proxy = [{"policy": "safe_rlhf_r2", "round": 2, "judged_by": "own", "value_models_round": 2, "d": 0.0,
              "proxy/cost_recall_at_d": 0.9 + 0.05 * seed, "proxy/cost_precision_at_d": 0.85,
              "proxy/cost_flagged_not_harmful_at_d": 0.01, "proxy/cost_recall": 0.9 + 0.05 * seed},
             {"policy": "safe_rlhf_r1", "round": 1, "judged_by": "next", "value_models_round": 2, "d": 0.0,
              "proxy/cost_recall": 0.5}]
    (run_dir / "eval" / "compare" / "comparison.json").write_text(json.dumps({"elo": {"gold": elo}, "proxy_by_round": proxy}))
    (run_dir / "world").mkdir()  # a SafeWorld run
    return run_dir


def test_aggregate_counts_claims_and_summarises_every_number(tmp_path):
    dirs = [str(make_run(tmp_path, seed)) for seed in RUNS]
    out = tmp_path / "summary"
    summary = aggregate(AggregateConfig(run_dirs=dirs, output_dir=str(out), harmful_target=0.05))

    assert summary["runs"] == {f"seed-{s}": {"run_dir": d, "seed": s} for s, d in zip(RUNS, dirs)}
    claims = summary["claims"]
    assert (claims["harmful_at_most_target"]["met"], claims["harmful_at_most_target"]["runs"]) == (2, 3)  # 2%, 4% ≤ 5%; 9% not
    assert (claims["harmful_falls_every_round"]["met"], claims["harmful_falls_every_round"]["runs"]) == (2, 3)  # seed 1 rises
    assert (claims["ppo_more_harmful"]["met"], claims["ppo_more_harmful"]["runs"]) == (2, 2)  # seed 2 has no PPO: not counted
    assert claims["helpfulness_at_least_sft"]["met"] == 3
    assert claims["beyond_shaping_frontier"]["runs"] == 0
    assert claims["harmful_falls_every_round"]["per_run"]["seed-1"] == {"met": False, "shown": "8.0% → 9.0%"}

    final = summary["policies"]["safe_rlhf_r2"]["harmful_rate"]
    assert final["n"] == 3 and final["mean"] == pytest.approx(0.05) and final["std"] == pytest.approx(statistics.stdev([0.02, 0.09, 0.04]))
    assert (final["min"], final["max"]) == (0.02, 0.09)
    assert summary["policies"]["ppo"]["harmful_rate"]["n"] == 2
    assert summary["policies"]["safe_rlhf_r1"]["elo_helpfulness"]["mean"] == pytest.approx(1010.0)
    assert summary["rounds"]["rounds"] == [0, 1, 2]
    assert summary["rounds"]["stats"]["0"]["harmful_rate"]["mean"] == pytest.approx(0.45)
    assert summary["rounds"]["per_run"]["harmful_rate"]["seed-1"] == [0.40, 0.08, 0.09]
    assert summary["value_models"]["1"]["eval_scores/gold_agreement"]["mean"] == pytest.approx(0.86)
    assert summary["value_models"]["2"]["eval_scores/gold_sign_accuracy"]["mean"] == pytest.approx(0.99)
    assert summary["value_models"]["2"]["ppo_lag/lagrange_multiplier"]["max"] == pytest.approx(0.3)
    assert summary["value_models"]["2"]["own/proxy/cost_recall"]["mean"] == pytest.approx(0.95)
    assert summary["value_models"]["2"]["next/proxy/cost_recall"]["mean"] == pytest.approx(0.5)
    assert summary["value_models"]["1"]["own/proxy/cost_recall"]["n"] == 0
    assert (claims["cost_model_sees_final_policy"]["met"], claims["cost_model_sees_final_policy"]["runs"]) == (3, 3)
    assert summary["metrics"]["time_s/sft"]["mean"] == pytest.approx(120.0) and "note" not in summary["metrics"]

    # The three files: the same numbers in HTML, Markdown and JSON, the figure embedded and on disk.
    on_disk = json.loads((out / "seeds.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    page, markdown = (out / "seeds.html").read_text(), (out / "seeds.md").read_text()
    assert (out / "seeds" / "rounds.png").stat().st_size > 0 and page.count("data:image/png;base64,") == 1
    numeric, missing = unshown_cells(summary, page, markdown)
    assert numeric > 100 and missing == []
    assert "simulation" in page.lower()
    assert not any("share seed" in note for note in summary["notes"])
    twice = aggregate(AggregateConfig(run_dirs=[dirs[0], dirs[0] + "/"], output_dir=str(tmp_path / "twice")))
    assert any("share seed 0" in note for note in twice["notes"])


def test_aggregate_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="run_dirs is empty"):
        aggregate(AggregateConfig(run_dirs=[], output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"harmful_target is a rate in \[0, 1\] \(0.03 = 3%\), got 3.0"):
        aggregate(AggregateConfig(run_dirs=[str(tmp_path)], output_dir=str(tmp_path), harmful_target=3.0))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        aggregate(AggregateConfig(run_dirs=[str(tmp_path / "nowhere")], output_dir=str(tmp_path)))
    empty = tmp_path / "fresh"
    empty.mkdir()
    summary = aggregate(AggregateConfig(run_dirs=[str(empty)], output_dir=str(tmp_path / "out")))  # a run not started yet
    assert all(c["runs"] == 0 for c in summary["claims"].values()) and summary["policies"] == {}
    assert any("No run has an evaluated" in note for note in summary["notes"])


def test_cli_aggregate_prints_the_claim_counts(tmp_path):
    dirs = [str(make_run(tmp_path, seed)) for seed in RUNS]
    result = CliRunner().invoke(app, ["aggregate", "--run_dirs", json.dumps(dirs), "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["runs"] == 3 and out["claims/harmful_at_most_target"] == "1/3" and out["claims/ppo_more_harmful"] == "2/2"
    result = CliRunner().invoke(app, ["aggregate", "--run_dirs", json.dumps([str(tmp_path / "nowhere")])])
    assert result.exit_code == 2 and "run directory not found" in result.output
