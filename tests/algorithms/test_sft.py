"""SFT on a tiny model: labels, learning, the run directory, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from safealign.algorithms.losses import sft_loss
from safealign.algorithms.sft import SFTConfig, SFTStep, run
from safealign.cli import app
from safealign.config import load_config
from safealign.data.collate import collate_sft
from safealign.data.formatting import IGNORE_INDEX, tokenize_prompt_response
from safealign.models.tokenizer import train_tokenizer


def write_arithmetic(path: Path, n: int = 300, seed: int = 0) -> Path:
    """'what is 3 plus 4' -> '7' rows."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            handle.write(json.dumps({"prompt": f"what is {a} plus {b}", "response": str(a + b)}) + "\n")
    return path


def test_labels_cover_exactly_the_response_and_eos():
    tokenizer = train_tokenizer([f"what is {a} plus {b} {a + b}" for a in range(10) for b in range(10)], vocab_size=300)
    examples = [tokenize_prompt_response(tokenizer, "what is 3 plus 4", "7", 256),
                tokenize_prompt_response(tokenizer, "what is 12 plus 30, please", "42 it is", 256)]
    batch = collate_sft(examples, pad_token_id=tokenizer.pad_token_id)
    for row, (example, response) in enumerate(zip(examples, ["7", "42 it is"])):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == tokenizer(" " + response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert labelled[-1] == tokenizer.eos_token_id
        assert batch["input_ids"][row, : len(example)].tolist() == example.input_ids
        padding = batch["attention_mask"][row] == 0
        assert padding.sum() == batch["input_ids"].shape[1] - len(example)
        assert (batch["labels"][row][padding] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row][padding] == tokenizer.pad_token_id).all()
    # The normaliser counts exactly those tokens (the first position is never a target).
    expected = sum(len(tokenizer(" " + r + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for r in ["7", "42 it is"])
    assert SFTStep().count_items(batch) == expected


def test_sft_loss_falls_and_the_run_directory_is_complete(tmp_path):
    data = write_arithmetic(tmp_path / "train.jsonl", n=320)
    cfg = SFTConfig(train_data=str(data), output_dir=str(tmp_path / "run"), mixed_precision="no", num_epochs=4,
                    per_device_train_batch_size=16, eval_on_start=True, logging_steps=5, eval_fraction=0.1)
    metrics = run(cfg)

    assert metrics["eval_loss"] < 0.7 * metrics["initial_eval_loss"], metrics
    for key in ("train_loss", "eval_loss", "tokens_per_second", "num_parameters", "runtime_s"):
        assert isinstance(metrics[key], (int, float)), key
    out = Path(cfg.output_dir)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert load_config(SFTConfig, out / "config.yaml") == cfg
    assert list((out / "logs").glob("events.out.tfevents.*"))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert (out / "model" / "model.safetensors").is_file()
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.num_parameters() == metrics["num_parameters"]
    with torch.no_grad():  # the saved model is the trained one: its eval loss matches the reported one roughly
        assert model(**tokenizer("what is 3 plus 4", return_tensors="pt")).logits.isfinite().all()


def test_cli_sft_trains_and_prints_metrics(tmp_path):
    data = write_arithmetic(tmp_path / "train.jsonl", n=64)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["sft", "--train_data", str(data), "--output_dir", str(out), "--max_steps", "5",
                                      "--per_device_train_batch_size", "8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 5
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 5
    assert (out / "model" / "config.json").is_file()


def test_cli_sft_rejects_an_unknown_key_clearly(tmp_path):
    data = write_arithmetic(tmp_path / "train.jsonl", n=8)
    result = CliRunner().invoke(app, ["sft", "--train_data", str(data), "--learning_rat", "1e-3"])
    assert result.exit_code == 2
    assert "unknown key 'learning_rat'" in result.output and "learning_rate" in result.output


def test_cli_sft_without_train_data_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["sft", "--output_dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "train_data is required" in result.output


def _tiny_lm(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _label_batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_label_position_head_gives_the_full_loss_and_gradient(kind):
    """The LM head on label positions only is an optimisation: same loss and same gradient as full logits."""
    model, batch = _tiny_lm(kind), _label_batch()
    step = SFTStep()
    loss, _ = step.loss(model, batch, torch.tensor(12))
    assert step.label_positions_only is True
    loss.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = sft_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"], torch.tensor(12))
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for fast, full in zip(fast_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-6)


def test_label_position_head_falls_back_when_the_head_is_not_the_output_embeddings(monkeypatch):
    model, batch = _tiny_lm("llama"), _label_batch()
    monkeypatch.setattr(model, "get_output_embeddings", lambda: torch.nn.Linear(32, 100))  # a head the forward never calls
    step = SFTStep()
    with pytest.warns(UserWarning, match="full logits"):
        loss, _ = step.loss(model, batch, torch.tensor(12))
    assert step.label_positions_only is False
    reference = sft_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"], torch.tensor(12))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_length_grouped_sft_weighs_every_label_token_alike():
    """With `mean_label_tokens` (grouped batches) items are examples and a step's loss is its token NLL sum over
    examples × mean tokens: a short-example batch no longer gives its tokens more weight than a long one."""
    model, batch = _tiny_lm("llama"), _label_batch()  # rows with 5, 2 and 5 label tokens
    plain, grouped = SFTStep(), SFTStep(mean_label_tokens=4.0)
    assert plain.count_items(batch) == 12 and grouped.count_items(batch) == 3
    token_sum = sft_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"], 1)
    plain_loss, _ = plain.loss(model, batch, torch.tensor(12))
    grouped_loss, _ = grouped.loss(model, batch, torch.tensor(3))
    assert plain_loss.item() == pytest.approx(token_sum.item() / 12, rel=1e-5)
    assert grouped_loss.item() == pytest.approx(token_sum.item() / (3 * 4.0), rel=1e-5)
    # Accumulation stays exact: the step's examples (here 6: this batch twice) set the normaliser.
    half, _ = grouped.loss(model, batch, torch.tensor(6))
    assert 2 * half.item() == pytest.approx(grouped_loss.item(), rel=1e-5)


def test_sft_with_length_grouping_weighs_tokens_by_the_training_sets_mean_and_learns(tmp_path, monkeypatch):
    import safealign.algorithms.sft as sft_module

    steps = []

    class RecordingStep(SFTStep):
        def __init__(self, mean_label_tokens=None):
            super().__init__(mean_label_tokens)
            steps.append(self)

    monkeypatch.setattr(sft_module, "SFTStep", RecordingStep)
    data = write_arithmetic(tmp_path / "train.jsonl", n=320)
    common = dict(train_data=str(data), mixed_precision="no", per_device_train_batch_size=16, logging_steps=5,
                  eval_fraction=0.1)
    run(SFTConfig(output_dir=str(tmp_path / "plain"), max_steps=1, **common))
    metrics = run(SFTConfig(output_dir=str(tmp_path / "run"), num_epochs=4, eval_on_start=True, length_group_size=4,
                            **common))
    assert steps[0].mean_label_tokens is None  # plain shuffling: the step's own token count
    # Grouped: the mean label tokens per training example ("7" or "13" + EOS: 2 or 3 with this tokenizer).
    assert steps[1].mean_label_tokens is not None and 1.0 < steps[1].mean_label_tokens < 4.0
    assert metrics["eval_loss"] < 0.7 * metrics["initial_eval_loss"], metrics
