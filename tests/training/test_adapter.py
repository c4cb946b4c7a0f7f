"""`adapter: lora` in the supervised stages (SFT, reward and cost models): only the adapter (and a score model's head)
trains, the run resumes exactly, and the stage saves the adapter merged into `model/` (what every later stage
loads) and alone into `adapter/`, the two giving the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import Crash, crash_after_saving, write_arithmetic  # noqa: E402  (tests/training is on sys.path)

from safealign.algorithms import cost, reward, sft
from safealign.algorithms.cost import CostConfig
from safealign.algorithms.reward import RewardConfig
from safealign.algorithms.sft import SFTConfig
from safealign.config import ConfigError
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import ScoreModel, build_score_model, load_score_model
from safealign.models.tokenizer import load_tokenizer

SFT_RUN = dict(adapter="lora", lora_rank=4, learning_rate=3e-3, per_device_train_batch_size=8, gradient_accumulation_steps=1,
               max_steps=12, save_steps=6, logging_steps=1, eval_fraction=0.1, eval_on_start=True, mixed_precision="no")


@pytest.fixture(scope="module")
def base(world_backbone) -> dict[str, Path]:
    return world_backbone("adapter", seed=0, train_pairs=120, test_pairs=20)


def trained_keys(checkpoint: Path) -> set[str]:
    return set(load_file(str(checkpoint / "model.safetensors")))


def test_sft_adapter_learns_resumes_exactly_and_saves_merged_and_alone(base, tmp_path, monkeypatch):
    from peft import PeftModel

    data = write_arithmetic(tmp_path / "train.jsonl", n=80)
    straight = tmp_path / "straight"
    metrics = sft.run(SFTConfig(model=str(base["backbone"]), train_data=str(data), output_dir=str(straight), **SFT_RUN))
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.1, metrics
    assert metrics["num_trained_parameters"] < 0.1 * metrics["num_parameters"]
    keys = trained_keys(straight / "checkpoints" / "step-12")
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # the adapter only
    assert not any("lora" in k for k in load_file(str(straight / "model" / "model.safetensors")))

    tokenizer = load_tokenizer(str(base["backbone"]))
    ids = torch.tensor([tokenizer("what is 3 plus 4")["input_ids"]])
    with torch.no_grad():
        merged = build_causal_lm(str(straight / "model"), tokenizer).eval()(input_ids=ids).logits
        adapted_model = PeftModel.from_pretrained(build_causal_lm(str(base["backbone"]), tokenizer), str(straight / "adapter"))
        adapted = adapted_model.eval()(input_ids=ids).logits
        untouched = build_causal_lm(str(base["backbone"]), tokenizer).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - untouched).abs().max() > 1e-3

    crashed = tmp_path / "crashed"
    crash_after_saving(monkeypatch, 6)
    with pytest.raises(Crash):
        sft.run(SFTConfig(model=str(base["backbone"]), train_data=str(data), output_dir=str(crashed), **SFT_RUN))
    monkeypatch.undo()
    resumed = sft.run(SFTConfig(model=str(base["backbone"]), train_data=str(data), output_dir=str(crashed), resume="latest", **SFT_RUN))
    assert resumed["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(crashed / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_reward_model_adapter_trains_its_head_and_saves_a_score_model_equal_to_base_plus_adapter(base, tmp_path):
    from peft import PeftModel

    out = tmp_path / "rm"
    metrics = reward.run(RewardConfig(model=str(base["backbone"]), train_data=str(base["train"]), output_dir=str(out), adapter="lora",
                                      lora_rank=4, learning_rate=5e-3, max_steps=8, per_device_train_batch_size=8,
                                      eval_on_start=True, save_steps=-1, logging_steps=1, mixed_precision="no"))
    assert metrics["eval_loss"] < metrics["initial_eval_loss"], metrics
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["r"] == 4

    tokenizer = load_tokenizer(str(base["backbone"]))
    batch = tokenizer(["BEGINNING OF CONVERSATION: USER: hello ASSISTANT: hi there", "USER: how do I fix a bike"],
                      return_tensors="pt", padding=True)
    merged = load_score_model(out / "model").eval()
    assert merged.score_type == "reward"
    fresh = build_score_model(str(base["backbone"]), score_type="reward", tokenizer=tokenizer, seed=123)  # another head
    adapted = ScoreModel(PeftModel.from_pretrained(fresh.backbone, str(out / "adapter"))).eval()
    with torch.no_grad():
        expected = adapted(batch["input_ids"], batch["attention_mask"]).end_scores
        torch.testing.assert_close(merged(batch["input_ids"], batch["attention_mask"]).end_scores, expected, atol=1e-5, rtol=0)


def test_adapter_settings_are_checked(base, tmp_path):
    data = write_arithmetic(tmp_path / "train.jsonl", n=16)
    with pytest.raises(ConfigError, match="lora_rank >= 1"):
        sft.run(SFTConfig(model=str(base["backbone"]), train_data=str(data), output_dir=str(tmp_path / "x"),
                          **{**SFT_RUN, "lora_rank": 0}))
    # An adapter on a preset's random weights would train a few adapters on noise: refused, before anything is written.
    with pytest.raises(ConfigError, match="sft: adapter: lora .* 'tiny' is a preset built from scratch"):
        sft.run(SFTConfig(model="tiny", train_data=str(data), output_dir=str(tmp_path / "y"), **SFT_RUN))
    with pytest.raises(ConfigError, match="cm: adapter: lora .* 'small' is a preset"):
        cost.run(CostConfig(model="small", train_data=str(base["train"]), output_dir=str(tmp_path / "z"), adapter="lora"))
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
