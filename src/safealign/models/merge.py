"""Linear merge of policies' weights (`safealign merge`): P-SACPO's model merging (Wachi et al. 2024, docs/maths.md §6).

    safealign merge --models [runs/dpo-helpful/model, runs/sacpo/model] --weights [0.75, 0.25] --output_dir runs/p-sacpo

θ = Σ_i w_i·θ_i, tensor by tensor, over models of one architecture (SACPO's two steps start from the same SFT model;
mergekit's `linear` method). LoRA-trained policies are merged through their merged weights (`model/` holds the
adapter already folded in), never through the adapter factors: a weighted sum of A·B products is not the product of
weighted sums. Weights that do not sum to 1 rescale the model and are refused unless `normalize` is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from safealign.config import ConfigError, config_field, save_config
from safealign.io import atomic_path, atomic_write_json
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import load_tokenizer


@dataclass
class MergeConfig:
    """A linear merge of policies' weights into a new policy directory."""

    models: list[str] = config_field([], help="Policy directories to merge (one architecture, one tokenizer), e.g. [runs/dpo-helpful/model, runs/sacpo/model].")
    weights: list[float] = config_field([], help="One weight per model; P-SACPO's ratio q is [1 − q, q].")
    output_dir: str = config_field("runs/merge", help="Run directory: config.yaml, metrics.json and model/ (the merged policy).")
    normalize: bool = config_field(True, help="Refuse weights that do not sum to 1 (an affine merge); false allows any linear combination.")
    trust_remote_code: bool = config_field(False, help="Allow model code from the model directories (off: only transformers' own architectures).")

    def __post_init__(self) -> None:
        if len(self.models) < 2 or len(self.weights) != len(self.models):
            raise ConfigError(f"merge: give two or more models and one weight each, got {len(self.models)} models and {len(self.weights)} weights")
        if self.normalize and abs(sum(self.weights) - 1.0) > 1e-6:
            raise ConfigError(f"merge: weights {self.weights} sum to {sum(self.weights):g}, not 1 (set normalize: false to allow it)")


def merge_state_dicts(state_dicts: list[dict[str, torch.Tensor]], weights: list[float], names: list[str]) -> dict[str, torch.Tensor]:
    """Σ_i w_i·θ_i key by key, accumulated in float32 and cast back to the first model's dtypes; a ConfigError naming the
    model and tensor where keys or shapes differ."""
    first = state_dicts[0]
    for name, state in zip(names[1:], state_dicts[1:]):
        if state.keys() != first.keys():
            missing = sorted(set(first) ^ set(state))[:3]
            raise ConfigError(f"merge: {name} does not have {names[0]}'s tensors (differing: {missing}); merge models of one architecture")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise ConfigError(f"merge: {name}'s {key} has shape {tuple(value.shape)}, {names[0]}'s {tuple(first[key].shape)}")
    merged = {}
    for key, value in first.items():
        total = sum(w * state[key].float() for w, state in zip(weights, state_dicts))
        merged[key] = total.to(value.dtype)
    return merged


def run(cfg: MergeConfig) -> dict[str, Any]:
    """Merge `models` with `weights` into output_dir/model; returns {models, weights, num_parameters}."""
    tokenizer = load_tokenizer(cfg.models[0])
    policies = [build_causal_lm(path, trust_remote_code=cfg.trust_remote_code) for path in cfg.models]
    merged = merge_state_dicts([p.state_dict() for p in policies], cfg.weights, cfg.models)
    model = policies[0]
    model.load_state_dict(merged)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise
    try:
        with atomic_path(out / "model") as tmp:
            model.save_pretrained(tmp)  # safetensors
            tokenizer.save_pretrained(tmp)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    metrics = {"models": cfg.models, "weights": cfg.weights, "num_parameters": sum(p.numel() for p in model.parameters())}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
