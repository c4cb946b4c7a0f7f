"""DPO and SafeDPO: preference optimisation without a reward model or rollouts (docs/maths.md §6).

    safealign dpo --model runs/sft/model --train_data runs/world/preferences/train.jsonl --preference better
    safealign dpo --model runs/sft/model --train_data ... --variant safedpo

The policy starts from `model` (the SFT model), which is also the frozen reference π_ref. On each PKU-format pair
the chosen response y_w and the rejected y_l come from one preference column:
- `variant: dpo`: `preference: better` (helpfulness, `better_response_id`) or `safer` (harmlessness,
  `safer_response_id`): DPO-HELPFUL and DPO-HARMLESS of the SafeDPO paper;
- `variant: safedpo` (Kim et al. 2025, from a paper note and a third-party re-implementation: no official code):
  y_w from `better_response_id`, then the transform by the safety labels (h = 1 unsafe): keep the pair when y_w is
  safe, swap it when only y_w is unsafe, drop it when both are unsafe (`safedpo_pair`); the loss gets the margin
  m = (h̃_l − h̃_w)·Δ inside the sigmoid (Δ = `safety_margin`, 10 in the paper), so a safe winner over an unsafe
  loser must win by more.
Then the loss of `losses.dpo_loss` (DPO, cDPO label smoothing, rDPO, IPO) on log π(y|x) summed over the response
tokens (IPO: their mean, as TRL).

The reference log-probs are computed once, before training, with the initial model in eval mode, and stored with
the run (`output_dir/reference_log_probs.safetensors`, keyed by a hash of the reference's weights files and the
tokenized data): no reference model is held in memory while training, and a resumed run reads them back. Every
other piece (Accelerate, LoRA, checkpoints and exact resume, logging) is the supervised loop's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import track
from safetensors.torch import load_file, save_file

from safealign.algorithms.losses import dpo_loss, sequence_log_probs
from safealign.config import ConfigError, config_field
from safealign.console import stderr_console
from safealign.data.collate import collate_sft, padding_mask_for_causal
from safealign.data.formatting import TokenizedExample, tokenize_examples
from safealign.data.loading import load_preferences, split_eval
from safealign.data.schema import PreferenceRecord
from safealign.io import atomic_path
from safealign.models.lora import require_pretrained_base
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import load_tokenizer
from safealign.training.supervised import Step, SupervisedConfig, train

REFERENCE_FILE = "reference_log_probs.safetensors"


@dataclass
class DPOConfig(SupervisedConfig):
    """DPO / SafeDPO from an SFT model. Defaults: the paper's β (0.1); the learning rate and batch sized for the
    tiny preset on SafeWorld (the paper's 1e-6 with RMSprop is for 7B models)."""

    output_dir: str = config_field("runs/dpo", help="Run directory: config.yaml, logs/, checkpoints/, model/, metrics.json, reference_log_probs.safetensors.")
    model: str = config_field("runs/sft/model", help="Initial policy, and the frozen reference: the SFT model directory.")
    train_data: str = config_field("", help="Preference pairs (PKU-SafeRLHF format): a JSONL/JSON/Parquet/CSV file or a datasets directory.")
    eval_data: str = config_field("", help="Held-out pairs; '' = hold out eval_fraction of train_data.")
    eval_fraction: float = config_field(0.05, help="Fraction of train_data held out for evaluation when eval_data is empty (0 = none).")
    variant: Literal["dpo", "safedpo"] = config_field("dpo", help="dpo: one preference column; safedpo: helpfulness with SafeDPO's safety transform and margin.")
    preference: Literal["better", "safer"] = config_field("better", help="dpo: the chosen response is better_response_id's (helpfulness) or safer_response_id's (harmlessness).")
    beta: float = config_field(0.1, help="β: the strength of the KL to the reference (the paper's 0.1); IPO's τ.")
    loss_type: Literal["sigmoid", "robust", "ipo"] = config_field("sigmoid", help="sigmoid (DPO, cDPO with label_smoothing), robust (rDPO), ipo (squared loss on per-token mean log-ratios).")
    label_smoothing: float = config_field(0.0, help="ε: the share of labels assumed flipped (cDPO, rDPO); 0 = plain DPO.")
    safety_margin: float = config_field(10.0, help="safedpo: Δ, the margin a safe winner must reach over an unsafe loser (the paper's 10).")
    max_length: int = config_field(256, help="Tokens per text (prompt + response + EOS); longer ones lose the response's end.")
    learning_rate: float = config_field(1e-4, help="Peak learning rate of AdamW (tiny model on SafeWorld; ~5e-7 for a pretrained 1B+ model).")
    num_epochs: float = config_field(1.0, help="Passes over the pairs (fractions allowed); ignored when max_steps > 0.")
    per_device_train_batch_size: int = config_field(16, help="Pairs per micro-batch on each process (2× that many texts per forward).")
    per_device_eval_batch_size: int = config_field(32, help="Pairs per evaluation batch on each process.")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo: beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo: label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.variant == "safedpo" and self.preference != "better":
            raise ConfigError("dpo: variant safedpo takes the winner from better_response_id (preference: better)")


def safedpo_pair(better: int, is_safe: tuple[bool, bool]) -> tuple[int, int, float] | None:
    """SafeDPO's transform of one pair: (chosen index, rejected index, h̃_l − h̃_w), or None to drop it.
    h = 1 for an unsafe response: the winner kept when safe, the pair swapped when only the winner is unsafe,
    dropped when both are."""
    winner, loser = better, 1 - better
    h_w, h_l = int(not is_safe[winner]), int(not is_safe[loser])
    if h_w and h_l:
        return None
    if h_w:
        winner, loser, h_w, h_l = loser, winner, 0, 1
    return winner, loser, float(h_l - h_w)


@dataclass
class DPOExample:
    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float  # (h̃_l − h̃_w)·Δ; 0 for plain DPO
    index: int  # into the reference log-probs


def dpo_examples(records: list[PreferenceRecord], tokenizer: Any, cfg: DPOConfig) -> list[DPOExample]:
    """Chosen and rejected responses of each pair by `cfg.variant` / `cfg.preference`, tokenized; SafeDPO's dropped
    pairs left out."""
    chosen, rejected, margins = [], [], []
    for record in records:
        if cfg.variant == "safedpo":
            picked = safedpo_pair(record.better_response_id, (record.is_safe(0), record.is_safe(1)))
            if picked is None:
                continue
            winner, loser, unsafe_gap = picked
            margin = unsafe_gap * cfg.safety_margin
        else:
            winner = record.better_response_id if cfg.preference == "better" else record.safer_response_id
            loser, margin = 1 - winner, 0.0
        chosen.append((record.prompt, record.response(winner)))
        rejected.append((record.prompt, record.response(loser)))
        margins.append(margin)
    tokenized = tokenize_examples(tokenizer, [p for p, _ in chosen + rejected], [r for _, r in chosen + rejected], cfg.max_length)
    n = len(chosen)
    return [DPOExample(tokenized[i], tokenized[n + i], margins[i], i) for i in range(n)]


def collate_dpo(examples: list[DPOExample], pad_token_id: int, reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """2B right-padded rows (the chosen responses, then the rejected), their labels, the margins and, once computed,
    the reference log-probs (B, 2) of the rows (chosen, rejected)."""
    batch = collate_sft([e.chosen for e in examples] + [e.rejected for e in examples], pad_token_id)  # (2B, L) each
    batch["margins"] = torch.tensor([e.margin for e in examples], dtype=torch.float32)  # size = (B,)
    if reference is not None:
        batch["reference_log_probs"] = reference[[e.index for e in examples]]  # size = (B, 2)
    return batch


def policy_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_w|x), log π(y_l|x) of the batch's pairs: (B,), (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=padding_mask_for_causal(batch["attention_mask"]),
                   use_cache=False).logits  # size = (2B, L, V)
    log_probs = sequence_log_probs(logits, batch["labels"], average)  # size = (2B,)
    return log_probs.chunk(2)


class DPOStep(Step):
    """The DPO loss on one micro-batch of pairs; items = pairs."""

    def __init__(self, cfg: DPOConfig) -> None:
        self.cfg = cfg

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["margins"])

    def example_length(self, example: DPOExample) -> int:
        return max(len(example.chosen), len(example.rejected))

    def _losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses and the implicit rewards β·(log π − log π_ref) of the chosen and rejected responses."""
        chosen, rejected = policy_log_probs(model, batch, average=self.cfg.loss_type == "ipo")
        reference = batch["reference_log_probs"]  # size = (B, 2)
        chosen_ratio, rejected_ratio = chosen - reference[:, 0], rejected - reference[:, 1]  # size = (B,)
        losses = dpo_loss(chosen_ratio, rejected_ratio, self.cfg.beta, self.cfg.label_smoothing, self.cfg.loss_type,
                          batch["margins"])
        return losses, self.cfg.beta * chosen_ratio.detach(), self.cfg.beta * rejected_ratio.detach()

    def loss(self, model, batch, num_items):
        losses, chosen_reward, rejected_reward = self._losses(model, batch)
        return losses.sum() / num_items, {
            "reward_accuracy": (chosen_reward > rejected_reward).float().sum() / num_items,
            "reward_margin": (chosen_reward - rejected_reward).sum() / num_items,
            "chosen_reward": chosen_reward.sum() / num_items,
            "rejected_reward": rejected_reward.sum() / num_items,
        }

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        sums = torch.zeros(4, dtype=torch.float64)
        for batch in loader:
            losses, chosen, rejected = self._losses(model, batch)
            rows = torch.stack([losses.detach(), (chosen > rejected).float(), chosen - rejected,
                                torch.ones_like(losses)], dim=1)  # size = (B, 4)
            sums += accelerator.gather_for_metrics(rows).double().sum(dim=0).cpu()
        loss, accuracy, margin, count = sums.tolist()
        count = max(count, 1.0)
        return {"loss": loss / count, "reward_accuracy": accuracy / count, "reward_margin": margin / count}


def _fingerprint(model_dir: str, examples: list[DPOExample], average: bool) -> str:
    """What the reference log-probs depend on: the reference's weights files, the tokenized rows, the averaging."""
    digest = hashlib.sha256(json.dumps({"average": average}).encode())
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    for e in examples:
        digest.update(json.dumps([e.chosen.input_ids, e.chosen.labels, e.rejected.input_ids, e.rejected.labels]).encode())
    return digest.hexdigest()


@torch.no_grad()
def reference_log_probs(model: torch.nn.Module, examples: list[DPOExample], pad_token_id: int, average: bool,
                        batch_size: int) -> torch.Tensor:
    """log π_ref(y_w|x), log π_ref(y_l|x) of every example, (N, 2), from the initial model in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), 2)
    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda e: max(len(e.chosen), len(e.rejected)))  # similar lengths together: little padding
    starts = range(0, len(ordered), batch_size)
    for start in track(starts, description="reference log-probs", total=len(starts), transient=True, console=stderr_console()):
        chunk = ordered[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_dpo(chunk, pad_token_id).items()}
        chosen, rejected = policy_log_probs(model, batch, average)
        out[[e.index for e in chunk]] = torch.stack([chosen, rejected], dim=1).float().cpu()
    model.train(was_training)
    return out


def _stored_reference(cfg: DPOConfig, model: torch.nn.Module, examples: list[DPOExample], pad_token_id: int) -> torch.Tensor:
    """The reference log-probs of `examples`: read from output_dir when their fingerprint matches, else computed and
    written there (atomically)."""
    average = cfg.loss_type == "ipo"
    fingerprint = _fingerprint(cfg.model, examples, average)
    path = Path(cfg.output_dir) / REFERENCE_FILE
    if path.is_file():
        stored = load_file(str(path))
        if "fingerprint" in stored and bytes(stored["fingerprint"].tolist()).decode() == fingerprint:
            return stored["log_probs"]
    values = reference_log_probs(model, examples, pad_token_id, average, cfg.per_device_eval_batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"log_probs": values.contiguous(), "fingerprint": torch.tensor(list(fingerprint.encode()), dtype=torch.uint8)},
                  str(tmp))
    return values


def run(cfg: DPOConfig) -> dict[str, Any]:
    """Train the policy by DPO / SafeDPO; returns flat metrics (train_loss, eval_loss, eval_reward_accuracy, ...)."""
    if not cfg.train_data:
        raise ConfigError("dpo: train_data is required (PKU-format preference pairs)")
    if cfg.adapter == "lora":
        require_pretrained_base(cfg.model, "dpo")
    records = list(load_preferences(cfg.train_data))
    if cfg.eval_data:
        train_records, eval_records = records, list(load_preferences(cfg.eval_data))
    else:
        train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = build_causal_lm(cfg.model, tokenizer)
    train_set = dpo_examples(train_records, tokenizer, cfg)
    eval_set = dpo_examples(eval_records, tokenizer, cfg)
    if not train_set:
        raise ConfigError(f"dpo: no pair of {cfg.train_data} is left to train on (SafeDPO drops pairs whose responses are both unsafe)")
    # One table for both sets: the eval examples' indices follow the train examples'.
    for offset, example in enumerate(eval_set, start=len(train_set)):
        example.index = offset
    reference = _stored_reference(cfg, model, train_set + eval_set, tokenizer.pad_token_id)
    collate = partial(collate_dpo, pad_token_id=tokenizer.pad_token_id, reference=reference)
    metrics = train(cfg, model, DPOStep(cfg), train_set, collate, eval_set or None, tokenizer)
    return {**metrics, "pairs": len(train_set), "pairs_dropped": len(train_records) - len(train_set)}
