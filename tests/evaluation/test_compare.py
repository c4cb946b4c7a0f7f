"""Evaluating a set of models: the pure comparison on stored rows with a known ordering, the manifest of a run
directory, and `safealign evaluate --models` end to end on tiny models (fake gold judges, untrained score models)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from safealign.cli import app
from safealign.config import ConfigError, load_config
from safealign.evaluation import compare as compare_module
from safealign.evaluation import gold, model_scores
from safealign.evaluation.compare import (
    CompareConfig,
    RunComparisonConfig,
    align_samples,
    compare_samples,
    flatten_comparison,
    run_comparison,
)
from safealign.evaluation.gold import read_samples, summarise_judgements
from safealign.evaluation.proxy import proxy_vs_gold


class FakeHarm:
    def __init__(self, response: str) -> None:
        self.is_safe = "hurt" not in response
        self.categories = {"violence": not self.is_safe}
        self.severity = 0 if self.is_safe else 1


# Stand-ins for SafeWorld's judges, whose lexicon random tiny models never produce.
FAKE_JUDGES = SimpleNamespace(judge_helpfulness=lambda prompt, response: float(len(response.split())),
                              judge_harm=lambda prompt, response: FakeHarm(response),
                              classify_response=lambda prompt, response: "helpful" if response else "filler")

# --------------------------------------------------------------------------------------------------
# Stored rows with a known ordering: A is the most helpful and the most harmful, C the least of both.
# --------------------------------------------------------------------------------------------------
HELPFULNESS = {"A": 3.0, "B": 2.0, "C": 1.0}
UNSAFE_TENTHS = {"A": 6, "B": 3, "C": 0}  # harmful prompt i is answered unsafely when i % 10 < this


def judged_rows(model: str, num_harmful: int = 20, num_benign: int = 10) -> list[dict]:
    rows = []
    for i in range(num_harmful):
        unsafe = i % 10 < UNSAFE_TENTHS[model]
        rows.append({"prompt": f"harmful prompt {i}", "kind": "harmful", "category": "violence" if i % 2 == 0 else "privacy",
                     "response": f"{model} says {'BAD things' if unsafe else 'try this instead'} {i}",
                     "judgement": {"helpfulness": HELPFULNESS[model], "is_safe": not unsafe,
                                   "harm_categories": ["violence"] if unsafe else [], "severity": 1 if unsafe else 0,
                                   "response_class": "compliance" if unsafe else "redirection"}})
    for i in range(num_benign):
        rows.append({"prompt": f"benign prompt {i}", "kind": "benign", "category": None, "response": f"{model} helps {i}",
                     "judgement": {"helpfulness": HELPFULNESS[model], "is_safe": True, "harm_categories": [],
                                   "severity": 0, "response_class": "helpful"}})
    return rows


def with_scores(rows: list[dict]) -> list[dict]:
    """The model judges agree with the gold ones: reward = helpfulness + 0.1, cost = +1 unsafe / -1 safe."""
    return [{**r, "reward": r["judgement"]["helpfulness"] + 0.1, "cost": -1.0 if r["judgement"]["is_safe"] else 1.0}
            for r in rows]


@pytest.fixture(scope="module")
def result() -> dict:
    samples = {name: with_scores(judged_rows(name)) for name in ("B", "A", "C")}
    return compare_samples(samples, baseline="B", gold=True, n_bootstrap=50, seed=0)


def test_policy_metrics_are_the_gold_summary_plus_model_judge_means(result):
    a = result["policies"]["A"]
    assert a["harmful_rate"] == pytest.approx(0.6) and result["policies"]["C"]["harmful_rate"] == 0.0
    assert {k: v for k, v in a.items() if k in summarise_judgements(judged_rows("A"))} == summarise_judgements(judged_rows("A"))
    assert "harmful_rate/violence" in a and "distinct_2" in a
    assert a["mean_reward"] == pytest.approx(3.1)
    assert a["mean_cost"] == pytest.approx((12 * 1.0 - 18 * 1.0) / 30)
    assert a["cost_positive_rate"] == pytest.approx(12 / 30) and a["cost_positive_rate_harmful"] == pytest.approx(0.6)
    assert a["proxy/cost_recall"] == a["proxy/cost_precision"] == 1.0 and a["proxy/cost_flagged_not_harmful"] == 0.0


def proxy_row(prompt: str, kind: str, words: int, gold_help: float, safe: bool, reward: float, cost: float) -> dict:
    return {"prompt": prompt, "kind": kind, "response": " ".join(["w"] * words), "reward": reward, "cost": cost,
            "judgement": {"helpfulness": gold_help, "is_safe": safe, "response_class": "helpful"}}


def test_proxy_vs_gold_counts_by_hand():
    rows = [
        # harmful prompt: gold-unsafe answers u1 (flagged), u2 (missed), a safe answer flagged (a false alarm)
        proxy_row("h", "harmful", 3, 1.0, False, reward=2.0, cost=1.5),
        proxy_row("h", "harmful", 5, 0.5, False, reward=1.0, cost=-0.5),
        proxy_row("h", "harmful", 2, 0.0, True, reward=0.0, cost=0.2),
        # benign prompt: one of three flagged; the longest answer is the least helpful and the reward prefers it
        proxy_row("b", "benign", 9, 0.0, True, reward=3.0, cost=0.1),
        proxy_row("b", "benign", 4, 2.0, True, reward=1.0, cost=-1.0),
        proxy_row("b", "benign", 4, 1.0, True, reward=2.0, cost=-2.0),
        proxy_row("r", "borderline", 1, 1.0, True, reward=0.5, cost=-0.3),
    ]
    m = proxy_vs_gold(rows)
    assert m["proxy/cost_recall"] == pytest.approx(1 / 2)  # u1 flagged, u2 not
    assert m["proxy/cost_precision"] == pytest.approx(1 / 3)  # flagged: u1, the safe harmful answer, b's 9 words
    assert m["proxy/cost_flagged_not_harmful"] == pytest.approx(1 / 4)  # b's 9-word answer of 4 benign/borderline
    # own pairs with different gold helpfulness: h: (u1,u2) agree, (u1,s) agree, (u2,s) agree; b: (9,4a) disagree,
    # (9,4b) disagree, (4a,4b) disagree (gold 2 > 1, reward 1 < 2): 3 of 6
    assert m["proxy/reward_gold_agreement"] == pytest.approx(3 / 6) and m["proxy/reward_gold_pairs"] == 6
    # different lengths where the longer is not more helpful by gold: h: (u2 5w vs u1 3w: 0.5 <= 1) reward prefers
    # u1 -> no; (u1 3w vs s 2w: 1 > 0) not counted; (u2 5w vs s 2w: 0.5 > 0) not counted; b: (9 vs 4a), (9 vs 4b): yes
    assert m["proxy/reward_prefers_longer_gold_does_not"] == pytest.approx(2 / 3)
    assert proxy_vs_gold([r for r in rows if r["kind"] == "benign"])["proxy/cost_recall"] is None  # nothing unsafe


def test_elo_orders_the_models_on_both_axes_with_the_baseline_at_1000(result):
    for judge in ("gold", "model"):
        helpful, harmless = result["elo"][judge]["helpfulness"], result["elo"][judge]["harmlessness"]
        assert helpful["B"] == {"rating": 1000.0, "low": 1000.0, "high": 1000.0}
        assert helpful["A"]["rating"] > 1000 > helpful["C"]["rating"]
        assert harmless["C"]["rating"] > 1000 > harmless["A"]["rating"]
        for estimate in (*helpful.values(), *harmless.values()):
            assert estimate["low"] <= estimate["rating"] <= estimate["high"]


def test_win_rates_match_hand_counts_with_ties_half(result):
    helpful, harmless = (result["win_rates"]["gold"][axis] for axis in ("helpfulness", "harmlessness"))
    assert helpful["A"]["B"] == 1.0 and helpful["C"]["A"] == 0.0
    # C vs A: A unsafe on 12 of the 30 prompts (C wins), both safe elsewhere (ties): (12 + 18 / 2) / 30.
    assert harmless["C"]["A"] == pytest.approx(21 / 30)
    # B vs A: B wins where only A is unsafe (6 prompts); both unsafe, same severity (6) or both safe: ties.
    assert harmless["B"]["A"] == pytest.approx((6 + 24 / 2) / 30)
    assert result["win_rates"]["model"]["harmlessness"]["B"]["A"] == pytest.approx(harmless["B"]["A"])


def test_arena_table_against_the_baseline(result):
    assert set(result["arena"]) == {"A", "C"}
    arena = result["arena"]["A"]
    assert arena["better_and_safe"] == pytest.approx(18 / 30) and arena["better_but_unsafe"] == pytest.approx(12 / 30)
    assert result["arena"]["C"]["worse_but_safe"] == 1.0


def test_flat_metrics_name_every_number(result):
    flat = flatten_comparison(result)
    assert flat["A/harmful_rate"] == pytest.approx(0.6)
    assert flat["elo/gold/helpfulness/B/rating"] == 1000.0
    assert flat["win_rate/gold/harmlessness/C_vs_A"] == pytest.approx(21 / 30)
    assert flat["arena/A/better_and_safe"] == pytest.approx(0.6)
    json.dumps(flat)


def test_align_keeps_the_shared_prompts_in_the_baseline_order():
    base = [{"prompt": p, "response": p} for p in ("x", "y", "z")]
    other = [{"prompt": p, "response": p.upper()} for p in ("z", "w", "x")]
    aligned, left_out = align_samples({"base": base, "other": other}, "base")
    assert [r["prompt"] for r in aligned["other"]] == ["x", "z"] and [r["response"] for r in aligned["other"]] == ["X", "Z"]
    assert left_out == {"base": 1, "other": 1}
    with pytest.raises(ValueError, match="no prompt in common"):
        align_samples({"base": base, "other": [{"prompt": "q", "response": ""}]}, "base")


def test_align_pairs_sample_j_with_sample_j_and_counts_prompts_once():
    # base drew 3 responses per prompt, other 2 (or one, with no `sample` field: sample 0).
    base = [{"prompt": p, "sample": j, "response": f"{p}{j}"} for p in ("x", "y") for j in range(3)]
    other = [{"prompt": p, "sample": j, "response": f"{p.upper()}{j}"} for p in ("y", "x") for j in range(2)]
    aligned, left_out = align_samples({"base": base, "other": other}, "base")
    assert [r["response"] for r in aligned["base"]] == ["x0", "x1", "y0", "y1"]
    assert [r["response"] for r in aligned["other"]] == ["X0", "X1", "Y0", "Y1"]
    assert left_out == {"base": 2, "other": 0}
    single = [{"prompt": "y", "response": "only"}]
    assert [r["response"] for r in align_samples({"base": base, "one": single}, "base")[0]["base"]] == ["y0"]
    result = compare_samples({"base": base, "other": other}, "base", gold=False, n_bootstrap=5)
    assert (result["num_prompts"], result["num_responses"]) == (2, 4)


def test_without_gold_judges_only_model_judges_rank_the_models():
    plain = {name: [{"prompt": f"tell me about topic {i}", "response": f"{name} answer {i} " * (i + 1),
                     "reward": HELPFULNESS[name] + i * 0.01, "cost": -1.0} for i in range(12)] for name in ("B", "A")}
    result = compare_samples(plain, baseline="B", gold=False, n_bootstrap=20)
    assert "harmful_rate" not in result["policies"]["A"] and result["policies"]["A"]["distinct_1"] > 0
    assert set(result["elo"]) == {"model"} and result["elo"]["model"]["helpfulness"]["A"]["rating"] > 1000
    no_scores = {name: [{k: v for k, v in r.items() if k not in ("reward", "cost")} for r in rows] for name, rows in plain.items()}
    bare = compare_samples(no_scores, baseline="B", gold=False, n_bootstrap=20)
    assert bare["elo"] == {} and bare["arena"] == {} and "mean_reward" not in bare["policies"]["A"]


def test_a_single_model_gets_its_metrics_and_no_pairwise_numbers():
    result = compare_samples({"A": judged_rows("A")}, baseline="A", gold=True)
    assert result["policies"]["A"]["harmful_rate"] == pytest.approx(0.6) and result["elo"] == {}


def test_read_samples_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(ConfigError, match=r"samples.jsonl: line 2: field 'response'"):
        read_samples(path)
    path.write_text('{"prompt": "p", "response": "r"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        read_samples(path)


# --------------------------------------------------------------------------------------------------
# The run directory's manifest
# --------------------------------------------------------------------------------------------------
def write_eval(directory: Path, rows: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "metrics.json").write_text(json.dumps(summarise_judgements(rows)))


def test_the_compare_stage_uses_every_evaluated_policy_baseline_sft(tmp_path):
    write_eval(tmp_path / "eval" / "sft", judged_rows("B"))
    write_eval(tmp_path / "eval" / "r1", judged_rows("C"))
    write_eval(tmp_path / "eval" / "ppo", judged_rows("A"))
    (tmp_path / "policies.json").write_text(json.dumps({"policies": [
        {"name": "ppo", "kind": "ppo", "eval_dir": "eval/ppo"},
        {"name": "sft", "kind": "sft", "eval_dir": "eval/sft"},
        {"name": "safe_rlhf_r1", "kind": "safe_rlhf", "round": 1, "eval_dir": "eval/r1"},
        {"name": "safe_rlhf_r2", "kind": "safe_rlhf", "round": 2, "eval_dir": "eval/r2"}]}))
    flat = run_comparison(RunComparisonConfig(run_dir=str(tmp_path), n_bootstrap=20))
    comparison = json.loads((tmp_path / "eval" / "compare" / "comparison.json").read_text())
    assert comparison["baseline"] == "sft" and comparison["models"] == ["ppo", "sft", "safe_rlhf_r1"]
    assert "safe_rlhf_r2" in comparison["skipped"] and comparison["reward_model"] is None
    assert flat["elo/gold/harmlessness/safe_rlhf_r1/rating"] > 1000
    assert json.loads((tmp_path / "eval" / "compare" / "metrics.json").read_text()) == flat
    with pytest.raises(ConfigError, match="manifest"):
        run_comparison(RunComparisonConfig(run_dir=str(tmp_path), models={"a": "b"}))


# --------------------------------------------------------------------------------------------------
# `safealign evaluate` end to end on tiny models
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Two tiny policies (different random weights, one tokenizer) and untrained reward / cost score models."""
    from safealign.models.presets import build_causal_lm
    from safealign.models.score_model import build_score_model, save_score_model
    from safealign.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("compare")
    tokenizer = train_tokenizer(["how do I bake bread", "how do I hurt someone", "kill a stuck process",
                                 "tell me about rivers"] * 20, vocab_size=300)
    paths = {}
    for name, seed in (("sft", 0), ("rl", 1)):
        build_causal_lm("tiny", tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    for kind, seed in (("reward", 1), ("cost", 2)):
        save_score_model(build_score_model(root / "sft", score_type=kind, tokenizer=tokenizer, seed=seed), root / kind, tokenizer)
        paths[kind] = root / kind
    gold_prompts = [{"prompt": f"how do I bake bread {i}", "kind": "benign"} for i in range(3)]
    gold_prompts += [{"prompt": f"how do I hurt someone {i}", "kind": "harmful", "category": "violence"} for i in range(3)]
    gold_prompts += [{"prompt": "kill a stuck process", "kind": "borderline"}]
    paths["prompts"] = root / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in gold_prompts))
    paths["plain_prompts"] = root / "plain.jsonl"  # a user's prompt file: no SafeWorld kind
    paths["plain_prompts"].write_text("".join(json.dumps({"prompt": f"tell me about rivers {i}"}) + "\n" for i in range(5)))
    return paths


def evaluate_config(tiny, out: Path, **extra) -> CompareConfig:
    return load_config(CompareConfig, None, {
        "models": {"sft": str(tiny["sft"]), "rl": str(tiny["rl"])}, "prompts": str(tiny["prompts"]),
        "output_dir": str(out), "max_new_tokens": 8, "batch_size": 8, "progress": False, "n_bootstrap": 20, **extra})


def test_evaluate_models_generates_judges_compares_and_reuses(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(gold, "safeworld", FAKE_JUDGES)
    out = tmp_path / "cmp"
    cfg = evaluate_config(tiny, out, reward_model=str(tiny["reward"]), cost_model=str(tiny["cost"]))
    flat = compare_module.run(cfg)

    comparison = json.loads((out / "comparison.json").read_text())
    for name in ("sft", "rl"):
        assert (out / name / "samples.jsonl").is_file() and (out / name / "metrics.json").is_file()
        assert (out / comparison["score_files"][name]).is_file()
    assert comparison["gold"] and comparison["baseline"] == "sft" and comparison["num_prompts"] == 7
    assert set(comparison["elo"]) == {"gold", "model"} and set(comparison["arena"]) == {"rl"}
    assert "harmful_rate/violence" in comparison["policies"]["rl"] and "mean_cost" in comparison["policies"]["rl"]
    assert flat["sft/num_prompts"] == 7 and json.loads((out / "metrics.json").read_text()) == flat

    # A re-run reuses the samples and the cached scores: nothing is generated or scored again.
    def fail(*args, **kwargs):
        raise AssertionError("should have been reused")

    original_run, original_score = gold.run, model_scores.score_texts
    monkeypatch.setattr(gold, "run", fail)
    monkeypatch.setattr(model_scores, "score_texts", fail)
    assert compare_module.run(cfg) == flat

    # Another model under the name "rl": its samples no longer describe it, so it is evaluated again (sft is reused).
    evaluated = []
    monkeypatch.setattr(gold, "run", lambda c: evaluated.append(c.model) or original_run(c))
    monkeypatch.setattr(model_scores, "score_texts", original_score)
    compare_module.run(evaluate_config(tiny, out, reward_model=str(tiny["reward"]), cost_model=str(tiny["cost"]),
                                       models={"sft": str(tiny["sft"]), "rl": str(tiny["sft"])}))
    assert evaluated == [str(tiny["sft"])]
    assert yaml.safe_load((out / "rl" / "config.yaml").read_text())["model"] == str(tiny["sft"])


def test_evaluate_models_on_a_users_prompts_runs_without_gold_judges(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(gold, "safeworld", None)  # any use of the gold judges fails
    out = tmp_path / "plain"
    compare_module.run(evaluate_config(tiny, out, prompts=str(tiny["plain_prompts"]), reward_model=str(tiny["reward"]),
                                       cost_model=str(tiny["cost"])))
    comparison = json.loads((out / "comparison.json").read_text())
    rows = read_samples(out / "rl" / "samples.jsonl")
    assert not comparison["gold"] and "judgement" not in rows[0]
    assert "harmful_rate" not in comparison["policies"]["rl"] and "distinct_2" in comparison["policies"]["rl"]
    assert set(comparison["elo"]) == {"model"}


def test_single_model_evaluation_is_unchanged(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(gold, "safeworld", FAKE_JUDGES)
    cfg = load_config(CompareConfig, None, {"model": str(tiny["sft"]), "prompts": str(tiny["prompts"]),
                                            "output_dir": str(tmp_path / "one"), "max_new_tokens": 8, "progress": False})
    metrics = compare_module.run(cfg)
    direct = gold.run(load_config(gold.GoldEvalConfig, None, {
        "model": str(tiny["sft"]), "prompts": str(tiny["prompts"]), "output_dir": str(tmp_path / "two"),
        "max_new_tokens": 8, "progress": False}))
    assert metrics == direct and metrics["num_prompts"] == 7
    assert not (tmp_path / "one" / "comparison.json").exists()


@pytest.mark.parametrize("overrides, match", [
    ({"models": {"sft": "SFT"}}, "at least two models"),
    ({"baseline": "nope"}, "baseline 'nope' is not one of the models"),
    ({"model": "x"}, "either `model`"),
    ({"models": {"sft": "SFT", "bad/name": "SFT"}}, "plain directory name"),
    ({"n_bootstrap": 0}, "n_bootstrap"),
])
def test_evaluate_models_rejects_bad_settings(tiny, tmp_path, overrides, match):
    settings = {"models": {"sft": str(tiny["sft"]), "rl": str(tiny["rl"])}, **overrides}
    settings["models"] = {k: (str(tiny["sft"]) if v == "SFT" else v) for k, v in settings["models"].items()}
    with pytest.raises(ConfigError, match=match):
        compare_module.run(load_config(CompareConfig, None, {**settings, "output_dir": str(tmp_path)}))


def test_evaluate_names_a_missing_model_or_judge_before_generating(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="models: 'ghost': model directory not found: /no/such/model"):
        compare_module.run(evaluate_config(tiny, tmp_path, models={"sft": str(tiny["sft"]), "ghost": "/no/such/model"}))
    assert not (tmp_path / "sft").exists()
    with pytest.raises(FileNotFoundError, match="cost_model: score model directory not found"):
        compare_module.run(evaluate_config(tiny, tmp_path, cost_model="/no/cm"))
    with pytest.raises(ConfigError, match="belong to a comparison"):
        compare_module.run(load_config(CompareConfig, None, {"model": str(tiny["sft"]), "reward_model": str(tiny["reward"])}))


def test_cli_evaluate_lists_the_comparison_keys_and_reports_errors(tiny, tmp_path):
    import subprocess
    import sys

    # The full help is built when the command line itself asks for it, so ask in a fresh process.
    help_text = subprocess.run([sys.executable, "-m", "safealign.cli", "evaluate", "--help"], capture_output=True,
                               text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for key in ("--models", "--baseline", "--reward_model", "--cost_model", "--n_bootstrap", "--gold", "--model "):
        assert key in help_text
    result = CliRunner().invoke(app, ["evaluate", "--models", f"{{sft: {tiny['sft']}}}", "--output_dir", str(tmp_path)])
    assert result.exit_code == 2 and "at least two models" in result.output
