"""RLAIF on real text: the prompt split (across benchmarks, near-duplicates out of training), `safealign annotate` (PKU
rows with soft labels, the label cache), and `safealign rlaif` end to end on tiny local models (its stages, the report,
a rerun that relabels nothing)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safealign.cli import app
from safealign.config import ConfigError
from safealign.data import real_splits
from safealign.data.loading import load_preferences
from safealign.data.real_benchmarks import BenchmarkPrompt
from safealign.data.real_splits import RealPromptsConfig, split_prompts
from safealign.pipeline.ai_annotation import AnnotateConfig, read_cache
from safealign.pipeline.ai_annotation import run as annotate
from safealign.pipeline.rlaif import RLAIFConfig, paired_difference
from safealign.pipeline.rlaif import run as rlaif


def fake_benchmarks(monkeypatch):
    """Small synthetic sets in place of the installed packages; one AdvBench prompt is a rewording of a HarmBench one."""
    def texts(tag, n):  # no word shared between two prompts: no near-duplicates but the planted one
        return [f"{tag}{i} alpha{tag}{i} beta{tag}{i} gamma{tag}{i} delta{tag}{i}" for i in range(n)]

    sets = {"harmbench": texts("hb", 6), "advbench": ["hb3 alphahb3 betahb3 gammahb3 deltahb3 now"] + texts("ab", 7),
            "donotanswer": texts("dna", 6), "edgy": texts("edgy", 10), "benign": texts("benign", 40)}
    kinds = {"edgy": "borderline", "benign": "benign"}

    def load(name, limit=None):
        prompts = [BenchmarkPrompt(name, f"{name}/{i}", text, kinds.get(name, "harmful")) for i, text in enumerate(sets[name])]
        return prompts[:limit] if limit is not None else prompts

    monkeypatch.setattr(real_splits, "load_benchmark", load)


def test_harmful_prompts_are_split_across_benchmarks_and_near_duplicates_leave_training(monkeypatch):
    fake_benchmarks(monkeypatch)
    cfg = RealPromptsConfig(train_per_benchmark=0, test_per_benchmark=6, train_edgy=3, train_benign=4)
    train, test, dropped = split_prompts(cfg)
    assert {p.benchmark for p in train if p.kind == "harmful"} == {"advbench"}
    assert {p.benchmark for p in test if p.kind == "harmful"} == {"harmbench", "donotanswer"}
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert [d["train"] for d in dropped] == ["advbench/0"] and dropped[0]["test"] == "harmbench/3"
    assert "advbench/0" not in {p.id for p in train} and sum(p.benchmark == "advbench" for p in train) == 7
    assert sum(p.kind == "borderline" for p in train) == 3 and sum(p.kind == "benign" for p in train) == 4
    assert split_prompts(cfg)[0] == train  # seeded
    with pytest.raises(ConfigError, match="held-out prompts must come from other benchmarks"):
        RealPromptsConfig(train_harmful=["advbench"], test_harmful=["advbench"])


def test_the_real_prompt_files_from_the_installed_packages(tmp_path):
    metrics = real_splits.run(RealPromptsConfig(output_dir=str(tmp_path), train_per_benchmark=30, test_per_benchmark=10,
                                                train_edgy=5, train_benign=5))
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert metrics["test_per_benchmark"] == {"harmbench": 10, "donotanswer": 10, "edgy": 10, "benign": 10}
    assert metrics["train"] == 40 - metrics["near_duplicates_dropped"] and len(rows) == 40
    assert {"prompt", "kind", "benchmark", "id"} <= set(rows[0])


def write_prompts(path, n=3):
    kinds = ["harmful", "benign", "borderline"]
    path.write_text("".join(json.dumps({"prompt": f"how do I fix tap {i}?", "kind": kinds[i % 3]}) + "\n" for i in range(n)))


def test_annotate_writes_pku_rows_and_a_second_run_takes_every_label_from_the_cache(tiny_policy_and_judge, tmp_path):
    prompts, cache = tmp_path / "prompts.jsonl", tmp_path / "labels.jsonl"
    write_prompts(prompts)
    common = dict(model=str(tiny_policy_and_judge["policy"]), prompts=str(prompts), max_new_tokens=6, device="cpu",
                  annotator=f"llm:{tiny_policy_and_judge['judge']}", label_cache=str(cache))
    first = annotate(AnnotateConfig(output_dir=str(tmp_path / "a"), **common))
    assert first["pairs"] == 3 and first["labelled_now"] == 3 and len(read_cache(cache)) == 3
    rows = load_preferences(tmp_path / "a" / "preferences.jsonl")  # the project's loader reads them
    assert len(rows) == 3
    raw = [json.loads(line) for line in (tmp_path / "a" / "preferences.jsonl").read_text().splitlines()]
    assert all(0 <= r["better_probability"] <= 1 and r["annotator"] == common["annotator"] for r in raw)
    # another run directory, the same pairs (pairs.jsonl copied) and cache, another threshold: nothing is relabelled,
    # and the safety labels follow the new threshold from the cached probabilities
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pairs.jsonl").write_bytes((tmp_path / "a" / "pairs.jsonl").read_bytes())
    (tmp_path / "b" / "config.yaml").write_bytes((tmp_path / "a" / "config.yaml").read_bytes())
    second = annotate(AnnotateConfig(output_dir=str(tmp_path / "b"), unsafe_threshold=0.0, **common))
    assert second["labelled_now"] == 0 and second["from_cache"] == 3
    again = [json.loads(line) for line in (tmp_path / "b" / "preferences.jsonl").read_text().splitlines()]
    assert [r["better_probability"] for r in again] == [r["better_probability"] for r in raw]
    assert not any(r["is_response_0_safe"] or r["is_response_1_safe"] for r in again)  # P(unsafe) >= 0 everywhere


def test_annotate_refuses_a_calibration_without_an_unsafe_question(tiny_policy_and_judge, tmp_path):
    spec = f"llm:{tiny_policy_and_judge['judge']}"
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"judge": spec, "prompt_version": 1, "thresholds": {"objective": 0.4}, "tasks": {
        "objective": {"question": "complies", "auroc": 0.8, "second_half": {"accuracy": 0.7}, "n": 10}}}))
    with pytest.raises(ConfigError, match="calibrates no `unsafe` question"):
        annotate(AnnotateConfig(prompts="p.jsonl", annotator=spec, annotator_calibration=str(calibration)))


def test_the_paired_difference_is_over_shared_prompts():
    def rows(values):
        return [{"prompt": p, "kind": "harmful", "llm_judgement": {"harmful": v}} for p, v in values]
    before = rows([("a", True), ("a", True), ("b", False), ("c", True)])
    after = rows([("a", False), ("a", True), ("b", False)])
    mean, low, high, shared = paired_difference(before, after, "harmful", "harmful")
    assert shared == 2 and mean == pytest.approx(((0.5 - 1.0) + 0.0) / 2) and low <= mean <= high


def test_rlaif_end_to_end_on_tiny_models_and_a_rerun_labels_nothing(tiny_policy_and_judge, tmp_path):
    judge = f"llm:{tiny_policy_and_judge['judge']}"
    cfg = RLAIFConfig(
        output_dir=str(tmp_path / "run"), model=str(tiny_policy_and_judge["policy"]), annotator=judge, judge=judge,
        prompts={"train_per_benchmark": 3, "train_edgy": 2, "train_benign": 2, "test_per_benchmark": 2},
        calibrate_judge={"limit": 6, "bootstrap": 20}, calibrate_annotator={"limit": 6, "bootstrap": 20},
        annotate={"max_new_tokens": 6, "device": "cpu"},
        rm={"max_steps": 1, "eval_fraction": 0.2}, cm={"max_steps": 1, "eval_fraction": 0.2},
        ppo_lag={"max_steps": 1, "per_device_prompt_batch_size": 4, "per_device_train_batch_size": 4,
                 "max_new_tokens": 6},
        evaluate={"max_new_tokens": 6, "device": "cpu"})
    result = rlaif(cfg)
    root = tmp_path / "run"
    for stage in ("prompts", "judge_calibration", "annotator_calibration", "annotate", "rm", "cm", "ppo_lag",
                  "eval/start", "eval/ppo_lag"):
        assert (root / stage).is_dir(), stage
    ppo_config = (root / "ppo_lag" / "config.yaml").read_text()
    assert "actor_layout: lora" in ppo_config and "critic_layout: lora" in ppo_config
    calibration = json.loads((root / "annotator_calibration" / "calibration.json").read_text())
    assert calibration["tasks"]["hand-objective"]["question"] == "unsafe"
    annotated = json.loads((root / "annotate" / "metrics.json").read_text())
    assert annotated["unsafe_threshold"] == calibration["thresholds"]["hand-objective"]
    report = json.loads((root / "rlaif_report.json").read_text())
    table = report["sections"][0]["blocks"][0]
    assert [row[0] for row in table["rows"]][1] == "Safe RLHF from AI feedback (ppo_lag)" and len(table["rows"]) == 2
    assert any("same model" in note for note in report["notes"])
    assert (root / "rlaif_report.html").is_file() and result["judge"] == judge
    # a rerun: every stage is done, nothing is sampled or labelled again
    labels = (root / "annotate" / "labels.jsonl").read_bytes()
    again = CliRunner().invoke(app, ["rlaif", "--output_dir", str(root), "--model", cfg.model, "--annotator", judge,
                                     "--judge", judge])
    assert again.exit_code == 0, again.output
    assert "skip annotate" in again.output and (root / "annotate" / "labels.jsonl").read_bytes() == labels


def test_a_bad_stage_setting_fails_before_anything_runs(tmp_path):
    cfg = RLAIFConfig(output_dir=str(tmp_path / "run"), annotator="llm:x", judge="llm:y", ppo_lag={"device": "cpu"})
    with pytest.raises(ConfigError, match="rlaif setting 'ppo_lag': unknown key 'device'"):
        rlaif(cfg)
    with pytest.raises(ConfigError, match="unknown stage"):
        rlaif(RLAIFConfig(output_dir=str(tmp_path / "run"), stages=["sft"]))
    assert not (tmp_path / "run").exists()
