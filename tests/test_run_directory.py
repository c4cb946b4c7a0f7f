"""The run directory's manifest (policies.json): what it holds, errors that name the file, entry and field, and the
fixed layout of a run directory without one."""

from __future__ import annotations

import json

import pytest

from safealign.config import ConfigError
from safealign.run_directory import Manifest, PolicyEntry, ValueModelEntry, load_manifest, write_manifest


def test_manifest_errors_name_the_file_entry_and_field(tmp_path):
    path = tmp_path / "policies.json"
    path.write_text(json.dumps({"policies": [{"name": "sft", "kind": "sft"}]}))
    with pytest.raises(ConfigError, match=r"policies.json: policies\[0\]: field 'eval_dir' is required"):
        load_manifest(tmp_path)
    path.write_text(json.dumps({"policies": [{"name": "sft", "kind": "sft", "eval_dir": "e", "round": "one"}]}))
    with pytest.raises(ConfigError, match="field 'round': expected a number"):
        load_manifest(tmp_path)
    path.write_text(json.dumps({"policies": [{"name": "a", "kind": "sft", "eval_dir": "e"}] * 2}))
    with pytest.raises(ConfigError, match=r"policies\[1\]: field 'name': 'a' appears twice"):
        load_manifest(tmp_path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_manifest_reads_entries_and_ignores_unknown_fields(tmp_path):
    (tmp_path / "policies.json").write_text(json.dumps({
        "policies": [{"name": "sft", "kind": "sft", "model": "sft/model", "eval_dir": "eval/sft", "future": 1},
                     {"name": "shaping_nu1", "kind": "shaping", "nu": 1, "eval_dir": "eval/shaping/nu-1"}],
        "value_models": [{"reward_model": "rm/model", "cost_model": "cm/model", "scores_dir": "eval/scores"}]}))
    manifest = load_manifest(tmp_path)
    assert manifest.source == "policies.json" and [p.name for p in manifest.policies] == ["sft", "shaping_nu1"]
    assert manifest.policies[1].nu == 1.0 and manifest.value_models[0].round == 1


def test_without_a_manifest_the_single_round_layout_is_discovered(tmp_path):
    for directory in ("sft/model", "ppo_lag/model", "eval/sft", "shaping/nu-0.5", "eval/shaping/nu-2", "rm/model"):
        (tmp_path / directory).mkdir(parents=True)
    manifest = load_manifest(tmp_path)
    assert manifest.source == "discovered"
    assert [p.name for p in manifest.policies] == ["sft", "safe_rlhf_r1", "shaping_nu0.5", "shaping_nu2"]
    assert manifest.policies[1].kind == "safe_rlhf" and manifest.policies[1].eval_dir == "eval/ppo_lag"
    assert manifest.value_models[0].reward_model == "rm/model"


def test_a_written_manifest_reads_back_with_only_the_set_fields(tmp_path):
    manifest = Manifest([PolicyEntry("sft", "sft", "sft/model", "sft", "eval/sft"),
                         PolicyEntry("safe_rlhf_r2", "safe_rlhf", "round2/ppo_lag/model", "round2/ppo_lag", "eval/round2",
                                     round=2, threshold=-1.0)],
                        [ValueModelEntry(1, "rm/model", "cm/model", "eval/scores")], "policies.json")
    write_manifest(tmp_path, manifest)
    raw = json.loads((tmp_path / "policies.json").read_text())
    assert "round" not in raw["policies"][0] and raw["policies"][1]["threshold"] == -1.0
    assert load_manifest(tmp_path) == manifest
