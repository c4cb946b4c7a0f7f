"""`safealign seeds`: one pipeline process per seed (in parallel), then the summary; failures name their logs.

The pipelines here run only the world stage at a tiny size: the point is the orchestration (seeds, directories,
processes, resume, errors), not what the runs learn (tests/pipeline/test_pipeline.py runs every stage)."""

from __future__ import annotations

import json

import pytest
import yaml

from safealign.config import ConfigError, StageFailed, load_config
from safealign.pipeline.config import PipelineConfig
from safealign.pipeline.seeds import SeedsConfig, child_env, pipeline_config, run
from safealign.pipeline.stages import expand_stages

TINY_WORLD = {"sft_examples": 60, "train_pairs": 30, "test_pairs": 6, "redteam_prompts": 14}


def seeds_config(tmp_path, **overrides) -> SeedsConfig:
    return load_config(SeedsConfig, None, {"output_dir": str(tmp_path / "seeds"), "stages": ["world"], "world": TINY_WORLD,
                                           **overrides})


def test_each_seed_gets_the_pipeline_config_with_its_seed_and_directory(tmp_path):
    cfg = seeds_config(tmp_path, seeds=[3, 4], profile="quick", cm={"splice_fraction": 1.0})
    one = pipeline_config(cfg, 4)
    assert isinstance(one, PipelineConfig) and one.seed == 4 and one.output_dir == str(tmp_path / "seeds" / "seed-4")
    assert one.profile == "quick" and one.cm == {"splice_fraction": 1.0} and one.world == TINY_WORLD


def test_seeds_run_in_parallel_processes_then_are_summarised(tmp_path):
    cfg = seeds_config(tmp_path, seeds=[3, 4], jobs=2)
    metrics = run(cfg)

    root = tmp_path / "seeds"
    worlds = {}
    for seed in (3, 4):
        out = root / f"seed-{seed}"
        assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == seed
        assert yaml.safe_load((root / f"seed-{seed}.yaml").read_text())["output_dir"] == str(out)
        assert "world" in (out / "pipeline.log").read_text()
        worlds[seed] = json.loads((out / "world" / "world.json").read_text())
        assert worlds[seed]["seed"] == seed
        assert metrics[f"seed-{seed}/time_s"] > 0
    assert (root / "seed-3" / "world" / "prompts" / "train.jsonl").read_text() != (
        root / "seed-4" / "world" / "prompts" / "train.jsonl").read_text()  # different seeds, different worlds
    summary = json.loads((root / "seeds.json").read_text())
    assert summary["runs"] == {f"seed-{s}": {"run_dir": str(root / f"seed-{s}"), "seed": s} for s in (3, 4)}
    assert summary["metrics"]["world/train_pairs"]["values"] == {"seed-3": 30, "seed-4": 30}
    assert metrics["runs"] == 2 and (root / "seeds.html").is_file()
    progress = json.loads((root / "seed-3" / "progress.json").read_text())
    assert progress["stage"] is None and progress["number"] == progress["stages"] == 1  # the pipeline finished
    assert yaml.safe_load((root / "config.yaml").read_text())["seeds"] == [3, 4]

    # The same command again: both pipelines finished with these settings, so no process starts; the summary is redone.
    logs = {s: (root / f"seed-{s}" / "pipeline.log").read_text() for s in (3, 4)}
    assert run(cfg)["seed-3/time_s"] == 0.0
    assert logs == {s: (root / f"seed-{s}" / "pipeline.log").read_text() for s in (3, 4)}
    # An interrupted seed (its progress.json names a stage) runs again and skips what it had done.
    before = (root / "seed-4" / "world" / "world.json").stat().st_mtime_ns
    (root / "seed-4" / "progress.json").write_text(json.dumps({"stage": "world", "number": 1, "stages": 1}))
    assert run(cfg)["seed-4/time_s"] > 0 and (root / "seed-4" / "world" / "world.json").stat().st_mtime_ns == before
    assert "started with other settings" not in (root / "seed-4" / "pipeline.log").read_text()
    # Other settings in the same directory: each pipeline says so (its done stages are kept).
    run(seeds_config(tmp_path, seeds=[3], world={**TINY_WORLD, "train_pairs": 40}))
    assert "was started with other settings (world)" in (root / "seed-3" / "pipeline.log").read_text()


def test_a_failing_seed_names_its_log_and_the_command_fails(tmp_path):
    cfg = seeds_config(tmp_path, seeds=[0, 1], jobs=2, stages=["sft"], sft_data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(StageFailed, match=r"2 of 2 pipelines failed \(seed 0: .*seed-0/pipeline.log, seed 1: ") as err:
        run(cfg)
    assert "Re-run the same command" in str(err.value)
    assert "missing.jsonl" in (tmp_path / "seeds" / "seed-0" / "pipeline.log").read_text()  # the child's own error


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": []}, "at least one seed"),
    ({"seeds": [1, 1]}, "each seed once"),
    ({"jobs": 0}, "jobs must be >= 1"),
    ({"harmful_target": 5}, r"harmful_target is a rate in \[0, 1\]"),
    ({"stages": ["wrld"]}, r"unknown pipeline stage\(s\) \['wrld'\]"),
    ({"rounds": 2, "round_thresholds": [0.0]}, "round_thresholds has 1 values for 2 rounds"),
])
def test_bad_settings_fail_before_any_process_starts(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(seeds_config(tmp_path, **overrides))
    assert not (tmp_path / "seeds").exists()


def test_the_pipeline_knows_every_stage_of_its_defaults():
    expanded = expand_stages(PipelineConfig())  # an unknown name would raise
    for name in PipelineConfig().stages:
        assert any(stage == name or stage.startswith(f"{name}/") or stage.startswith("round") for stage in expanded), name


def test_parallel_jobs_share_the_cores_and_take_one_gpu_each():
    assert child_env({"PATH": "/bin"}, jobs=1, slot=0, num_gpus=8, num_cpus=16) == {"PATH": "/bin"}  # one job: untouched
    four = [child_env({}, jobs=4, slot=s, num_gpus=2, num_cpus=16) for s in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in four] == ["0", "1", "0", "1"] and {e["OMP_NUM_THREADS"] for e in four} == {"4"}
    assert "CUDA_VISIBLE_DEVICES" not in child_env({}, jobs=8, slot=3, num_gpus=1, num_cpus=16)  # one GPU: all share it
    assert child_env({"CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": "1"}, jobs=2, slot=1, num_gpus=8, num_cpus=2) == {
        "CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": "1"}  # the user's own settings win
