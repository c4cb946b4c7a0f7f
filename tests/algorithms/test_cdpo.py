"""C-DPO (algorithms/cdpo.py): the dual step, and two iterations on a tiny policy sharing one reference pass."""

from __future__ import annotations

import json

import pytest

from safealign.algorithms import cdpo, dpo
from safealign.algorithms.cdpo import CDPOConfig, dual_step, run
from safealign.config import ConfigError


def test_the_dual_step_is_projected_gradient_ascent():
    assert dual_step(1.0, mean_cost=0.5, threshold=0.0, lambda_lr=2.0) == pytest.approx(2.0)  # over the bound: λ grows
    assert dual_step(1.0, mean_cost=-0.2, threshold=0.0, lambda_lr=2.0) == pytest.approx(0.6)  # under it: λ shrinks
    assert dual_step(0.1, mean_cost=-1.0, threshold=0.0, lambda_lr=1.0) == 0.0  # never below 0


def test_two_dual_iterations_share_one_reference_and_follow_the_sampled_cost(tiny, tmp_path, monkeypatch):
    cfg = CDPOConfig(model=tiny.actor, train_data=str(tiny.root / "world" / "preferences" / "train.jsonl"),
                     eval_fraction=0.0, output_dir=str(tmp_path / "cdpo"), reward_model=tiny.reward_model,
                     cost_model=tiny.cost_model, lagrange=1.0, lambda_lr=0.5, threshold=0.0, iterations=2,
                     num_prompts=4, max_new_tokens=8, max_steps=2, per_device_train_batch_size=8, learning_rate=3e-3,
                     warmup_ratio=0.0, save_steps=-1, mixed_precision="no")
    passes = []
    original = dpo.reference_log_probs
    monkeypatch.setattr(dpo, "reference_log_probs", lambda *a, **k: passes.append(1) or original(*a, **k))
    metrics = run(cfg)
    assert len(passes) == 1  # iteration 1 reads iteration 0's reference log-probs
    history = json.loads((tmp_path / "cdpo" / "dual.json").read_text())
    assert [h["lagrange"] for h in history] == [1.0, pytest.approx(history[0]["next_lagrange"])]
    for h in history:
        assert h["next_lagrange"] == pytest.approx(max(0.0, h["lagrange"] + 0.5 * h["cost"]))
    assert metrics["final_lambda"] == pytest.approx(history[1]["next_lagrange"])
    last = (tmp_path / "cdpo" / "iter-1" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "cdpo" / "model" / "model.safetensors").read_bytes() == last
    # a restart skips the finished iterations (no DPO run, no sampling)
    monkeypatch.setattr(dpo, "run", lambda *a, **k: pytest.fail("a finished iteration ran again"))
    monkeypatch.setattr(cdpo, "sampled_cost", lambda *a, **k: pytest.fail("a finished iteration sampled again"))
    assert run(cfg)["final_lambda"] == metrics["final_lambda"]


def test_cdpo_refuses_other_variants(tiny, tmp_path):
    with pytest.raises(ConfigError, match="always cdpo"):
        CDPOConfig(variant="dpo", reward_model=tiny.reward_model, cost_model=tiny.cost_model)
