"""Exact resume: a run interrupted (exception, SIGKILL) and resumed ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safealign
import safealign.training.supervised as supervised
from safealign.algorithms.sft import SFTConfig, run
from safealign.training.checkpoint import latest_checkpoint, resolve_resume
from safealign.training.supervised import Step, SupervisedConfig, train


class Crash(RuntimeError):
    pass


def crash_after_saving(monkeypatch, step: int) -> None:
    """Make the engine die right after it has written the checkpoint of `step`."""
    real = supervised.save_checkpoint

    def save_then_crash(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if path.name == f"step-{step}":
            raise Crash(path.name)

    monkeypatch.setattr(supervised, "save_checkpoint", save_then_crash)


def write_arithmetic(path: Path, n: int = 160, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            response = str(a + b) if i % 2 else f"{a} plus {b} makes {a + b}"
            handle.write(json.dumps({"prompt": f"what is {a} plus {b}", "response": response}) + "\n")
    return path


def losses(out: Path) -> list[tuple[int, float]]:
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    return [(h["step"], h[k]) for h in state["log_history"] for k in ("loss", "eval_loss") if k in h]


# ---------------------------------------------------------------------------------------------------------
# A toy regression through the engine: records the data order
# ---------------------------------------------------------------------------------------------------------
class RecordingStep(Step):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def loss(self, model, batch, num_items):
        self.seen.extend(batch["ids"].tolist())
        residual = model(batch["x"]).squeeze(-1) - batch["y"]  # size = (B,)
        return residual.square().sum() / num_items, {"abs_error": residual.abs().sum().detach() / num_items}


def toy_collate(ids: list[int]) -> dict[str, torch.Tensor]:
    ids_t = torch.tensor(ids)
    x = torch.stack([torch.linspace(-1, 1, 4) * (i + 1) / 20 for i in ids])  # size = (B, 4)
    return {"ids": ids_t, "x": x, "y": x.sum(-1) * 0.5 + 0.1}


def toy_run(output_dir: Path, step: RecordingStep, resume: str = "") -> dict:
    torch.manual_seed(0)
    cfg = SupervisedConfig(output_dir=str(output_dir), max_steps=10, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                         learning_rate=0.05, logging_steps=2, save_steps=3, save_total_limit=0, mixed_precision="no", resume=resume)
    return train(cfg, torch.nn.Linear(4, 1), step, list(range(20)), toy_collate)


def test_resume_after_a_crash_replays_the_same_data_order_and_weights(tmp_path, monkeypatch):
    full = RecordingStep()
    full_metrics = toy_run(tmp_path / "full", full)
    crashed, resumed = RecordingStep(), RecordingStep()
    with monkeypatch.context() as patch:
        crash_after_saving(patch, 6)  # mid-epoch (4 steps of 6 examples per epoch) and mid-logging-window
        with pytest.raises(Crash):
            toy_run(tmp_path / "interrupted", crashed)
    resumed_metrics = toy_run(tmp_path / "interrupted", resumed, resume="latest")

    assert len(full.seen) == 10 * 6
    assert crashed.seen + resumed.seen == full.seen  # resumes exactly at step 7's examples
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "full")
    assert resumed_metrics["train_loss"] == full_metrics["train_loss"]
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# SFT on the tiny model
# ---------------------------------------------------------------------------------------------------------
def sft_config(data: Path, out: Path, **overrides) -> SFTConfig:
    values = dict(train_data=str(data), output_dir=str(out), max_steps=8, per_device_train_batch_size=8, logging_steps=4,
                  eval_steps=4, save_steps=3, eval_fraction=0.1, mixed_precision="no")
    return SFTConfig(**{**values, **overrides})


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)


def test_sft_resumed_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    data = write_arithmetic(tmp_path / "train.jsonl")
    full = run(sft_config(data, tmp_path / "full"))
    with monkeypatch.context() as patch:
        crash_after_saving(patch, 6)
        with pytest.raises(Crash):
            run(sft_config(data, tmp_path / "resumed"))
    resumed = run(sft_config(data, tmp_path / "resumed", resume="latest"))

    assert_same_weights(tmp_path / "full" / "model", tmp_path / "resumed" / "model")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    assert resumed["eval_loss"] == full["eval_loss"] and resumed["global_step"] == 8


def test_sft_killed_with_sigkill_resumes_from_the_newest_complete_checkpoint(tmp_path):
    data = write_arithmetic(tmp_path / "train.jsonl")
    out = tmp_path / "killed"
    config_file = tmp_path / "sft.yaml"
    config_file.write_text(f'train_data: {data}\noutput_dir: {out}\nmax_steps: 20\nper_device_train_batch_size: 8\n'
                           'save_steps: 2\nsave_total_limit: 3\nlogging_steps: 1\neval_steps: -1\neval_fraction: 0.1\n'
                           'mixed_precision: "no"\n')
    src = str(Path(safealign.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "safealign.cli", "sft", "--config", str(config_file)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-4").exists():
            assert process.poll() is None, "the training process ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = int(latest_checkpoint(out).name.split("-")[1])
    assert 4 <= killed_at < 20

    cfg = dict(max_steps=20, save_steps=2, save_total_limit=3, logging_steps=1, eval_steps=-1)
    resumed = run(sft_config(data, out, resume="latest", **cfg))
    full = run(sft_config(data, tmp_path / "full", **cfg))
    assert resumed["global_step"] == 20
    assert_same_weights(tmp_path / "full" / "model", out / "model")
    assert losses(out) == losses(tmp_path / "full")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_checkpoints_hold_only_safetensors_and_json_and_are_rotated(tmp_path):
    data = write_arithmetic(tmp_path / "train.jsonl", n=48)
    out = tmp_path / "run"
    run(sft_config(data, out, max_steps=5, save_steps=1, save_total_limit=2, eval_steps=-1))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-4", "step-5"]
    for path in (p for p in (out / "checkpoints").rglob("*") if p.is_file()):
        assert path.suffix in {".safetensors", ".json"}, path
        if path.suffix == ".safetensors":
            load_file(str(path))
        else:
            json.loads(path.read_text())
    assert sorted(p.name for p in (out / "checkpoints" / "step-5").iterdir()) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_state_rank0.json",
        "rng_state_rank0.safetensors", "scheduler.json", "trainer_state.json"]
    for path in out.rglob("*"):  # nothing in the run directory is a pickle
        assert path.suffix not in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, path
        if path.is_file() and "logs" not in path.parts:
            assert path.read_bytes()[:1] != b"\x80", path


def test_latest_checkpoint_ignores_half_written_directories(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ["step-2", "step-10", ".step-12.tmp", "step-x"]:
        (root / name).mkdir(parents=True)
        if name.startswith("step-") and name[5:].isdigit():
            (root / name / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == root / "step-10"
    assert resolve_resume(tmp_path, "latest") == root / "step-10"
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path / "empty", "true") is None
    assert resolve_resume(tmp_path, str(root / "step-2")) == root / "step-2"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_resume(tmp_path, str(root / ".step-12.tmp"))
