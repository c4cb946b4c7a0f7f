"""FSDP2 on two gloo CPU ranks: the reward model trains as under DDP, its saved model is the trained one, its checkpoints
are DDP's kind and a run resumed from one ends where the uninterrupted run does."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safealign
from safealign.algorithms.preference_model import load_pair_splits
from safealign.algorithms.reward import RewardConfig, RewardStep
from safealign.data.collate import collate_pairs
from safealign.data.formatting import tokenize_pairs
from safealign.models.score_model import load_score_model
from safealign.models.tokenizer import load_tokenizer


def _train_losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def _rm(torchrun, world: dict[str, Path], out: Path, env: dict[str, str], cli: Path, save_steps: int = 0,
        resume: str = "") -> subprocess.CompletedProcess:
    """4 steps of rm on two ranks with the instrumented CLI (save_steps 0: one checkpoint, at the end)."""
    args = ["--model", str(world["backbone"]), "--train_data", str(world["train"]), "--eval_data", str(world["test"]),
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--adam_epsilon", "1e-6", "--mixed_precision", "'no'", "--eval_on_start", "true",
            "--eval_steps", "-1", "--save_steps", str(save_steps), *(["--resume", resume] if resume else [])]
    return torchrun(cli, "rm", *args, env=env, timeout=300)


def _env(two_ranks_env: dict[str, str]) -> dict[str, str]:
    src = str(Path(safealign.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           **two_ranks_env}
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "EXIT_AFTER_CHECKPOINT"):
        env.pop(name, None)
    return env


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _log_history(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def fsdp2_run(world_backbone, tmp_path_factory, instrumented_cli, torchrun) -> tuple[dict[str, Path], Path, str]:
    """One uninterrupted 4-step rm run under FSDP2 on two gloo ranks (checkpoints at steps 2 and 4): its world,
    directory and stderr, which DDP's run and a resumed one are compared with."""
    if torch.cuda.device_count() >= 2:
        pytest.skip("checks the CPU path (Accelerate itself picks FSDP on GPUs)")
    world = world_backbone("fsdp", seed=0, train_pairs=120, test_pairs=40)
    out = tmp_path_factory.mktemp("fsdp2") / "straight"
    result = _rm(torchrun, world, out, {**_env({"CUDA_VISIBLE_DEVICES": ""}), **FSDP2}, instrumented_cli, save_steps=2)
    assert result.returncode == 0, result.stderr[-4000:]
    return world, out, result.stderr


@pytest.mark.slow  # ~20 s: a two-rank DDP run (and the shared FSDP2 run)
def test_fsdp2_on_two_cpu_ranks_trains_like_ddp_and_saves_the_trained_model(tmp_path, two_ranks_env, instrumented_cli,
                                                                            fsdp2_run, torchrun):
    world, fsdp, fsdp_stderr = fsdp2_run
    ddp = tmp_path / "ddp"
    # It ran under FSDP (Accelerate alone would have fallen back to DDP on CPU ranks): the checkpoint was gathered.
    assert "save_trained: FSDP2-sharded model" in fsdp_stderr and "unsharded" not in fsdp_stderr
    result = _rm(torchrun, world, ddp, _env(two_ranks_env), instrumented_cli, save_steps=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "save_trained: unsharded model" in result.stderr

    # The checkpoint gathered from the shards is the kind DDP writes: the same files, keys, shapes, optimizer
    # structure (parameters numbered, as optimizer.state_dict() numbers them), and close values.
    checkpoint, ddp_checkpoint = fsdp / "checkpoints" / "step-4", ddp / "checkpoints" / "step-4"
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(p.name for p in ddp_checkpoint.iterdir())
    for name in ("model", "optimizer", "rng_state_rank1"):
        tensors, ddp_tensors = load_file(str(checkpoint / f"{name}.safetensors")), load_file(str(ddp_checkpoint / f"{name}.safetensors"))
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in ddp_tensors.items()}, name
        if name != "rng_state_rank1":
            for key, tensor in ddp_tensors.items():
                torch.testing.assert_close(tensors[key], tensor, atol=1e-5, rtol=0)
    for name in ("optimizer.json", "scheduler.json"):
        assert json.loads((checkpoint / name).read_text()) == json.loads((ddp_checkpoint / name).read_text()), name

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
    _, _, _, eval_records = load_pair_splits(cfg)
    tokenizer = load_tokenizer(str(fsdp / "model"))
    pairs = tokenize_pairs(tokenizer, eval_records, cfg.max_length)
    loader = [collate_pairs(pairs[i:i + 16], tokenizer.pad_token_id) for i in range(0, len(pairs), 16)]

    class OneProcess:
        gather_for_metrics = staticmethod(lambda x: x)

    with torch.no_grad():
        reloaded = RewardStep(cfg.l2_coeff).evaluate(load_score_model(fsdp / "model").eval(), loader, OneProcess)
    for name in ("loss", "accuracy", "better_score", "worse_score"):
        assert reloaded[name] == pytest.approx(metrics[f"eval_{name}"], abs=1e-5), name


@pytest.mark.slow  # ~40 s: two two-rank runs (and the shared uninterrupted one)
def test_fsdp2_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_does(tmp_path, two_ranks_env, instrumented_cli,
                                                                              fsdp2_run, torchrun):
    """4 steps straight under FSDP2, against a run whose ranks exit right after checkpoint step-2 and a `resume latest`
    from it: every process reads the full checkpoint and keeps its shard of the weights and AdamW state."""
    world, straight, _ = fsdp2_run
    env = {**_env(two_ranks_env), **FSDP2}
    resumed = tmp_path / "resumed"
    result = _rm(torchrun, world, resumed, {**env, "EXIT_AFTER_CHECKPOINT": "step-2"}, instrumented_cli, save_steps=2)
    assert result.returncode != 0 and "save_trained: FSDP2-sharded model" in result.stderr
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-2"] and not (resumed / "model").exists()
    result = _rm(torchrun, world, resumed, env, instrumented_cli, save_steps=2, resume="latest")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stderr and "at step 2" in result.stderr

    # Measured here: the logged losses and evaluation equal to the last bit, the final weights too.
    history, straight_history = _log_history(resumed / "checkpoints" / "step-4"), _log_history(straight / "checkpoints" / "step-4")
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    for entry, straight_entry in zip(history, straight_history, strict=True):
        assert entry.keys() == straight_entry.keys()
        for key in entry.keys() - {"tokens_per_second"}:
            assert entry[key] == pytest.approx(straight_entry[key], abs=1e-6), (entry["step"], key)
    weights, straight_weights = load_file(str(resumed / "model" / "model.safetensors")), load_file(str(straight / "model" / "model.safetensors"))
    assert weights.keys() == straight_weights.keys()
    for key, tensor in straight_weights.items():
        torch.testing.assert_close(weights[key], tensor, atol=1e-6, rtol=0)
    metrics, straight_metrics = json.loads((resumed / "metrics.json").read_text()), json.loads((straight / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_accuracy", "initial_eval_loss"):
        assert metrics[key] == pytest.approx(straight_metrics[key], abs=1e-6), key
