"""DPO and its safety-aware family: preference optimisation without rollouts (docs/maths.md §6).

    safealign dpo --model runs/sft/model --train_data runs/world/preferences/train.jsonl --preference better
    safealign dpo --model runs/sft/model --train_data ... --variant safedpo
    safealign dpo --model runs/sft/model --train_data ... --variant bfpo
    safealign dpo --model runs/sft/model --train_data ... --variant modpo --margin_model runs/cm/model
    safealign dpo --model runs/sft/model --train_data ... --variant cdpo --reward_model runs/rm/model --cost_model runs/cm/model --lagrange 1
    SACPO: safealign dpo --model runs/dpo-helpful/model --preference safer --beta 0.01   (β/λ; the reference is the
           helpful model), then P-SACPO: safealign merge --models [runs/dpo-helpful/model, runs/sacpo/model] --weights [0.75, 0.25]

The policy starts from `model` (the SFT model), which is also the frozen reference π_ref. On each PKU-format pair
the chosen response y_w and the rejected y_l come from one preference column:
- `variant: dpo`: `preference: better` (helpfulness, `better_response_id`) or `safer` (harmlessness,
  `safer_response_id`): DPO-HELPFUL and DPO-HARMLESS of the SafeDPO paper;
- `variant: safedpo` (Kim et al. 2025, from a paper note and a third-party re-implementation: no official code):
  y_w from `better_response_id`, then the transform by the safety labels (h = 1 unsafe): keep the pair when y_w is
  safe, swap it when only y_w is unsafe, drop it when both are unsafe (`safedpo_pair`); the loss gets the margin
  m = (h̃_l − h̃_w)·Δ inside the sigmoid (Δ = `safety_margin`, 10 in the paper), so a safe winner over an unsafe
  loser must win by more;
- `variant: bfpo` (Zhang et al. 2024, reference code wx-zhang/bfpo): y_w from `better_response_id`, IPO's squared
  loss toward a target set by both responses' safety labels (`losses.bfpo_loss`: unsafe winners are pushed below
  their losers);
- `variant: modpo` (Zhou et al. 2023, reference code ZHZisZZ/modpo): DPO on helpfulness with the safety objective as
  a margin m(y), weight w on helpfulness (`losses.modpo_loss`); m from `margin_model`: a cost model (m = −cost,
  explicit) or a policy trained by DPO on `safer` (m = margin_beta·log π_m/π_ref, MODPO's implicit reward);
- `variant: cdpo` (C-DPO's inner step, Liu et al. 2024, from the paper's summary: no public code): DPO on soft
  labels p = σ(r_λ(y_w) − r_λ(y_l)), r_λ = r − λ·c from the trained reward and cost models at a fixed λ
  (`losses.soft_label_dpo_loss`); C-DPO's dual ascent on λ reruns it with λ ← max(0, λ + η(E_π[c] − d));
- SACPO (Wachi et al. 2024) is two runs of `dpo`: helpfulness from SFT, then harmlessness from (and with the
  reference) the helpful model at β/λ; P-SACPO merges their weights (`safealign merge`).
Then the loss of `losses.dpo_loss` (DPO, cDPO label smoothing, rDPO, IPO) on log π(y|x) summed over the response
tokens (IPO: their mean, as TRL).

The reference log-probs are computed once, before training, with the initial model in eval mode, and stored with
the run (`output_dir/reference_log_probs.safetensors`, keyed by a hash of the reference's weights files and the
tokenized data): no reference model is held in memory while training, and a resumed run reads them back. The same
holds for MODPO's margins and C-DPO's rewards and costs (`output_dir/pair_scores.safetensors`). Every
other piece (Accelerate, LoRA, checkpoints and exact resume, logging) is the supervised loop's.

Speed (bench/bench_dpo.py against TRL's DPOTrainer): each pair is one row, prompt + chosen + rejected, the prompt
computed once (prefix sharing: a 4D mask hides the chosen answer from the rejected one, whose position ids restart
at the prompt's end: `models.label_logits.shared_prompt_logits`), and the LM head runs on the answer positions only.
A check on the first pairs before training falls back to two rows per pair when the model does not give the same
log-probs that way (`share_prompt: false` forces it).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import track
from safetensors.torch import load_file, save_file

from safealign.algorithms.losses import (
    bfpo_loss,
    dpo_loss,
    grouped_log_probs,
    label_log_probs,
    modpo_loss,
    sequence_log_probs,
    soft_label_dpo_loss,
)
from safealign.config import ConfigError, config_field
from safealign.console import stderr_console
from safealign.data.collate import collate_sft
from safealign.data.formatting import IGNORE_INDEX, TokenizedExample, tokenize_examples
from safealign.data.loading import load_preferences, split_eval
from safealign.data.schema import PreferenceRecord
from safealign.io import atomic_path
from safealign.models.label_logits import LabelLogits, causal_forward, shared_prompt_logits
from safealign.models.lora import require_pretrained_base
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.training.supervised import Step, SupervisedConfig, train

REFERENCE_FILE = "reference_log_probs.safetensors"
PAIR_SCORES_FILE = "pair_scores.safetensors"
SHARE_CHECK_PAIRS = 2  # pairs on which one row per pair must give the two-row log-probs (share_prompt): a cheap check
Variant = Literal["dpo", "safedpo", "bfpo", "modpo", "cdpo"]


@dataclass
class DPOConfig(SupervisedConfig):
    """DPO / SafeDPO from an SFT model. Defaults: the paper's β (0.1); the learning rate and batch sized for the
    tiny preset on SafeWorld (the paper's 1e-6 with RMSprop is for 7B models)."""

    output_dir: str = config_field("runs/dpo", help="Run directory: config.yaml, logs/, checkpoints/, model/, metrics.json, reference_log_probs.safetensors.")
    model: str = config_field("runs/sft/model", help="Initial policy, and the frozen reference: the SFT model directory.")
    train_data: str = config_field("", help="Preference pairs (PKU-SafeRLHF format): a JSONL/JSON/Parquet/CSV file or a datasets directory.")
    eval_data: str = config_field("", help="Held-out pairs; '' = hold out eval_fraction of train_data.")
    eval_fraction: float = config_field(0.05, help="Fraction of train_data held out for evaluation when eval_data is empty (0 = none).")
    variant: Variant = config_field("dpo", help="dpo: one preference column; safedpo: helpfulness with SafeDPO's safety transform and margin; bfpo: helpfulness with BFPO's safety-set targets; modpo: helpfulness with margin_model's safety margin; cdpo: soft labels from reward_model − lagrange·cost_model.")
    preference: Literal["better", "safer"] = config_field("better", help="dpo: the chosen response is better_response_id's (helpfulness) or safer_response_id's (harmlessness).")
    beta: float = config_field(0.1, help="β: the strength of the KL to the reference (the paper's 0.1); IPO's τ.")
    loss_type: Literal["sigmoid", "robust", "ipo"] = config_field("sigmoid", help="sigmoid (DPO, cDPO with label_smoothing), robust (rDPO), ipo (squared loss on per-token mean log-ratios).")
    label_smoothing: float = config_field(0.0, help="ε: the share of labels assumed flipped (cDPO, rDPO); 0 = plain DPO.")
    safety_margin: float = config_field(10.0, help="safedpo: Δ, the margin a safe winner must reach over an unsafe loser (the paper's 10).")
    bfpo_b1: float = config_field(3.0, help="bfpo: B1 (> 1) of the target B1·B3·I_safe(y_w) − B3·I_safe(y_l) − α, B3 = 1/(B1 − 1) (the paper's 3).")
    bfpo_alpha: float = config_field(0.5, help="bfpo: α, the target's offset (the paper's 0.5).")
    margin_model: str = config_field("", help="modpo: the safety objective: a cost model directory (m = −cost) or a policy trained by `dpo --preference safer` (m = margin_beta·log π_m/π_ref).")
    margin_beta: float = config_field(0.1, help="modpo with a policy as margin_model: the β it was trained with (its implicit reward's scale).")
    modpo_weight: float = config_field(0.5, help="modpo: w, the weight of helpfulness; 1 − w that of the margin objective (the paper's BeaverTails recipe: 0.5).")
    reward_model: str = config_field("", help="cdpo: the reward model directory (r).")
    cost_model: str = config_field("", help="cdpo: the cost model directory (c).")
    lagrange: float = config_field(1.0, help="cdpo: λ of r_λ = r − λ·c, the soft labels' reward.")
    max_length: int = config_field(256, help="Tokens per text (prompt + response + EOS); longer ones lose the response's end.")
    share_prompt: bool = config_field(
        True, help="One row per pair, prompt + chosen + rejected, the prompt computed once (prefix sharing: a 4D mask hides the "
                   "chosen answer from the rejected one); used when a check on the first pairs gives the two-row log-probs "
                   "(else two rows per pair, with a warning). false = two rows per pair.")
    learning_rate: float = config_field(1e-5, help="Peak learning rate of AdamW (chosen for the tiny preset on SafeWorld's dev split; ~5e-7 for a pretrained 1B+ model).")
    num_epochs: float = config_field(1.0, help="Passes over the pairs (fractions allowed); ignored when max_steps > 0.")
    per_device_train_batch_size: int = config_field(16, help="Pairs per micro-batch on each process (2× that many texts per forward).")
    per_device_eval_batch_size: int = config_field(32, help="Pairs per evaluation batch on each process.")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo: beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo: label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.variant in ("safedpo", "bfpo", "modpo", "cdpo") and self.preference != "better":
            raise ConfigError(f"dpo: variant {self.variant} takes the winner from better_response_id (preference: better)")
        if self.variant == "bfpo" and self.bfpo_b1 <= 1:
            raise ConfigError(f"dpo: bfpo_b1 must be > 1, got {self.bfpo_b1}")
        if self.variant == "modpo" and (not self.margin_model or not 0 < self.modpo_weight <= 1):
            raise ConfigError("dpo: variant modpo needs margin_model (a cost model or a DPO policy) and 0 < modpo_weight <= 1")
        if self.variant == "cdpo" and (not self.reward_model or not self.cost_model or self.lagrange < 0):
            raise ConfigError("dpo: variant cdpo needs reward_model, cost_model and lagrange >= 0")
        if self.variant in ("bfpo", "modpo", "cdpo") and self.loss_type != "sigmoid":
            raise ConfigError(f"dpo: variant {self.variant} has its own loss; loss_type applies to dpo and safedpo only")


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
    index: int  # into the reference log-probs and pair scores
    texts: tuple[str, str, str]  # prompt, chosen response, rejected response (for the score models)
    safe: tuple[float, float]  # I_safe(y_w), I_safe(y_l): 1 = safe (BFPO's convention, converted here)


def dpo_examples(records: list[PreferenceRecord], tokenizer: Any, cfg: DPOConfig) -> list[DPOExample]:
    """Chosen and rejected responses of each pair by `cfg.variant` / `cfg.preference`, tokenized; SafeDPO's dropped
    pairs left out."""
    chosen, rejected, margins, safe = [], [], [], []
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
        safe.append((float(record.is_safe(winner)), float(record.is_safe(loser))))
    tokenized = tokenize_examples(tokenizer, [p for p, _ in chosen + rejected], [r for _, r in chosen + rejected], cfg.max_length)
    n = len(chosen)
    return [DPOExample(tokenized[i], tokenized[n + i], margins[i], i, (chosen[i][0], chosen[i][1], rejected[i][1]), safe[i])
            for i in range(n)]


def collate_dpo(examples: list[DPOExample], pad_token_id: int, reference: torch.Tensor | None = None,
                pair_scores: dict[str, torch.Tensor] | None = None, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """The pairs' rows (`collate_two_rows` or, `share_prompt`, `collate_shared_prompt`), the margins, the safety labels
    and, once computed, the reference log-probs (B, 2) and pair scores (B, 2) of the rows (chosen, rejected)."""
    batch = collate_shared_prompt(examples, pad_token_id) if share_prompt else collate_two_rows(examples, pad_token_id)
    batch["margins"] = torch.tensor([e.margin for e in examples], dtype=torch.float32)  # size = (B,)
    batch["safe"] = torch.tensor([e.safe for e in examples], dtype=torch.float32)  # size = (B, 2)
    rows = [e.index for e in examples]
    if reference is not None:
        batch["reference_log_probs"] = reference[rows]  # size = (B, 2)
    for name, values in (pair_scores or {}).items():
        batch[name] = values[rows]  # size = (B, 2)
    return batch


def collate_two_rows(examples: list[DPOExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded rows (the chosen responses, then the rejected) and their labels: (2B, L) each."""
    return collate_sft([e.chosen for e in examples] + [e.rejected for e in examples], pad_token_id)


def prompt_length(example: DPOExample) -> int | None:
    """The prompt tokens the pair's two texts share (those before the first label), None when they differ."""
    length = next((t for t, label in enumerate(example.chosen.labels) if label != IGNORE_INDEX), len(example.chosen))
    same = example.rejected.input_ids[:length] == example.chosen.input_ids[:length]
    return length if same and all(label == IGNORE_INDEX for label in example.rejected.labels[:length]) else None


def collate_shared_prompt(examples: list[DPOExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B right-padded rows prompt + chosen + rejected (`models.label_logits.shared_prompt_logits` reads them):
    input_ids, position_ids, segments, attention_mask (B, L): the rejected answer's positions restart where the
    prompt ends; predictors (N,): the flat position (into B·L) whose logits predict each answer token, the prompt's
    last one for each answer's first token; targets (N,) those tokens; sequences (N,): b for pair b's chosen
    answer, B + b for its rejected one (the order of `collate_two_rows`' rows)."""
    num_pairs = len(examples)
    prompts = [prompt_length(e) for e in examples]
    if None in prompts:
        raise ValueError("collate_shared_prompt: a pair's two texts do not share their prompt tokens")
    length = max(len(e.chosen) + len(e.rejected) - p for p, e in zip(prompts, examples))  # P + C + R
    input_ids = torch.full((num_pairs, length), pad_token_id, dtype=torch.long)  # size = (B, L)
    position_ids = torch.zeros(num_pairs, length, dtype=torch.long)  # size = (B, L)
    segments = torch.zeros(num_pairs, length, dtype=torch.long)  # size = (B, L): 1 prompt, 2 chosen, 3 rejected, 0 pad
    predictors, targets, sequences = [], [], []
    for b, (p, e) in enumerate(zip(prompts, examples)):
        chosen, rejected = e.chosen.input_ids[p:], e.rejected.input_ids[p:]
        c, r = len(chosen), len(rejected)
        input_ids[b, :p + c + r] = torch.tensor(e.chosen.input_ids[:p] + chosen + rejected)
        position_ids[b, :p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        segments[b, :p + c + r] = torch.tensor([1] * p + [2] * c + [3] * r)
        row = b * length
        predictors += [row + p - 1] + [row + p + j for j in range(c - 1)]  # chosen token j from position p − 1 + j
        predictors += [row + p - 1] + [row + p + c + j for j in range(r - 1)]  # rejected: the prompt's end, then its own
        targets += chosen + rejected
        sequences += [b] * c + [num_pairs + b] * r
    return {"input_ids": input_ids, "position_ids": position_ids, "segments": segments,
            "attention_mask": (segments != 0).long(), "predictors": torch.tensor(predictors),
            "targets": torch.tensor(targets), "sequences": torch.tensor(sequences)}


def policy_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool,
                     label_logits: LabelLogits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_w|x), log π(y_l|x) of the batch's pairs: (B,), (B,). Rows prompt + chosen + rejected (a batch with
    `segments`): one forward, the LM head on the answer positions only. Two rows per pair: with `label_logits` (a
    step's, checked once) the head on the response positions only; without, on every position."""
    if "segments" in batch:
        num_pairs = batch["segments"].size(0)
        log_probs = grouped_log_probs(shared_prompt_logits(model, batch), batch["targets"], batch["sequences"],
                                      2 * num_pairs, average)  # size = (2B,)
    elif label_logits is None:
        log_probs = sequence_log_probs(causal_forward(model, batch), batch["labels"], average)  # size = (2B,)
    else:
        log_probs = label_log_probs(label_logits(model, batch), batch["labels"], average)  # size = (2B,)
    return log_probs.chunk(2)


@torch.no_grad()
def shared_prompt_works(model: torch.nn.Module, examples: list[DPOExample], pad_token_id: int) -> bool:
    """Whether one row per pair (prompt + chosen + rejected) gives the log-probs of two rows per pair on these pairs
    (a model that does not take a 4D mask or position ids would not): checked once, before anything trains."""
    if not examples or any(prompt_length(e) is None for e in examples):
        return False
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        shared = policy_log_probs(model, {k: v.to(device) for k, v in collate_shared_prompt(examples, pad_token_id).items()}, False)
        works = True
    except Exception:  # noqa: BLE001 - any failure of the shared path means: two rows per pair
        works = False
    if works:
        separate = policy_log_probs(model, {k: v.to(device) for k, v in collate_two_rows(examples, pad_token_id).items()}, False)
        works = all(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-3) for a, b in zip(shared, separate))
    model.train(was_training)
    if not works:
        warnings.warn("dpo: one row per pair (the prompt shared by both answers) does not give this model's two-row "
                      "log-probs; using two rows per pair (slower).")
    return works


class DPOStep(Step):
    """The DPO loss on one micro-batch of pairs; items = pairs."""

    def __init__(self, cfg: DPOConfig) -> None:
        self.cfg = cfg
        self.label_logits = LabelLogits("dpo")  # the LM head on the response positions only, checked once

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["margins"])

    def example_length(self, example: DPOExample) -> int:
        return max(len(example.chosen), len(example.rejected))

    def _losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair losses and the implicit rewards β·(log π − log π_ref) of the chosen and rejected responses."""
        chosen, rejected = policy_log_probs(model, batch, self.cfg.loss_type == "ipo", self.label_logits)
        reference = batch["reference_log_probs"]  # size = (B, 2)
        chosen_ratio, rejected_ratio = chosen - reference[:, 0], rejected - reference[:, 1]  # size = (B,)
        cfg = self.cfg
        if cfg.variant == "bfpo":
            losses = bfpo_loss(chosen_ratio, rejected_ratio, batch["safe"][:, 0], batch["safe"][:, 1], cfg.beta,
                               cfg.bfpo_b1, cfg.bfpo_alpha)
        elif cfg.variant == "modpo":
            margin = batch["margin_rewards"]  # size = (B, 2)
            losses = modpo_loss(chosen_ratio, rejected_ratio, margin[:, 0], margin[:, 1], cfg.beta, cfg.modpo_weight)
        elif cfg.variant == "cdpo":
            lagrangian = batch["rewards"] - cfg.lagrange * batch["costs"]  # size = (B, 2): r_λ of (y_w, y_l)
            losses = soft_label_dpo_loss(chosen_ratio, rejected_ratio, cfg.beta, torch.sigmoid(lagrangian[:, 0] - lagrangian[:, 1]))
        else:
            losses = dpo_loss(chosen_ratio, rejected_ratio, cfg.beta, cfg.label_smoothing, cfg.loss_type, batch["margins"])
        return losses, cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()

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


def _fingerprint(model_dirs: list[str], examples: list[DPOExample], settings: dict[str, Any]) -> str:
    """What precomputed values depend on: the models' weights files, the tokenized rows, the settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for model_dir in model_dirs:
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            digest.update(f"{model_dir}/{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    for e in examples:
        digest.update(json.dumps([e.chosen.input_ids, e.chosen.labels, e.rejected.input_ids, e.rejected.labels]).encode())
    return digest.hexdigest()


@torch.no_grad()
def reference_log_probs(model: torch.nn.Module, examples: list[DPOExample], pad_token_id: int, average: bool,
                        batch_size: int, share_prompt: bool = False) -> torch.Tensor:
    """log π_ref(y_w|x), log π_ref(y_l|x) of every example, (N, 2), from the initial model in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(examples), 2)
    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda e: max(len(e.chosen), len(e.rejected)))  # similar lengths together: little padding
    starts = range(0, len(ordered), batch_size)
    label_logits = LabelLogits("dpo reference")
    for start in track(starts, description="reference log-probs", total=len(starts), transient=True, console=stderr_console()):
        chunk = ordered[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_dpo(chunk, pad_token_id, share_prompt=share_prompt).items()}
        chosen, rejected = policy_log_probs(model, batch, average, label_logits)
        out[[e.index for e in chunk]] = torch.stack([chosen, rejected], dim=1).float().cpu()
    model.train(was_training)
    return out


def _stored(path: Path, fingerprint: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors read from `path` when its fingerprint matches, else computed and written there (atomically)."""
    if path.is_file():
        stored = load_file(str(path))
        if "fingerprint" in stored and bytes(stored.pop("fingerprint").tolist()).decode() == fingerprint:
            return stored
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({**{k: v.contiguous() for k, v in values.items()},
                   "fingerprint": torch.tensor(list(fingerprint.encode()), dtype=torch.uint8)}, str(tmp))
    return values


def _score_pairs(model_dir: str, examples: list[DPOExample], cfg: DPOConfig) -> torch.Tensor:
    """A reward or cost model's end scores of every example's (chosen, rejected) responses: (N, 2)."""
    model, tokenizer = load_score_model(model_dir), load_tokenizer(model_dir)
    prompts = [e.texts[0] for e in examples] * 2
    responses = [e.texts[1] for e in examples] + [e.texts[2] for e in examples]
    scores = torch.tensor(score_texts(model, tokenizer, prompts, responses, cfg.max_length, cfg.per_device_eval_batch_size))
    return scores.view(2, len(examples)).T.contiguous()  # size = (N, 2)


def _margin_rewards(cfg: DPOConfig, examples: list[DPOExample], reference: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """MODPO's margin m(y) of every example's (chosen, rejected) responses, (N, 2): −cost (or +reward) from a score
    model, or the implicit reward margin_beta·(log π_m − log π_ref) of a policy."""
    config = json.loads((Path(cfg.margin_model) / "config.json").read_text(encoding="utf-8"))
    score_type = config.get("score_type")
    if score_type is not None:
        scores = _score_pairs(cfg.margin_model, examples, cfg)
        return -scores if score_type == "cost" else scores
    margin_policy = build_causal_lm(cfg.margin_model)
    log_probs = reference_log_probs(margin_policy, examples, pad_token_id, False, cfg.per_device_eval_batch_size)
    return cfg.margin_beta * (log_probs - reference)


def _pair_scores(cfg: DPOConfig, examples: list[DPOExample], reference: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The per-pair values a variant needs beyond the reference: MODPO's margins, C-DPO's rewards and costs."""
    path = Path(cfg.output_dir) / PAIR_SCORES_FILE
    if cfg.variant == "modpo":
        fingerprint = _fingerprint([cfg.model, cfg.margin_model], examples, {"margin_beta": cfg.margin_beta, "what": "modpo"})
        return _stored(path, fingerprint, lambda: {"margin_rewards": _margin_rewards(cfg, examples, reference, pad_token_id)})
    if cfg.variant == "cdpo":
        fingerprint = _fingerprint([cfg.reward_model, cfg.cost_model], examples, {"what": "cdpo"})
        return _stored(path, fingerprint, lambda: {"rewards": _score_pairs(cfg.reward_model, examples, cfg),
                                                   "costs": _score_pairs(cfg.cost_model, examples, cfg)})
    return {}


def _stored_reference(cfg: DPOConfig, model: torch.nn.Module, examples: list[DPOExample], pad_token_id: int,
                      share_prompt: bool = False) -> torch.Tensor:
    """The reference log-probs of `examples`, (N, 2): read from output_dir when their fingerprint matches, else computed
    and written there (one row per pair with `share_prompt`: the same values up to float rounding)."""
    average = cfg.loss_type == "ipo"
    fingerprint = _fingerprint([cfg.model], examples, {"average": average})
    stored = _stored(Path(cfg.output_dir) / REFERENCE_FILE, fingerprint, lambda: {
        "log_probs": reference_log_probs(model, examples, pad_token_id, average, cfg.per_device_eval_batch_size,
                                         share_prompt)})
    return stored["log_probs"]


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
    pad = tokenizer.pad_token_id
    share_prompt = cfg.share_prompt and shared_prompt_works(model, train_set[:SHARE_CHECK_PAIRS], pad)
    reference = _stored_reference(cfg, model, train_set + eval_set, pad, share_prompt)
    pair_scores = _pair_scores(cfg, train_set + eval_set, reference, pad)
    collate = partial(collate_dpo, pad_token_id=pad, reference=reference, pair_scores=pair_scores, share_prompt=share_prompt)
    metrics = train(cfg, model, DPOStep(cfg), train_set, collate, eval_set or None, tokenizer)
    return {**metrics, "pairs": len(train_set), "pairs_dropped": len(train_records) - len(train_set)}
