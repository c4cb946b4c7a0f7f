"""Cost model: Bradley-Terry on the harmlessness preference plus the safety-sign terms (docs/maths.md §2).

    L_C = mean_B[ −log σ(c_u − c_s) − log σ(s(y_u)·c_u) − log σ(s(y_s)·c_s) ] + η · mean(c_u², c_s²)

c_u is the cost of the less-safe response (the one *not* chosen by `safer_response_id`), c_s of the safer
one; s(y) = +1 if y is labelled unsafe, −1 if safe (`is_response_*_safe`). **Cost > 0 means unsafe.**
`variant="classifier"` keeps only the sign terms: the paper's ablation of a cost model that classifies
instead of also ranking (`losses.cost_loss(use_pairwise=False)`).

`splice_fraction` > 0 adds spliced pairs to the training set (`data/augment.py`): a safe response with one
sentence of its pair's unsafe response inserted, labelled unsafe. Not in the paper, so off by default (the
pipeline too: `--cm "{splice_fraction: 1.0}"`). Without it the policy learns to hide harmful fragments inside
refusals, which the cost model scores as safe; with it, over eight seeds, fewer unsafe answers got through but
more borderline prompts were refused (docs/results.md).

Pairs, batching (both responses in one forward), the loop and the saved score model are shared with the
reward model (`preference_model.py`).

`category_head` fits, after training, the cost model's category head (`models/category_head.py`): which harm
categories a prompt asks about, for the per-category constraints on prompts that carry no category.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState

from safealign.algorithms.losses import cost_loss, safety_sign, soft_cost_loss
from safealign.algorithms.preference_model import (
    PairStep,
    PreferenceModelConfig,
    load_pair_splits,
    pick,
    train_preference_model,
)
from safealign.config import ConfigError, config_field
from safealign.data.augment import splice_unsafe_pairs
from safealign.io import atomic_write_json
from safealign.models.category_head import (
    fit_category_head,
    head_metrics,
    prompt_category_labels,
    prompt_features,
    save_category_head,
)
from safealign.models.presets import resolve_device
from safealign.models.score_model import load_score_model
from safealign.models.tokenizer import load_tokenizer


@dataclass
class CostConfig(PreferenceModelConfig):
    """Cost model on `safer_response_id` and the is-safe labels. Defaults suit the tiny preset on SafeWorld."""

    output_dir: str = config_field("runs/cm", help="Run directory: config.yaml, logs/, checkpoints/, model/ (a cost score model), metrics.json.")
    num_epochs: float = config_field(2.0, help="Passes over the training pairs (fractions allowed); ignored when max_steps > 0.")
    learning_rate: float = config_field(1e-3, help="Peak learning rate of AdamW (1e-3 for the tiny preset; ~1e-5 for a pretrained model).")
    variant: Literal["preference", "classifier"] = config_field(
        "preference", help="preference = ranking + sign terms (Safe RLHF); classifier = sign terms only (the paper's ablation).")
    splice_fraction: float = config_field(
        0.0, help="Share of the training pairs with one safe and one unsafe response that also give a spliced pair: the safe "
                  "response with a sentence of the unsafe one inserted, labelled unsafe (data/augment.py; not in the paper). "
                  "0 = off (default); 1 = every such pair.")
    category_head: bool = config_field(
        False, help="Also fit a multi-label harm-category head on the trained cost model's prompt features (labels: the "
                    "responses' response_*_harm_category), saved beside it: the per-category constraints use it for "
                    "prompts without a category.")
    category_head_l2: float = config_field(
        1e-5, help="L2 weight of the category head's logistic regression (standardised features; chosen on SafeWorld's dev pairs).")


class CostStep(PairStep):
    """Cost loss on (less safe, safer); logs ranking accuracy (c_u > c_s) and sign accuracy (sign(c) = s(y))."""

    def __init__(self, l2_coeff: float = 1e-3, use_pairwise: bool = True) -> None:
        self.l2_coeff, self.use_pairwise = l2_coeff, use_pairwise

    def _split(self, scores: torch.Tensor, safer_id: torch.Tensor, is_safe: torch.Tensor):
        """(c_u, c_s, s(y_u), s(y_s)), each (B,), from scores (B, 2), safer ids (B,), is-safe labels (B, 2)."""
        unsafer_id = 1 - safer_id  # size = (B,)
        return (pick(scores, unsafer_id), pick(scores, safer_id),
                safety_sign(pick(is_safe.long(), unsafer_id)), safety_sign(pick(is_safe.long(), safer_id)))

    def loss(self, model, batch, num_items):
        scores = self.pair_scores(model, batch)  # size = (B, 2)
        unsafer, safer, unsafer_sign, safer_sign = self._split(scores, batch["safer_response_id"], batch["is_safe"])
        share = len(unsafer) / num_items  # this micro-batch's share of the step's pairs
        if "targets" in batch:  # soft labels (labels: soft / dawid-skene, label_smoothing)
            targets = batch["targets"]  # size = (B, 4)
            loss = soft_cost_loss(scores, targets[:, 1], targets[:, 2:], self.l2_coeff, self.use_pairwise) * share
        else:
            loss = cost_loss(unsafer, safer, unsafer_sign, safer_sign, self.l2_coeff, self.use_pairwise) * share
        signs = torch.stack([unsafer_sign, safer_sign], dim=1)  # size = (B, 2)
        costs = torch.stack([unsafer, safer], dim=1).detach()  # size = (B, 2)
        return loss, {
            "ranking_accuracy": (unsafer > safer).float().sum() / num_items,
            # cost > 0 = unsafe, as everywhere else (a cost of exactly 0 counts as safe, as in `evaluate`)
            "sign_accuracy": (torch.where(costs > 0, 1, -1) == signs).float().sum() / (2 * num_items),
            "unsafer_cost": unsafer.detach().sum() / num_items,
            "safer_cost": safer.detach().sum() / num_items,
        }

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        table = self.score_table(model, loader, accelerator)
        unsafer, safer, unsafer_sign, safer_sign = self._split(table["scores"], table["safer_response_id"], table["is_safe"])
        unsafe_label = ~table["is_safe"]  # size = (N, 2)
        scores = table["scores"]  # size = (N, 2)
        return {
            "loss": cost_loss(unsafer, safer, unsafer_sign, safer_sign, self.l2_coeff, self.use_pairwise).item(),
            "ranking_accuracy": (unsafer > safer).float().mean().item(),
            "sign_accuracy": ((scores > 0) == unsafe_label).float().mean().item(),
            "cost_mean_labelled_safe": scores[~unsafe_label].mean().item() if (~unsafe_label).any() else float("nan"),
            "cost_mean_labelled_unsafe": scores[unsafe_label].mean().item() if unsafe_label.any() else float("nan"),
        }


def run(cfg: CostConfig) -> dict[str, Any]:
    """Train the cost model; returns flat metrics (eval_ranking_accuracy, eval_sign_accuracy, ...)."""
    if not 0.0 <= cfg.splice_fraction <= 1.0:
        raise ConfigError(f"cm: splice_fraction must be in [0, 1], got {cfg.splice_fraction}")
    step = CostStep(cfg.l2_coeff, use_pairwise=cfg.variant == "preference")
    spliced = (lambda records: splice_unsafe_pairs(records, cfg.splice_fraction, cfg.seed)) if cfg.splice_fraction > 0 else None
    metrics = train_preference_model(cfg, "cost", step, extra_train_pairs=spliced)
    if cfg.category_head and PartialState().is_main_process:
        metrics.update(train_category_head(cfg))
        atomic_write_json(Path(cfg.output_dir) / "metrics.json", metrics)
    PartialState().wait_for_everyone()
    return metrics


def train_category_head(cfg: CostConfig) -> dict[str, float]:
    """Fit the category head on the training pairs' prompts with the trained cost model's features, measure it on
    the held-out pairs' prompts, save it beside the model; returns category_head_* metrics."""
    model_dir = Path(cfg.output_dir) / "model"
    model = load_score_model(model_dir).to(resolve_device("auto"))
    tokenizer = load_tokenizer(model_dir)
    _, _, train_records, eval_records = load_pair_splits(cfg)
    prompts, categories, labels = prompt_category_labels(train_records)
    if not categories:
        raise ConfigError(f"{cfg.train_data}: no response carries a harm category (response_*_harm_category): "
                          "nothing to fit the category head on")
    features = prompt_features(model, tokenizer, prompts, cfg.max_length)  # size = (N, H)
    head = fit_category_head(features, labels, categories, cfg.category_head_l2)
    metrics = {f"category_head_train_{k}": v for k, v in head_metrics(head, features, labels).items()}
    eval_prompts, eval_categories, eval_labels = prompt_category_labels(eval_records)
    if eval_prompts:  # the held-out prompts, on the head's categories (one it never saw counts as missed)
        aligned = torch.zeros(len(eval_prompts), len(categories), dtype=torch.float64)
        for k, category in enumerate(eval_categories):
            if category in categories:
                aligned[:, categories.index(category)] = eval_labels[:, k]
        metrics.update({f"category_head_eval_{k}": v for k, v in head_metrics(
            head, prompt_features(model, tokenizer, eval_prompts, cfg.max_length), aligned).items()})
    save_category_head(head, model_dir, metrics)
    return metrics
