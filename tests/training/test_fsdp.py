"""FSDP2 on two gloo CPU ranks: the reward model trains as under DDP and its saved model is the trained one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safealign
from safealign.algorithms.reward import RewardConfig, RewardStep, _load_splits, collate_pairs, tokenize_pairs
from safealign.models.score_model import load_score_model
from safealign.models.tokenizer import load_tokenizer

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def _train_losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def _rm(world: dict[str, Path], out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["--model", str(world["backbone"]), "--train_data", str(world["train"]), "--eval_data", str(world["test"]),
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--adam_epsilon", "1e-6", "--mixed_precision", "'no'", "--eval_on_start", "true",
            "--eval_steps", "-1", "--save_steps", "0"]  # save_steps 0: a checkpoint under DDP, a warning under FSDP
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "safealign.cli", "rm", *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # ~40 s: two two-rank runs (FSDP2, then DDP to compare with)
@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_fsdp2_on_two_cpu_ranks_trains_like_ddp_and_saves_the_trained_model(world_backbone, tmp_path, two_ranks_env):
    if two_ranks_env.get("CUDA_VISIBLE_DEVICES") != "":
        pytest.skip("checks the CPU path (Accelerate itself picks FSDP on GPUs)")
    world = world_backbone("fsdp", seed=0, train_pairs=120, test_pairs=40)
    src = str(Path(safealign.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           **two_ranks_env}
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        env.pop(name, None)
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    result = _rm(world, fsdp, {**env, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert result.returncode == 0, result.stderr[-4000:]
    # It ran under FSDP (Accelerate alone would have fallen back to DDP on CPU ranks): no checkpoint, only the model.
    assert "under DistributedType.FSDP only the final model is saved" in result.stderr
    assert not (fsdp / "checkpoints").exists()
    result = _rm(world, ddp, env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (ddp / "checkpoints" / "step-4").is_dir()

    metrics = json.loads((fsdp / "metrics.json").read_text())
    ddp_metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert metrics["eval_loss"] < metrics["initial_eval_loss"], metrics  # it learned
    # Full sharding computes DDP's update, up to the order of float sums. Measured here: losses equal, weights within
    # 1.2e-7; on the quick profile's SFT model (rm, 4 steps of 16 pairs) losses within 1.2e-7, weights within 3.2e-6.
    losses, ddp_losses = _train_losses(fsdp), _train_losses(ddp)
    assert len(losses) == 4 and losses == pytest.approx(ddp_losses, abs=1e-5)
    assert metrics["eval_loss"] == pytest.approx(ddp_metrics["eval_loss"], abs=1e-5)
    weights, ddp_weights = load_file(str(fsdp / "model" / "model.safetensors")), load_file(str(ddp / "model" / "model.safetensors"))
    assert weights.keys() == ddp_weights.keys()
    for key, tensor in ddp_weights.items():
        torch.testing.assert_close(weights[key], tensor, atol=1e-5, rtol=0)

    # The saved model (gathered from the shards) gives the scores the sharded model evaluated with in the run.
    cfg = RewardConfig(model=str(world["backbone"]), train_data=str(world["train"]), eval_data=str(world["test"]))
    _, _, _, eval_records = _load_splits(cfg)
    tokenizer = load_tokenizer(str(fsdp / "model"))
    pairs = tokenize_pairs(tokenizer, eval_records, cfg.max_length)
    loader = [collate_pairs(pairs[i:i + 16], tokenizer.pad_token_id) for i in range(0, len(pairs), 16)]

    class OneProcess:
        gather_for_metrics = staticmethod(lambda x: x)

    with torch.no_grad():
        reloaded = RewardStep(cfg.l2_coeff).evaluate(load_score_model(fsdp / "model").eval(), loader, OneProcess)
    for name in ("loss", "accuracy", "better_score", "worse_score"):
        assert reloaded[name] == pytest.approx(metrics[f"eval_{name}"], abs=1e-5), name
