"""PPO on tiny real models: experience alignment (columns, scores, log-probs), updates, the run directory, the CLI.

The `tiny` fixture (conftest.py) is a small SafeWorld, a BPE trained on its text, an untrained tiny policy, and tiny
reward/cost score models (optionally with a constant output: head weight 0, bias b).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from safealign.algorithms.losses import combined_advantage
from safealign.algorithms.ppo import PPO, PPOConfig
from safealign.algorithms.ppo_lag import PPOLag, PPOLagConfig
from safealign.algorithms.rollout import ptx_loss
from safealign.algorithms.reward_shaping import RewardShaping, RewardShapingConfig, run_sweep
from safealign.cli import app
from safealign.config import ConfigError, load_config
from safealign.data.formatting import tokenize_examples, tokenize_prompt
from safealign.data.loading import load_sft
from safealign.models.generation import SamplingConfig, generate_tokens
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import build_score_model, load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.training.rl import Experience
from safealign.training.rl_setup import RLModels, check_paths, disable_dropout, ptx_examples
from tiny_rl import FAST  # noqa: E402  (tests/algorithms is on sys.path)


def test_experience_columns_scores_and_log_probs_match_unpadded_rows(tiny):
    """Left padding must change nothing: every per-row quantity equals the same row alone, unpadded."""
    tokenizer = load_tokenizer(tiny.actor)
    actor = disable_dropout(build_causal_lm(tiny.actor)).eval()
    reward_model = load_score_model(tiny.reward_model).eval()
    critic = build_score_model(tiny.reward_model, score_type="critic", tokenizer=tokenizer).eval()
    models = RLModels(actor=actor, reference=build_causal_lm(tiny.actor).eval(), score_models={"reward": reward_model},
                      critics={"reward": critic})
    prompts = ["Tell me how to cook rice.", "I want to know, in a lot of detail and with examples, how to fix a bike."]
    ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    assert len(ids[0]) != len(ids[1])  # so that the first row is left-padded
    rollout = generate_tokens(actor, tokenizer, ids, SamplingConfig(max_new_tokens=6, num_samples=2),
                              torch.Generator().manual_seed(0))
    batch = Experience.from_rollout(rollout)
    step = PPO(PPOConfig(kl_coeff=0.1))
    scalars = step.experience(models, batch, None, 1)
    batch["advantages"] = step.actor_advantages(batch)
    assert scalars["kl"] == 0.0  # the reference is the actor
    P = rollout.prompt_length
    for row in range(4):
        n = int(rollout.response_mask[row].sum())
        real = rollout.attention_mask[row].bool()
        alone = rollout.sequences[row][real].unsqueeze(0)  # prompt + response (+ EOS), no padding
        prompt_len = alone.size(1) - n
        with torch.no_grad():
            logits = actor(input_ids=alone).logits[0]
            expected_logp = logits[prompt_len - 1:-1].log_softmax(-1).gather(-1, alone[0, prompt_len:, None]).squeeze(-1)
            torch.testing.assert_close(batch["log_probs"][row, :n], expected_logp, atol=1e-5, rtol=0)
            score = reward_model(alone, torch.ones_like(alone)).end_scores[0]
            torch.testing.assert_close(batch["scores_reward"][row], score, atol=1e-5, rtol=0)
            values = critic(alone, torch.ones_like(alone)).scores[0, prompt_len - 1:-1]
            torch.testing.assert_close(batch["reward_values"][row, :n], values, atol=1e-5, rtol=0)
        # Nothing after EOS: zero values, advantages and returns.
        for key in ("reward_values", "reward_advantages", "reward_returns", "advantages"):
            assert batch[key][row, n:].abs().sum() == 0
        # The end score enters the last response token's signal: with KL 0, Σ_t r_t = R.
        assert batch["sequences"].shape[1] == P + batch["response_mask"].shape[1]
    torch.testing.assert_close(batch["advantages"], batch["reward_advantages"])


def test_ppo_run_updates_actor_and_critic_and_writes_a_complete_run_directory(tiny, tmp_path):
    out = tmp_path / "ppo"
    args = ["ppo", "--actor_model", tiny.actor, "--reward_model", tiny.reward_model, "--prompt_data", tiny.prompts,
            "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-3", "--critic_learning_rate", "1e-3"]
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(FAST))  # a YAML file quotes "no" (a bare `no` is false)
    result = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "fast.yaml")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    for key in ("reward", "kl", "reward_return", "reward_value", "reward_advantage", "actor_loss", "reward_critic_loss",
                "actor_lr", "reward_critic_lr", "response_length", "clip_fraction", "approx_kl",
                "reward_explained_variance", "samples_per_second", "time_generation", "time_update"):
        assert isinstance(metrics[key], float), key
    cfg = load_config(PPOConfig, out / "config.yaml")
    assert cfg.max_steps == 2 and cfg.kl_coeff == 0.02
    history = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2]
    # The first rollout's actor is the reference: 0 on a CPU; on a GPU the two forwards may take kernels that
    # round differently (seen: -3e-7 on an H100).
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert history[0]["approx_kl"] > 0  # the second mini-batch of step 1 sees an updated actor
    assert list((out / "logs").glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert {"prompt", "response", "reward", "response_tokens", "ended_with_eos"} <= set(samples[0])
    # The actor and the critic moved; the saved actor is a loadable HF model with its tokenizer.
    initial = load_file(str(Path(tiny.actor) / "model.safetensors"))
    final = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(initial[k], final[k]) for k in initial)
    reward_head = load_file(str(Path(tiny.reward_model) / "model.safetensors"))
    critic = load_file(str(out / "checkpoints" / "step-2" / "reward_critic.safetensors"))
    assert not torch.equal(reward_head["score.weight"], critic["backbone.score.weight"])
    assert (out / "model" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]


def test_ppo_losses_and_values_change_and_the_first_ratio_of_each_rollout_is_one(tiny, tmp_path):
    """One mini-batch per rollout: the update starts at π = π_old, so approx KL and clip fraction are 0."""
    from safealign.algorithms.ppo import run

    cfg = PPOConfig(actor_model=tiny.actor, reward_model=tiny.reward_model, prompt_data=tiny.prompts,
                    output_dir=str(tmp_path / "run"), max_steps=3, learning_rate=1e-3, critic_learning_rate=1e-3,
                    **{**FAST, "save_steps": -1, "sample_steps": 0, "per_device_train_batch_size": 8})
    run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and not (tmp_path / "run" / "samples.jsonl").exists()
    events = list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload()
    critic_loss = [e.value for e in scalars.Scalars("train/reward_critic_loss")]
    values = [e.value for e in scalars.Scalars("train/reward_value")]
    assert len(critic_loss) == 3 and len(set(critic_loss)) == 3 and len(set(values)) == 3
    assert max(e.value for e in scalars.Scalars("train/approx_kl")) < 1e-6
    assert max(e.value for e in scalars.Scalars("train/clip_fraction")) == 0.0
    kl = [e.value for e in scalars.Scalars("train/kl")]
    assert kl[0] == pytest.approx(0.0, abs=1e-5) and abs(kl[-1]) > 1e-5  # rounding on a GPU: see the test above


def test_ptx_term_has_a_gradient_and_a_run_with_ptx_data_trains(tiny, tmp_path):
    """L_PTX (the LM loss on SFT data) must reach the actor: a `no_grad` left on it once made every run with ptx_data
    crash at its first backward."""
    tokenizer = load_tokenizer(tiny.actor)
    actor = build_causal_lm(tiny.actor)
    ids = torch.tensor([tokenize_prompt(tokenizer, "hello there, how are you")])  # size = (1, L)
    labels = ids.clone()
    labels[:, :2] = -100
    metrics: dict[str, torch.Tensor] = {}
    loss = ptx_loss(actor, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, metrics)
    assert loss.requires_grad and float(metrics["ptx_loss"]) == pytest.approx(loss.item())
    loss.backward()
    assert actor.get_input_embeddings().weight.grad.abs().sum() > 0
    out = tmp_path / "ppo_lag_ptx"
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(FAST))
    sft_file = str(Path(tiny.root) / "world" / "sft" / "train.jsonl")
    costs = _sft_costs(tiny, sft_file)
    median = sorted(costs)[len(costs) // 2]
    result = CliRunner().invoke(app, [
        "ppo-lag", "--config", str(tmp_path / "fast.yaml"), "--actor_model", tiny.actor, "--reward_model", tiny.reward_model,
        "--cost_model", tiny.cost_model, "--prompt_data", tiny.prompts, "--output_dir", str(out), "--max_steps", "1",
        "--ptx_data", sft_file, "--ptx_coeff", "1.0", "--ptx_max_cost", str(median)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ptx_loss"] > 0
    assert (metrics["ptx_rows"], metrics["ptx_rows_kept"]) == (len(costs), sum(c <= median for c in costs))


def _sft_costs(tiny, sft_file: str) -> list[float]:
    tokenizer = load_tokenizer(tiny.actor)
    rows = load_sft(sft_file)
    return score_texts(load_score_model(tiny.cost_model), tokenizer, [r.prompt for r in rows], [r.response for r in rows], 256)


def test_ptx_max_cost_keeps_exactly_the_rows_the_cost_model_scores_at_most_it(tiny):
    """PTX on the SFT rows the cost model calls safe enough: the kept examples are those rows, in order; null keeps
    every row; a threshold below every cost, or an algorithm without a cost model, is a clear error."""
    sft_file = str(Path(tiny.root) / "world" / "sft" / "train.jsonl")
    tokenizer = load_tokenizer(tiny.actor)
    rows, costs = load_sft(sft_file), _sft_costs(tiny, sft_file)
    assert len(set(costs)) > 1  # the tiny cost model is untrained but not constant
    threshold = sorted(costs)[len(costs) // 3]
    cfg = PPOLagConfig(ptx_data=sft_file, ptx_max_cost=threshold)
    examples, kept = ptx_examples(cfg, tokenizer, tiny.cost_model, torch.device("cpu"))
    expected = [r for r, c in zip(rows, costs) if c <= threshold]
    assert kept == {"ptx_rows": len(rows), "ptx_rows_kept": len(expected)} and 0 < len(expected) < len(rows)
    wanted = tokenize_examples(tokenizer, [r.prompt for r in expected], [r.response for r in expected], cfg.ptx_max_length)
    assert [e.input_ids for e in examples] == [e.input_ids for e in wanted]
    everything, none_dropped = ptx_examples(PPOLagConfig(ptx_data=sft_file), tokenizer, tiny.cost_model, torch.device("cpu"))
    assert len(everything) == len(rows) and none_dropped == {}
    with pytest.raises(ConfigError, match="scores every one"):
        ptx_examples(PPOLagConfig(ptx_data=sft_file, ptx_max_cost=min(costs) - 1.0), tokenizer, tiny.cost_model,
                     torch.device("cpu"))
    with pytest.raises(ConfigError, match="has none"):
        check_paths(PPOConfig(prompt_data=tiny.prompts, actor_model=tiny.actor, ptx_max_cost=0.0),
                    {"reward": tiny.reward_model}, {})


def test_missing_eos_penalty_lowers_the_reward_of_cut_answers_only(tiny):
    """R − penalty at the end of the reward stream of a row without EOS, R for a row that ended; PPO-Lag's cost
    stream is left alone unless missing_eos_cost_penalty adds its own (never to the cost λ averages)."""
    tokenizer = load_tokenizer(tiny.actor)
    actor = build_causal_lm(tiny.actor).eval()
    score_models = {"reward": load_score_model(tiny.score_model("reward", 0.5)).eval(),
                    "cost": load_score_model(tiny.score_model("cost", -1.0)).eval()}
    critics = {s: build_score_model(tiny.actor, score_type="critic", tokenizer=tokenizer).eval() for s in ("reward", "cost")}
    models = RLModels(actor=actor, reference=actor, score_models=score_models, critics=critics)
    rollout = generate_tokens(actor, tokenizer, [tokenize_prompt(tokenizer, "hello there")],
                              SamplingConfig(max_new_tokens=5, num_samples=4), torch.Generator().manual_seed(0))
    last = rollout.response_mask.sum(-1) - 1  # size = (4,)
    for step in (PPO(PPOConfig(kl_coeff=0.0, missing_eos_penalty=2.0)),
                 PPOLag(PPOLagConfig(kl_coeff=0.0, missing_eos_penalty=2.0))):
        batch = Experience.from_rollout(rollout)
        batch["ended_with_eos"] = torch.tensor([True, False, True, False])  # as if rows 0 and 2 had ended
        step.experience(models, batch, None, 1)
        # β = 0, γ = 1: the last response token's return is the stream's end score.
        torch.testing.assert_close(batch["reward_returns"][torch.arange(4), last], torch.tensor([0.5, -1.5, 0.5, -1.5]))
        torch.testing.assert_close(batch["scores_reward"], torch.full((4,), 0.5))  # the logged score is the model's
        if "cost" in step.streams:
            torch.testing.assert_close(batch["cost_returns"][torch.arange(4), last], torch.full((4,), -1.0))
    with pytest.raises(Exception, match="missing_eos_penalty"):
        PPOConfig(missing_eos_penalty=-1.0)
    # The cost's own penalty: C + p at the end of the cost stream of a cut answer; λ reads the model's cost.
    step = PPOLag(PPOLagConfig(kl_coeff=0.0, missing_eos_penalty=2.0, missing_eos_cost_penalty=3.0))
    batch = Experience.from_rollout(rollout)
    batch["ended_with_eos"] = torch.tensor([True, False, True, False])
    step.experience(models, batch, None, 1)
    torch.testing.assert_close(batch["cost_returns"][torch.arange(4), last], torch.tensor([-1.0, 2.0, -1.0, 2.0]))
    torch.testing.assert_close(batch["scores_cost"], torch.full((4,), -1.0))  # what the λ step averages
    # Both penalties p: the actor's advantage (A^R − λ·A^C) / (1 + λ) of a cut answer falls by p at every λ.
    for lam in (0.1, 1.0, 4.0):
        reward, cost = torch.tensor([0.3, -0.7]), torch.tensor([0.2, 0.5])
        torch.testing.assert_close(combined_advantage(reward - 2.0, cost + 2.0, lam), combined_advantage(reward, cost, lam) - 2.0)
    with pytest.raises(Exception, match="missing_eos_cost_penalty"):
        PPOLagConfig(missing_eos_cost_penalty=-1.0)


def test_ppo_config_errors_are_clear(tiny, tmp_path):
    from safealign.algorithms.ppo import run
    from safealign.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of"):
        run(PPOConfig(actor_model=tiny.actor, reward_model=tiny.reward_model, prompt_data=tiny.prompts,
                      output_dir=str(tmp_path / "x"), per_device_prompt_batch_size=3, per_device_train_batch_size=2))
    with pytest.raises(FileNotFoundError, match="reward model"):
        run(PPOConfig(actor_model=tiny.actor, reward_model=str(tmp_path / "missing"), prompt_data=tiny.prompts,
                      output_dir=str(tmp_path / "x")))
    result = CliRunner().invoke(app, ["ppo", "--prompt_data", tiny.prompts, "--actor_model", tiny.actor,
                                      "--reward_model", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not found" in " ".join(result.output.split())
    configs = Path(__file__).parents[2] / "configs"
    for name, cls in [("ppo", PPOConfig), ("ppo_lag", PPOLagConfig), ("shaping", RewardShapingConfig)]:
        assert load_config(cls, configs / f"{name}.yaml").output_dir.endswith(name)  # the shipped configs load


# --------------------------------------------------------------------------------------------------
# Reward shaping: PPO's update with the end score R − ν·C
# --------------------------------------------------------------------------------------------------
def test_shaping_ends_the_reward_stream_with_r_minus_nu_c(tiny):
    tokenizer = load_tokenizer(tiny.actor)
    actor = build_causal_lm(tiny.actor).eval()
    score_models = {"reward": load_score_model(tiny.score_model("reward", 0.5)).eval(),
                    "cost": load_score_model(tiny.score_model("cost", 2.0)).eval()}
    critic = build_score_model(tiny.actor, score_type="critic", tokenizer=tokenizer).eval()
    models = RLModels(actor=actor, reference=actor, score_models=score_models, critics={"reward": critic})
    step = RewardShaping(RewardShapingConfig(nu=0.75, kl_coeff=0.0))
    assert step.streams == ("reward",) and set(step.critic_paths()) == {"reward"}
    rollout = generate_tokens(actor, tokenizer, [tokenize_prompt(tokenizer, "hello there")],
                              SamplingConfig(max_new_tokens=5, num_samples=3), torch.Generator().manual_seed(0))
    batch = Experience.from_rollout(rollout)
    scalars = step.experience(models, batch, None, 1)
    assert scalars["shaped_reward"] == pytest.approx(0.5 - 0.75 * 2.0) and scalars["unsafe_fraction"] == 1.0
    # β = 0 and γ = 1: the return of the last response token is the shaped end score alone.
    lengths = rollout.response_mask.sum(-1)
    torch.testing.assert_close(batch["reward_returns"][torch.arange(3), lengths - 1],
                               torch.full((3,), 0.5 - 0.75 * 2.0))


def test_shaping_sweep_runs_each_nu_into_its_own_directory(tiny, tmp_path):
    cfg = RewardShapingConfig(actor_model=tiny.actor, reward_model=tiny.reward_model, cost_model=tiny.score_model("cost", 1.0),
                              prompt_data=tiny.prompts, output_dir=str(tmp_path / "sweep"), max_steps=1, nus=[0.5, 2.0],
                              **{**FAST, "save_steps": -1, "sample_steps": 0})
    results = run_sweep(cfg)
    assert [r["nu"] for r in results] == [0.5, 2.0]
    for r in results:
        assert Path(r["output_dir"]).name == f"nu-{r['nu']:g}"
        assert (Path(r["output_dir"]) / "model" / "model.safetensors").is_file()
        assert r["shaped_reward"] == pytest.approx(r["reward"] - r["nu"] * 1.0, abs=1e-5)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == results


def test_gradient_accumulation_equals_one_big_mini_batch(tiny, tmp_path):
    """The micro-batch losses are shares of the mini-batch's masked mean: 2 × 4 rows = 1 × 8 rows."""
    from safealign.algorithms.ppo import run

    weights, norms = {}, {}
    for name, micro, accumulation in [("big", 8, 1), ("accumulated", 4, 2)]:
        cfg = PPOConfig(actor_model=tiny.actor, reward_model=tiny.reward_model, prompt_data=tiny.prompts,
                        output_dir=str(tmp_path / name), max_steps=1, learning_rate=1e-3, critic_learning_rate=1e-3,
                        adam_epsilon=1e-6, max_grad_norm=0.0,  # bounds how much Adam amplifies rounding noise
                        **{**FAST, "save_steps": 1, "sample_steps": 0, "per_device_train_batch_size": micro,
                           "gradient_accumulation_steps": accumulation})
        metrics = run(cfg)
        norms[name] = [metrics["actor_grad_norm"], metrics["reward_critic_grad_norm"]]  # Adam hides scale errors; norms do not
        weights[name] = (load_file(str(tmp_path / name / "model" / "model.safetensors")),
                         load_file(str(tmp_path / name / "checkpoints" / "step-1" / "reward_critic.safetensors")))
    assert norms["accumulated"] == pytest.approx(norms["big"], rel=1e-5)
    for big, accumulated in zip(weights["big"], weights["accumulated"]):
        for key, tensor in big.items():
            torch.testing.assert_close(accumulated[key], tensor, atol=1e-6, rtol=0)
