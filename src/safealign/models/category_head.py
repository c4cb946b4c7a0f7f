"""The cost model's category head: which harm categories a prompt asks about, a multi-label linear probe on the cost
model's last hidden state at the prompt's last token (docs/maths.md §10).

The cost model has one output, the cost. The per-category constraints need each prompt's category; a prompt file
may not carry one (a user's prompts, red-team prompts). `safealign cm --category_head true` then fits, after the cost
model, a logistic regression per category on the frozen cost model's features of the training prompts, labelled with
the union of the harm categories (`response_*_harm_category`) of the responses to that prompt:

    p_k(x) = σ(w_k · h(x) + b_k)          L = mean_{x,k} BCE(p_k(x), y_k(x)) + l2 · ||W||²

(fitted with L-BFGS: a convex problem, the same optimum on every run). The last token's state was a better feature
than the mean over the prompt's tokens on a small world's held-out prompts (F1 0.39 against 0.21); l2 = 1e-5 was set
on SafeWorld's dev pairs (world 0: F1 0.37; 0.17 at 1e-4, 0.38 at 1e-6, 0.33 at 1e-7; docs/results.md). A prompt's
category is the most probable one
when its probability is at least 0.5, else none. A prompt whose responses were all safe has no category label, so
the head learns the categories of prompts that drew at least one harmful answer.

Written beside the cost model as category_head.safetensors (W (K, H), b (K,), the feature mean and scale) and
category_head.json (the categories, in W's row order, and the fit's metrics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from safealign.data.collate import pad_batch, padding_mask_for_causal
from safealign.data.formatting import tokenize_prompts
from safealign.data.schema import PreferenceRecord
from safealign.io import atomic_write_json
from safealign.models.score_model import ScoreModel

HEAD_WEIGHTS, HEAD_CONFIG = "category_head.safetensors", "category_head.json"


@dataclass
class CategoryHead:
    categories: list[str]
    weight: torch.Tensor  # size = (K, H)
    bias: torch.Tensor  # size = (K,)
    mean: torch.Tensor  # size = (H,): the features are standardised before the probe
    scale: torch.Tensor  # size = (H,)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, K)."""
        return torch.sigmoid(((features - self.mean) / self.scale) @ self.weight.T + self.bias)

    def predict(self, features: torch.Tensor) -> list[str | None]:
        """Each prompt's most probable category, or None when no category reaches 0.5. (N, H) -> N names."""
        probabilities = self.probabilities(features)  # size = (N, K)
        best, index = probabilities.max(dim=1)
        return [self.categories[k] if p >= 0.5 else None for p, k in zip(best.tolist(), index.tolist())]


@torch.no_grad()
def prompt_features(model: ScoreModel, tokenizer, prompts: Sequence[str], max_length: int = 256,
                    batch_size: int = 64) -> torch.Tensor:
    """The score model's last hidden state at each formatted prompt's last token (what the policy reads before it
    answers), float64. N prompts -> (N, H)."""
    model.eval()
    device = next(model.parameters()).device
    ids = [i[-max_length:] for i in tokenize_prompts(tokenizer, list(prompts))]
    features: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, attention_mask = pad_batch([ids[k] for k in chunk], tokenizer.pad_token_id)  # size = (b, L)
        attention_mask = attention_mask.to(device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = model.backbone(input_ids=input_ids.to(device), attention_mask=padding_mask_for_causal(attention_mask),
                                position_ids=positions, use_cache=False, output_hidden_states=True).hidden_states[-1]
        last = attention_mask.sum(-1) - 1  # right padding: the last real token
        for row, k in enumerate(chunk):
            features[k] = hidden[row, last[row]].double().cpu()
    return torch.stack(features)


def prompt_category_labels(records: Sequence[PreferenceRecord]) -> tuple[list[str], list[str], torch.Tensor]:
    """The distinct prompts, the categories that occur, and each prompt's multi-hot label (the union over every
    response to it of the categories marked true): (prompts, categories, (N, K) float64)."""
    by_prompt: dict[str, set[str]] = {}
    for record in records:
        marked = by_prompt.setdefault(record.prompt, set())
        for categories in (record.response_0_harm_category, record.response_1_harm_category):
            marked.update(c for c, hit in categories.items() if hit)
    categories = sorted(set().union(*by_prompt.values())) if by_prompt else []
    prompts = list(by_prompt)
    labels = torch.zeros(len(prompts), len(categories), dtype=torch.float64)
    for n, prompt in enumerate(prompts):
        for category in by_prompt[prompt]:
            labels[n, categories.index(category)] = 1.0
    return prompts, categories, labels


def fit_category_head(features: torch.Tensor, labels: torch.Tensor, categories: list[str], l2: float = 1e-5,
                      max_iter: int = 500) -> CategoryHead:
    """Logistic regression per category on standardised features (L-BFGS, float64). (N, H), (N, K) -> the head."""
    mean, scale = features.mean(0), features.std(0).clamp(min=1e-6)  # each (H,)
    x = (features - mean) / scale  # size = (N, H)
    weight = torch.zeros(labels.size(1), x.size(1), dtype=torch.float64, requires_grad=True)  # size = (K, H)
    bias = torch.zeros(labels.size(1), dtype=torch.float64, requires_grad=True)  # size = (K,)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return CategoryHead(categories, weight.detach(), bias.detach(), mean, scale)


def head_metrics(head: CategoryHead, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 of the 0.5-thresholded probabilities, and the share of prompts whose
    predicted category (or none) is one of its labels (or it has none)."""
    predicted = head.probabilities(features) >= 0.5  # size = (N, K)
    truth = labels.bool()
    hits = (predicted & truth).sum().item()
    precision = hits / max(predicted.sum().item(), 1)
    recall = hits / max(truth.sum().item(), 1)
    names = head.predict(features)
    agree = [(name is None and not row.any()) or (name is not None and bool(row[head.categories.index(name)]))
             for name, row in zip(names, truth)]
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "prompt_category_accuracy": sum(agree) / max(len(agree), 1), "prompts": float(len(agree))}


def save_category_head(head: CategoryHead, model_dir: str | Path, metrics: dict[str, float]) -> None:
    """Beside the cost model's weights: the tensors (safetensors, written then renamed) and the categories."""
    model_dir = Path(model_dir)
    tmp = model_dir / f".{HEAD_WEIGHTS}.tmp"
    save_file({"weight": head.weight.contiguous(), "bias": head.bias, "mean": head.mean, "scale": head.scale}, str(tmp))
    os.replace(tmp, model_dir / HEAD_WEIGHTS)
    atomic_write_json(model_dir / HEAD_CONFIG, {"categories": head.categories, "threshold": 0.5, "metrics": metrics})


def load_category_head(model_dir: str | Path) -> CategoryHead | None:
    """The head saved beside a cost model, or None when it has none."""
    model_dir = Path(model_dir)
    if not (model_dir / HEAD_WEIGHTS).is_file():
        return None
    tensors = load_file(str(model_dir / HEAD_WEIGHTS))
    categories = json.loads((model_dir / HEAD_CONFIG).read_text(encoding="utf-8"))["categories"]
    return CategoryHead(categories, tensors["weight"], tensors["bias"], tensors["mean"], tensors["scale"])
