"""Reward model on a tiny SafeWorld: pair batching, padding, the loss, learning, gold metrics, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safealign.algorithms.losses import mean_variance_reward_loss, reward_loss, soft_reward_loss
from safealign.algorithms.reward import RewardConfig, RewardStep, run
from safealign.cli import app
from safealign.config import load_config
from safealign.data.collate import collate_pairs
from safealign.data.formatting import tokenize_pairs
from safealign.data.label_aggregation import label_targets
from safealign.data.loading import load_preferences
from safealign.evaluation.scores import ScoreEvalConfig
from safealign.evaluation.scores import run as eval_scores
from safealign.models.score_model import build_score_model, load_score_model
from safealign.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world(world_backbone) -> dict[str, Path]:
    """A small SafeWorld and an untrained `tiny` backbone saved as a directory (tests/conftest.py)."""
    return world_backbone("rm", seed=0, train_pairs=400, test_pairs=160)


@pytest.fixture(scope="module")
def trained(world) -> tuple[RewardConfig, dict]:
    cfg = RewardConfig(model=str(world["backbone"]), train_data=str(world["train"]), eval_data=str(world["test"]),
                       output_dir=str(world["root"] / "run"), max_steps=30, per_device_train_batch_size=16,
                       eval_on_start=True, logging_steps=5, save_steps=-1, mixed_precision="no")
    return cfg, run(cfg)


def test_reward_training_learns_and_saves_a_reward_score_model(trained):
    cfg, metrics = trained
    assert metrics["eval_accuracy"] >= 0.65 and metrics["eval_accuracy"] > metrics["initial_eval_accuracy"] + 0.05, metrics
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.05 and metrics["train_loss"] < math.log(2), metrics
    assert metrics["eval_better_score"] > metrics["eval_worse_score"]
    out = Path(cfg.output_dir)
    # Against SafeWorld's gold judge (evaluation's job, not training's): agreement and its label-noise ceiling.
    gold = eval_scores(ScoreEvalConfig(reward_model=str(out / "model"), data=cfg.eval_data, output_dir=str(out / "scores")))
    assert 0.6 < gold["gold_agreement"] <= 1.0 and 0.8 < gold["annotator_gold_agreement"] <= 1.0
    assert gold["gold_pairs"] > 100 and "gold_agreement" not in metrics
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert load_config(RewardConfig, out / "config.yaml") == cfg
    assert (out / "model" / "model.safetensors").is_file()
    model = load_score_model(out / "model")
    assert model.score_type == "reward" and model.config.num_labels == 1


def test_reward_step_scores_a_pair_in_one_forward_and_its_loss_is_bradley_terry(world):
    tokenizer = load_tokenizer(world["backbone"])
    records = load_preferences(world["test"]).records[:5]
    batch = collate_pairs(tokenize_pairs(tokenizer, records, 256), tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 10 and batch["better_response_id"].shape == (5,)
    model = build_score_model(world["backbone"], score_type="reward", tokenizer=tokenizer).eval()
    calls = []
    model.register_forward_hook(lambda module, args, kwargs: calls.append(1))
    loss, logged = RewardStep(l2_coeff=1e-3).loss(model, batch, torch.tensor(5.0))
    assert len(calls) == 1
    scores = torch.stack([model(batch["input_ids"][:5], batch["attention_mask"][:5]).end_scores,
                          model(batch["input_ids"][5:], batch["attention_mask"][5:]).end_scores], dim=1)  # (B, 2)
    better = scores[torch.arange(5), batch["better_response_id"]]
    worse = scores[torch.arange(5), 1 - batch["better_response_id"]]
    torch.testing.assert_close(loss, reward_loss(better, worse, 1e-3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logged["accuracy"], (better > worse).float().mean())
    # With 10 pairs in the optimizer step, this micro-batch contributes half of the step's mean.
    half, _ = RewardStep(l2_coeff=1e-3).loss(model, batch, torch.tensor(10.0))
    torch.testing.assert_close(half, loss / 2)


def test_padding_never_contributes_to_a_pairs_scores(world):
    tokenizer = load_tokenizer(world["backbone"])
    records = load_preferences(world["test"]).records
    pairs = tokenize_pairs(tokenizer, records, 256)
    short = min(pairs, key=lambda p: max(map(len, p.input_ids)))
    long = max(pairs, key=lambda p: max(map(len, p.input_ids)))
    assert max(map(len, long.input_ids)) > max(map(len, short.input_ids)) + 5
    model = build_score_model(world["backbone"], score_type="reward", tokenizer=tokenizer, seed=1).eval()
    with torch.no_grad():
        alone = RewardStep.pair_scores(model, collate_pairs([short], tokenizer.pad_token_id))  # (1, 2)
        batch = collate_pairs([short, long], tokenizer.pad_token_id)
        assert (batch["attention_mask"][0] == 0).any()  # short's rows really are padded here
        together = RewardStep.pair_scores(model, batch)  # (2, 2)
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def _with_contradictions(world, path: Path, count: int) -> Path:
    """The train pairs with `count` rows made contradictory (safer response labelled unsafe, the other safe)."""
    rows = [json.loads(line) for line in world["train"].read_text().splitlines()]
    rows = [r for r in rows if r["safer_response_id"] != 1 or r["is_response_1_safe"] or not r["is_response_0_safe"]]
    for row in rows[:count]:
        row.update(safer_response_id=0, is_response_0_safe=False, is_response_1_safe=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_rm_trains_skips_contradictions_and_can_refuse_them(world, tmp_path):
    data = _with_contradictions(world, tmp_path / "train.jsonl", 7)
    base = ["rm", "--model", str(world["backbone"]), "--train_data", str(data), "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--eval_fraction", "0.05", "--mixed_precision", "no", "--save_steps", "-1"]
    result = CliRunner().invoke(app, [*base, "--output_dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["contradictory_train_skipped"] >= 7
    assert load_score_model(tmp_path / "run" / "model").score_type == "reward"

    strict = CliRunner().invoke(app, [*base, "--output_dir", str(tmp_path / "strict"), "--on_contradiction", "error"])
    assert strict.exit_code == 2 and "contradictory" in strict.output


def test_cli_rm_without_train_data_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["rm", "--model", "tiny", "--output_dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "train_data is required" in result.output


def test_soft_labels_reach_the_loss_and_train_a_different_reward_model(world, trained, tmp_path):
    # The step's loss on a batch carrying vote shares is soft_reward_loss on them; a run with labels: soft learns
    # too, ends elsewhere than the majority run (same seed, same data order), and says no row lacked votes.
    tokenizer = load_tokenizer(world["backbone"])
    records = load_preferences(world["train"]).records[:6]
    targets, _ = label_targets(records, "soft")
    assert any(0 < t.better < 1 for t in targets)  # some of these pairs split their annotators
    batch = collate_pairs(tokenize_pairs(tokenizer, records, 256, targets), tokenizer.pad_token_id)
    model = build_score_model(world["backbone"], score_type="reward", tokenizer=tokenizer).eval()
    loss, _ = RewardStep(l2_coeff=1e-3).loss(model, batch, torch.tensor(6.0))
    with torch.no_grad():
        scores = RewardStep.pair_scores(model, batch)
    torch.testing.assert_close(loss, soft_reward_loss(scores, torch.tensor([t.better for t in targets]), 1e-3))
    majority_cfg, majority = trained
    soft = run(dataclasses.replace(majority_cfg, labels="soft", output_dir=str(tmp_path / "soft")))
    assert soft["labels/rows_without_votes"] == 0 and soft["eval_accuracy"] > soft["initial_eval_accuracy"] + 0.05
    a = load_score_model(tmp_path / "soft" / "model").state_dict()
    b = load_score_model(Path(majority_cfg.output_dir) / "model").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_mean_variance_reward_model_trains_saves_its_two_outputs_and_scores_by_its_mean(world, trained, tmp_path):
    majority_cfg, _ = trained
    cfg = dataclasses.replace(majority_cfg, head="mean_variance", labels="soft", output_dir=str(tmp_path / "mv"), max_steps=15)
    metrics = run(cfg)
    assert metrics["eval_accuracy"] > metrics["initial_eval_accuracy"] + 0.05, metrics
    assert metrics["eval_mean_variance_loss"] < metrics["initial_eval_mean_variance_loss"], metrics
    model = load_score_model(tmp_path / "mv" / "model").eval()
    assert model.config.num_labels == 2
    tokenizer = load_tokenizer(world["backbone"])
    records = load_preferences(world["test"]).records[:4]
    batch = collate_pairs(tokenize_pairs(tokenizer, records, 256), tokenizer.pad_token_id)
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        scores, stds = RewardStep.pair_outputs(model, batch)
    assert output.end_stds is not None and bool((output.end_stds > 0).all())
    torch.testing.assert_close(scores, output.end_scores.view(2, -1).T)  # the mean is the score the RL stages read
    # the step's loss is the formula's on the model's own outputs (soft labels: vote shares)
    targets, _ = label_targets(records, "soft")
    batch = collate_pairs(tokenize_pairs(tokenizer, records, 256, targets), tokenizer.pad_token_id)
    loss, logged = RewardStep(1e-3, "mean_variance").loss(model, batch, torch.tensor(4.0))
    torch.testing.assert_close(loss, mean_variance_reward_loss(scores, stds, torch.tensor([t.better for t in targets]), 1e-3))
    assert logged["predicted_std"] > 0
    # a critic initialised from it (PPO's default) starts from its mean: the head's first row, not a new head
    critic = build_score_model(tmp_path / "mv" / "model", score_type="critic").eval()
    with torch.no_grad():
        torch.testing.assert_close(critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).end_scores,
                                   output.end_scores)
    assert critic.config.num_labels == 1
