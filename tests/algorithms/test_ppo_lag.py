"""PPO-Lagrangian on tiny real models: λ follows the constraint, its state resumes exactly, ranks agree."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import safealign
from safealign.algorithms.losses import combined_advantage
from safealign.algorithms.lagrangian import cost_quantile
from safealign.algorithms.ppo_lag import PPOLag, PPOLagConfig, run
from safealign.config import ConfigError
from safealign.data.loading import load_preferences
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.training import rl
from safealign.training.rl import Experience
from tiny_rl import FAST, TinySetup, assert_same_weights, crash_rl_update, expected_lambdas, history, lag_config  # noqa: E402  (tests/algorithms is on sys.path)


def test_lambda_update_uses_the_window_and_the_actor_gets_the_combined_advantage():
    cfg = PPOLagConfig(episode_cost_window_size=5, lambda_lr=0.1, threshold=0.5, lambda_update_delay_steps=1)
    step = PPOLag(cfg)
    single = SimpleNamespace(process_index=0, num_processes=1, device="cpu", gather=lambda t: t)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    def batch(costs):
        return Experience({"scores_cost": torch.tensor(costs), "response_mask": mask,
                           "reward_advantages": torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [-1.0, 0.5, 2.0]]),
                           "cost_advantages": torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])}, 1)
    # Step 0 is inside the delay: the window fills, λ stays λ_0 = 1.
    first = batch([1.0, 2.0, 3.0])
    logs = step.lagrangian.update(first["scores_cost"], single, 0)
    first["advantages"] = step.actor_advantages(first)
    assert logs["lagrange_multiplier"] == 1.0 and logs["episode_cost"] == pytest.approx(2.0)
    torch.testing.assert_close(first["advantages"], combined_advantage(first["reward_advantages"], first["cost_advantages"], 1.0))
    # Step 1: the window keeps the last 5 costs [2, 3, 4, 5, 6] -> J_C = 4 > d: λ rises, once.
    second = batch([4.0, 5.0, 6.0])
    logs = step.lagrangian.update(second["scores_cost"], single, 1)
    second["advantages"] = step.actor_advantages(second)
    assert step.lagrangian.episode_cost_windows.tolist() == [[2.0, 3.0, 4.0, 5.0, 6.0]]
    assert logs["episode_cost"] == pytest.approx(4.0)
    assert logs["log_lambda"] == pytest.approx(0.1 * 1.0 * (4.0 - 0.5))
    lam = math.exp(0.35)
    assert logs["lagrange_multiplier"] == pytest.approx(lam)
    expected = [[(r - lam * c) / (1 + lam) for r, c in zip(rr, cr)] for rr, cr in
                zip(second["reward_advantages"].tolist(), second["cost_advantages"].tolist())]
    assert [v for row in second["advantages"].tolist() for v in row] == pytest.approx([v for row in expected for v in row])
    # The state round-trips.
    restored = PPOLag(cfg)
    restored.load_state_dict(step.state_dict())
    assert restored.lagrangian.log_lambda == step.lagrangian.log_lambda
    assert torch.equal(restored.lagrangian.episode_cost_windows, step.lagrangian.episode_cost_windows)


@pytest.mark.parametrize("bias, direction", [(5.0, "rises"), (-5.0, "falls")])
def test_lambda_rises_when_the_cost_exceeds_the_threshold_and_falls_below(tiny, tmp_path, bias, direction):
    out = tmp_path / direction
    metrics = run(lag_config(tiny, out, cost_model=tiny.score_model("cost", bias), max_steps=4, lambda_update_delay_steps=1,
                             save_steps=-1, sample_steps=0))
    logged = json.loads((out / "metrics.json").read_text())
    assert logged["global_step"] == 4 and logged["unsafe_fraction"] == (1.0 if bias > 0 else 0.0)
    assert metrics["episode_cost"] == pytest.approx(bias, abs=1e-3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs")).Reload()
    lambdas = [e.value for e in events.Scalars("train/lagrange_multiplier")]
    assert lambdas[0] == 1.0  # the update delay: λ_0 for the first step
    # log λ ← log λ + α·λ·(C − d); at +5 it reaches λ_max = 5 and stays there.
    expected = expected_lambdas(bias, steps=4, delay=1)  # the delay keeps λ_0 for the first step
    assert lambdas == pytest.approx(expected, rel=1e-3)
    if bias > 0:
        assert lambdas[1] > lambdas[0] and lambdas[-1] == pytest.approx(5.0)
    else:
        assert lambdas[0] > lambdas[1] > lambdas[2] > lambdas[3] > 0


@pytest.mark.parametrize("layout,actor_layout", [("full", "full"), ("shared_backbone", "full"), ("lora", "full"),
                                                 ("lora", "lora")])
def test_resume_after_a_crash_continues_exactly(tiny, tmp_path, monkeypatch, layout, actor_layout):
    """4 steps straight, against 4 steps that crash after step 2's checkpoint and resume from it, in every
    critic layout (the trained weights of each: full critics, value heads in the actor, LoRA adapters + heads)
    and with a LoRA actor (its adapter)."""
    cost_model = tiny.score_model("cost", 0.7)  # J_C > d = 0: λ moves every step
    straight = tmp_path / "straight"
    layouts = dict(critic_layout=layout, actor_layout=actor_layout)
    run(lag_config(tiny, straight, cost_model=cost_model, max_steps=4, **layouts))

    crashed = tmp_path / "crashed"
    undo = crash_rl_update(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(lag_config(tiny, crashed, cost_model=cost_model, max_steps=4, **layouts))
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-1", "step-2"]
    undo()
    run(lag_config(tiny, crashed, cost_model=cost_model, max_steps=4, resume="latest", **layouts))

    for key in ("lagrange_multiplier", "episode_cost", "reward", "actor_loss", "cost_critic_loss"):
        assert history(crashed, key) == pytest.approx(history(straight, key), rel=1e-5, abs=1e-7), key
    assert len(set(history(straight, "lagrange_multiplier"))) == 4
    # The trained weights of every part (shared_backbone: the value heads live in the actor; lora actor: its adapter).
    for name in ("model/model.safetensors", "checkpoints/step-4/actor.safetensors",
                 *(() if layout == "shared_backbone" else ("checkpoints/step-4/cost_critic.safetensors",))):
        assert_same_weights(straight / name, crashed / name)
    state = load_file(str(crashed / "checkpoints" / "step-4" / "algorithm_state.safetensors"))
    assert state["algorithm_state.episode_cost_windows"].shape == (1, 32)  # 4 steps × 8 rows, window 128
    samples = [json.loads(line)["step"] for line in (crashed / "samples.jsonl").read_text().splitlines()]
    assert samples == [s for s in (1, 2, 3, 4) for _ in range(4)]  # no duplicated rows after the resume


def _env() -> dict[str, str]:
    src = str(Path(safealign.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _cli_args(tiny: TinySetup, out: Path, cost_model: str, steps: int) -> list[str]:
    args = ["ppo-lag", "--actor_model", tiny.actor, "--reward_model", tiny.reward_model, "--cost_model", cost_model,
            "--prompt_data", tiny.prompts, "--output_dir", str(out), "--max_steps", str(steps)]
    for key, value in FAST.items():
        args += [f"--{key}", f"'{value}'" if value == "no" else str(value)]  # a bare `no` would read as false
    return args


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_latest_gives_the_uninterrupted_result(tiny, tmp_path):
    """With one λ per prompt category (a vector λ: the scalar λ's resume is the crash test's above)."""
    cost_model = tiny.score_model("cost", 0.7)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command = [sys.executable, "-m", "safealign.cli"]
    per_category = ["--constraint_per_category", "true"]
    result = subprocess.run(command + _cli_args(tiny, straight, cost_model, 6) + per_category, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    process = subprocess.Popen(command + _cli_args(tiny, killed, cost_model, 6) + per_category, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-2").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    survivors = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert survivors and "step-6" not in survivors and not (killed / "metrics.json").exists()

    result = subprocess.run(command + _cli_args(tiny, killed, cost_model, 6) + per_category + ["--resume", "latest"],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    multipliers = [k for k in json.loads((straight / "metrics.json").read_text()) if k.startswith("lagrange_multiplier/")]
    assert len(multipliers) > 3
    for key in multipliers + ["lagrange_multiplier"]:
        assert history(killed, key) == pytest.approx(history(straight, key), rel=1e-6), key
    assert len({tuple(history(straight, key)) for key in multipliers}) > 1  # the categories' λ differ
    assert_same_weights(straight / "model" / "model.safetensors", killed / "model" / "model.safetensors")


@pytest.mark.parametrize("layout", ["full", "shared_backbone", "all_lora"])
def test_two_processes_keep_lambda_identical_on_every_rank(tiny, tmp_path, layout, two_ranks_env, torchrun):
    """torchrun, 2 gloo ranks, 2 steps (about 35 s here). full runs with one λ per prompt category (a vector λ, its
    windows gathered from both ranks); shared_backbone also fits its value heads on the statistics of both ranks'
    first rollouts (a float64 all-reduce); all_lora trains only adapters (DDP syncs the trained parameters alone)
    and saves the merged actor once."""
    out = tmp_path / "ddp"
    layouts = ["--critic_layout", "lora", "--actor_layout", "lora"] if layout == "all_lora" else ["--critic_layout", layout]
    if layout == "full":
        layouts += ["--constraint_per_category", "true"]
    args = _cli_args(tiny, out, tiny.score_model("cost", 0.7), 2) + layouts
    result = torchrun("-m", "safealign.cli", *args, env={**_env(), **two_ranks_env}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [[json.loads(line) for line in (out / f"lagrange_multiplier_rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [row["step"] for row in ranks[0]] == [1, 2]
    assert ranks[0] == ranks[1]  # the same λ and J_C, bit for bit
    assert ranks[0][1]["lagrange_multiplier"] > ranks[0][0]["lagrange_multiplier"] > 1.0
    state = load_file(str(out / "checkpoints" / "step-2" / "algorithm_state.safetensors"))
    if layout == "full":  # every category's λ_k identical on both ranks; the windows hold both ranks' rows (16 per step)
        assert len(ranks[0][1]["multipliers"]) > 3 and max(ranks[0][1]["multipliers"].values()) > 1.0
        windows = [v for k, v in state.items() if k.startswith("algorithm_state.windows")]
        assert sum(len(w) for w in windows) == 2 * 16
    else:  # J_C is the mean over both ranks' windows: 2 ranks × 8 rows per step.
        assert state["algorithm_state.episode_cost_windows"].shape == (2, 16)
    assert (out / "checkpoints" / "step-2" / "rng_state_rank1.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    if layout == "shared_backbone":
        actor = load_file(str(out / "checkpoints" / "step-2" / "actor.safetensors"))
        assert actor["value_heads.cost.weight"].abs().sum() > 0 and actor["value_heads.reward.weight"].abs().sum() > 0
    if layout == "all_lora":
        assert all(".lora_" in k for k in load_file(str(out / "checkpoints" / "step-2" / "actor.safetensors")))
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert not any("lora" in k for k in load_file(str(out / "model" / "model.safetensors")))


@pytest.mark.parametrize("sharding, overrides, message", [
    ("DEEPSPEED", {}, "not under DEEPSPEED.*FSDP2.*actor_layout: lora"),
    ("FSDP1", {}, r"FSDP2 \(FSDP_VERSION=2\), not under FSDP version 1"),
    ("FSDP2", {"critic_layout": "lora"}, "actor_layout full and critic_layout full"),
    ("FSDP2", {"actor_layout": "lora", "critic_layout": "lora"}, "actor_layout full and critic_layout full"),
    ("FSDP2", {"critic_layout": "shared_backbone"}, "actor_layout full and critic_layout full"),
    ("FSDP2", {"mixed_precision": "fp16"}, "not fp16"),
])
def test_what_the_rl_loop_does_not_shard_is_refused_before_any_model_loads(tiny, tmp_path, monkeypatch, sharding,
                                                                            overrides, message):
    """DeepSpeed and FSDP1 are refused, and under FSDP2 the layouts that share one network between roles and fp16,
    with a ConfigError before any model loads (instead of Accelerate's error after every model loaded)."""
    from accelerate.utils import DistributedType

    from safealign.config import ConfigError

    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP if sharding.startswith("FSDP") else DistributedType[sharding],
                                  is_fsdp2=sharding == "FSDP2", mixed_precision=overrides.get("mixed_precision", "no"),
                                  is_main_process=True)
    monkeypatch.setattr(rl, "make_accelerator", lambda *a, **k: accelerator)
    monkeypatch.setattr(rl, "build_models", lambda *a, **k: pytest.fail("models loaded"))
    with pytest.raises(ConfigError, match=message):
        run(lag_config(tiny, tmp_path / "x", **{k: v for k, v in overrides.items() if k != "mixed_precision"}))


def _actor_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _two_ranks(torchrun, tiny: TinySetup, out: Path, env: dict[str, str], cli: Path, *extra: str) -> subprocess.CompletedProcess:
    """3 steps of PPO-Lag with the real (random) cost model (J_C depends on what was sampled) on two ranks, with the
    instrumented CLI; a checkpoint after every step (FAST)."""
    return torchrun(cli, *_cli_args(tiny, out, tiny.cost_model, 3), *extra, env=env, timeout=600)


def _ddp_and_fsdp2_env(two_ranks_env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    env = {**_env(), **two_ranks_env}
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "EXIT_AFTER_CHECKPOINT"):
        env.pop(name, None)
    return env, {**env, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _lambda_traces(out: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in (out / f"lagrange_multiplier_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


@pytest.fixture(scope="module")
def fsdp2_run(tiny, tmp_path_factory, instrumented_cli, torchrun) -> tuple[Path, str]:
    """One uninterrupted 3-step PPO-Lag run with every model sharded (FSDP2) over two gloo ranks, and its stderr:
    the run that DDP's and a resumed one are compared with."""
    if torch.cuda.device_count() >= 2:
        pytest.skip("checks the CPU path (Accelerate itself picks FSDP on GPUs)")
    _, fsdp_env = _ddp_and_fsdp2_env({"CUDA_VISIBLE_DEVICES": ""})  # two_ranks_env's choice on this machine
    out = tmp_path_factory.mktemp("fsdp2") / "straight"
    result = _two_ranks(torchrun, tiny, out, fsdp_env, instrumented_cli)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stderr


@pytest.mark.slow  # ~30 s: a two-rank DDP run of 3 steps (and the shared FSDP2 run)
def test_fsdp2_on_two_cpu_ranks_runs_ppo_lag_like_ddp(tiny, tmp_path, two_ranks_env, instrumented_cli, fsdp2_run,
                                                      torchrun):
    """Every model sharded over two gloo ranks (actor, critics, reference, reward and cost models): the same samples,
    J_C and λ as DDP with the same seed, the same final actor up to the order of float sums, saved as a plain model,
    and checkpoints of the kind DDP writes. Measured here: samples, J_C and λ identical at every step, actor weights
    within 1.8e-7."""
    if two_ranks_env.get("CUDA_VISIBLE_DEVICES") != "":
        pytest.skip("checks the CPU path (Accelerate itself picks FSDP on GPUs)")
    env, _ = _ddp_and_fsdp2_env(two_ranks_env)
    (fsdp, fsdp_stderr), ddp = fsdp2_run, tmp_path / "ddp"
    result = _two_ranks(torchrun, tiny, ddp, env, instrumented_cli)
    assert result.returncode == 0, result.stderr[-4000:]
    # It ran sharded (Accelerate alone falls back to DDP on CPU ranks): the checkpoints were gathered from the shards.
    assert "save_trained: FSDP2-sharded model" in fsdp_stderr and "unsharded" not in fsdp_stderr
    assert "save_trained: unsharded model" in result.stderr
    # The same files, keys and shapes as DDP's checkpoint, and the same optimizer and scheduler structure.
    checkpoint, ddp_checkpoint = fsdp / "checkpoints" / "step-3", ddp / "checkpoints" / "step-3"
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(p.name for p in ddp_checkpoint.iterdir())
    for path in ddp_checkpoint.iterdir():
        if path.suffix == ".safetensors":
            shapes = {k: v.shape for k, v in load_file(str(checkpoint / path.name)).items()}
            assert shapes == {k: v.shape for k, v in load_file(str(path)).items()}, path.name
        elif path.name.endswith(("optimizer.json", "scheduler.json")):
            assert json.loads((checkpoint / path.name).read_text()) == json.loads(path.read_text()), path.name

    traces = {"fsdp": _lambda_traces(fsdp), "ddp": _lambda_traces(ddp)}
    assert traces["fsdp"][0] == traces["fsdp"][1]  # λ and J_C identical on both ranks
    assert [row["step"] for row in traces["fsdp"][0]] == [1, 2, 3]
    for key in ("lagrange_multiplier", "episode_cost"):
        assert [row[key] for row in traces["fsdp"][0]] == pytest.approx([row[key] for row in traces["ddp"][0]], abs=1e-5), key
    assert len({row["lagrange_multiplier"] for row in traces["fsdp"][0]}) == 3  # λ moved every step
    samples = {name: [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
               for name, out in (("fsdp", fsdp), ("ddp", ddp))}
    first = [[(r["prompt"], r["response"]) for r in samples[name] if r["step"] == 1] for name in ("fsdp", "ddp")]
    assert first[0] == first[1] and len(first[0]) == 4

    weights, ddp_weights = _actor_weights(fsdp), _actor_weights(ddp)
    assert weights.keys() == ddp_weights.keys()
    initial = build_causal_lm(tiny.actor).state_dict()
    assert any(not torch.equal(weights[k], initial[k]) for k in weights)  # it trained
    for key, tensor in ddp_weights.items():
        torch.testing.assert_close(weights[key], tensor, atol=1e-5, rtol=0)
    # The saved model (gathered from the shards) is a plain Hugging Face directory that loads.
    reloaded = build_causal_lm(str(fsdp / "model")).state_dict()
    for key, tensor in weights.items():
        assert torch.equal(reloaded[key], tensor), key
    metrics = json.loads((fsdp / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["num_parameters"] == sum(t.numel() for t in initial.values())


@pytest.mark.slow  # ~45 s: two two-rank runs of up to 3 steps (and the shared uninterrupted one)
def test_fsdp2_resumed_from_step_2_gives_the_uninterrupted_lambda_trajectory_and_actor(tiny, tmp_path, two_ranks_env,
                                                                                      instrumented_cli, fsdp2_run, torchrun):
    """3 steps straight under FSDP2, against a run whose ranks exit right after checkpoint step-2 and a `resume latest`
    from it: the actor, both critics and their AdamW states come back into the shards, λ and its cost window from
    algorithm_state. Measured here: λ, J_C, the logged scalars and the final actor identical to the last bit."""
    if two_ranks_env.get("CUDA_VISIBLE_DEVICES") != "":
        pytest.skip("checks the CPU path (Accelerate itself picks FSDP on GPUs)")
    _, fsdp_env = _ddp_and_fsdp2_env(two_ranks_env)
    (straight, _), resumed = fsdp2_run, tmp_path / "resumed"
    result = _two_ranks(torchrun, tiny, resumed, {**fsdp_env, "EXIT_AFTER_CHECKPOINT": "step-2"}, instrumented_cli)
    assert result.returncode != 0 and "save_trained: FSDP2-sharded model" in result.stderr
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-1", "step-2"]
    result = _two_ranks(torchrun, tiny, resumed, fsdp_env, instrumented_cli, "--resume", "latest")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "at step 2" in result.stderr

    traces, straight_traces = _lambda_traces(resumed), _lambda_traces(straight)
    assert [row["step"] for row in traces[0]] == [1, 2, 3] and traces[0] == traces[1]
    assert len({row["lagrange_multiplier"] for row in straight_traces[0]}) == 3  # λ moved every step
    for row, straight_row in zip(traces[0], straight_traces[0], strict=True):
        for key in ("lagrange_multiplier", "episode_cost"):
            assert row[key] == pytest.approx(straight_row[key], abs=1e-6), (row["step"], key)
    for key in ("reward", "cost", "actor_loss", "reward_critic_loss", "cost_critic_loss", "kl"):
        assert history(resumed, key) == pytest.approx(history(straight, key), abs=1e-6), key
    for name in ("model/model.safetensors", "checkpoints/step-3/cost_critic.safetensors"):
        weights, straight_weights = load_file(str(resumed / name)), load_file(str(straight / name))
        assert weights.keys() == straight_weights.keys()
        for key, tensor in straight_weights.items():
            torch.testing.assert_close(weights[key], tensor, atol=1e-6, rtol=0)


@pytest.mark.slow  # ~10 s: the ranks stop before any model loads
def test_fsdp1_on_two_cpu_ranks_is_refused(tiny, tmp_path, two_ranks_env, torchrun):
    if two_ranks_env.get("CUDA_VISIBLE_DEVICES") != "":
        pytest.skip("checks the CPU path")
    env = {**_env(), **two_ranks_env, "ACCELERATE_USE_FSDP": "true"}
    env.pop("FSDP_VERSION", None)
    result = torchrun("-m", "safealign.cli", *_cli_args(tiny, tmp_path / "x", tiny.cost_model, 1), env=env, timeout=300)
    assert result.returncode != 0
    assert "needs FSDP2: set FSDP_VERSION=2" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "x" / "model").exists()


def test_the_threshold_can_come_from_the_cost_models_costs_on_safe_answers(tiny, tmp_path):
    # A cost model whose score is its head's bias plus a text-dependent part is hard to compute by hand; one with a
    # zero head scores every text its bias, so any quantile of its costs is that bias.
    cost_model = tiny.score_model("cost", -1.5)
    data = tiny.root / "world" / "preferences" / "train.jsonl"
    d, count = cost_quantile(cost_model, cost_model, str(data), 0.9)
    records = load_preferences(data)
    safe = {(r.prompt, r.response(i)) for r in records for i in (0, 1) if r.is_safe(i)}
    assert d == pytest.approx(-1.5, abs=1e-5) and count == len(safe) > 0
    # The trained model's costs vary by text: d is their 0.25-quantile (a quarter of the safe answers cost less).
    d_trained, _ = cost_quantile(tiny.cost_model, tiny.cost_model, str(data), 0.25)
    costs = score_texts(load_score_model(tiny.cost_model).eval(), load_tokenizer(tiny.cost_model),
                        [p for p, _ in sorted(safe)], [r for _, r in sorted(safe)], 256)
    assert sum(c < d_trained for c in costs) == pytest.approx(0.25 * len(costs), abs=1.0)
    # PPO-Lag takes d from there, records it and its config says it.
    out = tmp_path / "run"
    metrics = run(lag_config(tiny, out, cost_model=cost_model, max_steps=1, save_steps=-1, sample_steps=0,
                             threshold=7.0, threshold_quantile=0.9, threshold_data=str(data)))
    assert metrics["threshold"] == pytest.approx(-1.5, abs=1e-5) and metrics["threshold_safe_responses"] == count
    assert "threshold: -1.5" in (out / "config.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text())["threshold"] == pytest.approx(-1.5, abs=1e-5)
    with pytest.raises(ConfigError, match="threshold_quantile"):
        lag_config(tiny, out, threshold_quantile=0.5)  # without threshold_data
