"""The LoRA actor (`actor_layout: lora`): the SFT model plus an adapter, whose adapter-disabled forward is the frozen
reference. It must start exactly where the full actor starts, learn while the SFT weights (the reference) stay
untouched, save a merged `model/` that equals the SFT model + `adapter/`, and refuse the layout it was not built
for. (Exact resume with it: test_ppo_lag.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from safealign.algorithms.ppo_lag import run
from safealign.algorithms.rollout import token_log_probs
from safealign.config import ConfigError
from safealign.models.lora import AdapterDisabledPolicy
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import load_tokenizer
from tiny_rl import lag_config, setup, update  # noqa: E402  (tests/algorithms is on sys.path)


def test_lora_actor_starts_as_the_full_actor_then_learns_while_the_reference_stays_the_sft_model(tiny, tmp_path):
    _, full_algorithm, _, full_models, _, full_batch = setup(tiny, tmp_path / "full", "full")
    cfg, algorithm, accelerator, models, parts, batch = setup(tiny, tmp_path / "lora", "full", actor_layout="lora")
    assert isinstance(models.reference, AdapterDisabledPolicy)
    assert models.reference.actor is accelerator.unwrap_model(models.actor)  # one policy backbone, not two
    torch.testing.assert_close(batch["sequences"], full_batch["sequences"], atol=0, rtol=0)  # B = 0: the same samples
    full_algorithm.experience(full_models, full_batch, accelerator, 1)
    algorithm.experience(models, batch, accelerator, 1)
    for key in ("log_probs", "ref_log_probs", "reward_values", "cost_values", "reward_advantages", "cost_advantages"):
        torch.testing.assert_close(batch[key], full_batch[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["log_probs"], batch["ref_log_probs"], atol=0, rtol=0)

    frozen = {n: p.detach().clone() for n, p in models.reference.actor.named_parameters() if not p.requires_grad}
    trained = {n for n, p in models.reference.actor.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert sum(p.numel() for n, p in models.reference.actor.named_parameters() if n in trained) < 0.1 * sum(
        p.numel() for p in frozen.values())
    batch["advantages"] = algorithm.actor_advantages(batch)
    losses = [update(cfg, accelerator, algorithm, models, parts, batch, step)["actor_loss"]
              for step in range(6)]  # the same rollout and advantages: the surrogate must fall
    assert losses[-1] < losses[0] - 1e-3, losses
    for name, parameter in models.reference.actor.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    with torch.no_grad():
        torch.testing.assert_close(token_log_probs(models.reference, batch), batch["ref_log_probs"], atol=1e-6, rtol=0)
        moved = (token_log_probs(models.actor, batch) - batch["log_probs"]).abs()[batch["response_mask"].bool()]
    assert moved.max() > 1e-3


def test_lora_actor_run_saves_a_merged_model_equal_to_the_sft_model_plus_its_adapter(tiny, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    metrics = run(lag_config(tiny, out, actor_layout="lora", critic_layout="lora", max_steps=2, lora_rank=4))
    assert metrics["num_trained_actor_parameters"] < 0.2 * metrics["num_parameters"]
    checkpoint = load_file(str(out / "checkpoints" / "step-2" / "actor.safetensors"))
    assert checkpoint and all(".lora_A." in k or ".lora_B." in k for k in checkpoint)  # the adapter only
    assert {v.shape[0] for k, v in checkpoint.items() if ".lora_A." in k} == {4}
    merged_weights = load_file(str(out / "model" / "model.safetensors"))
    assert not any("lora" in k for k in merged_weights)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny.actor

    tokenizer = load_tokenizer(tiny.actor)
    merged = build_causal_lm(str(out / "model"), tokenizer).eval()
    sft = build_causal_lm(tiny.actor, tokenizer).eval()
    ids = torch.tensor([tokenizer("how do I keep my garden free of weeds")["input_ids"]])
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        sft_logits = sft(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(build_causal_lm(tiny.actor, tokenizer), str(out / "adapter")).eval()
        adapted_logits = adapted(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=0)
    assert (merged_logits - sft_logits).abs().max() > 1e-4  # the adapter trained


def test_lora_actor_with_value_heads_on_its_backbone_is_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match="actor_layout=lora with critic_layout=shared_backbone"):
        run(lag_config(tiny, tmp_path / "x", actor_layout="lora", critic_layout="shared_backbone"))
