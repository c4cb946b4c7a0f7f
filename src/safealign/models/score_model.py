"""Score models: the one architecture of reward models, cost models and PPO critics.

A transformer backbone with a linear head to one scalar per token: transformers'
`AutoModelForTokenClassification` with `num_labels=1` (Llama, Qwen2, Mistral, GPT-2, ... all have it).
The sequence ("end") score is the head's output at the last non-padding token of each row, found from the
attention mask, so right- and left-padded batches both work. Position ids default to the ones the mask
implies (`cumsum(mask) - 1`), so a left-padded row scores exactly like the same row unpadded.

Score models run without dropout (head and backbone): a score must be a function of the text, since PPO
compares values and rewards across forward passes.

The config carries `score_type` ("reward", "cost" or "critic") and an optional normaliser
`score_normalizer = {"mean": μ, "std": σ}` (off by default). When set, scores are returned normalised:
reward → (x − μ)/σ, cost → x/σ (never shifted: 0 is the safe/unsafe boundary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from safealign.config import ConfigError
from safealign.data.collate import pad_batch, padding_mask_for_causal
from safealign.data.formatting import tokenize_for_scoring
from safealign.io import atomic_path
from safealign.models.presets import PRESETS, from_pretrained, preset_config, require_model_dir, resolve_pretrained

ScoreType = Literal["reward", "cost", "critic"]
SCORE_TYPES = ("reward", "cost", "critic")


@dataclass
class ScoreOutput:
    scores: torch.Tensor  # size = (B, L), float32, 0 at padding positions
    end_scores: torch.Tensor  # size = (B,), score at the last non-padding token
    end_index: torch.Tensor  # size = (B,), position of that token
    end_stds: torch.Tensor | None = None  # size = (B,), a mean-variance reward model's σ at the end token (else None)


# FSDP2 hooks its gradient reduction on the tensors it finds in a wrapped module's output. torch 2.13 looks inside
# dataclasses; earlier versions flatten registered pytree nodes only, and there a sharded score model trained with
# no gradients at all (torch 2.11 on an H100: every .grad None, weights unchanged). Registered, it works on both.
_pytree.register_pytree_node(
    ScoreOutput,
    # end_stds only when there is one (a None leaf would reach the functions FSDP2 maps over the tensors)
    lambda output: ([output.scores, output.end_scores, output.end_index]
                    + ([] if output.end_stds is None else [output.end_stds]), None),
    lambda children, _context: ScoreOutput(*children),
)


class ScoreModel(nn.Module):
    """Wraps a `*ForTokenClassification` model with one label; `backbone` is the HF model. A mean-variance reward model
    (`safealign rm --head mean_variance`) has two: the mean, which is the score everything downstream reads, and the
    raw σ (σ = softplus(raw) + MIN_STD, in `end_stds`)."""

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__()
        outputs = backbone.config.num_labels
        if outputs != 1 and not (outputs == 2 and getattr(backbone.config, "score_type", None) == "reward"):
            raise ValueError(f"a score model has one output per token (two for a mean-variance reward model), got "
                             f"num_labels={outputs}")
        if getattr(backbone.config, "score_type", None) not in SCORE_TYPES:
            raise ValueError(f"config.score_type must be one of {SCORE_TYPES}")
        self.backbone = backbone

    @property
    def config(self) -> PreTrainedConfig:
        return self.backbone.config

    @property
    def score_type(self) -> ScoreType:
        return self.config.score_type

    @property
    def normalizer(self) -> dict[str, float] | None:
        return getattr(self.config, "score_normalizer", None)

    @normalizer.setter
    def normalizer(self, stats: dict[str, float] | None) -> None:
        """Set `{"mean": μ, "std": σ}` (e.g. of the end scores on the training set), or None for raw scores."""
        if stats is not None:
            if self.score_type == "critic":
                raise ValueError("critics predict returns: they are never normalised")
            mean, std = float(stats["mean"]), float(stats["std"])
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"normaliser needs a finite mean and a positive std, got {stats}")
            stats = {"mean": mean, "std": std}
        self.config.score_normalizer = stats

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        """What the training loop's `save_final_model` calls: the backbone's config (score_type included)
        and safetensors weights, a directory `load_score_model` reads. `state_dict` (gathered by
        Accelerate) has this module's `backbone.` key prefix, which is removed."""
        if state_dict is not None:
            state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
        self.backbone.save_pretrained(path, state_dict=state_dict, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,  # size = (B, L)
        attention_mask: torch.Tensor,  # size = (B, L), 1 on real tokens
        position_ids: torch.Tensor | None = None,  # size = (B, L); default from the mask
    ) -> ScoreOutput:
        mask = attention_mask.bool()  # size = (B, L)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # size = (B, L)
        logits = self.backbone(
            input_ids=input_ids, attention_mask=padding_mask_for_causal(attention_mask), position_ids=position_ids,
            use_cache=False).logits  # size = (B, L, K), K = 1 (or 2: mean and raw σ)
        output = score_output(logits[..., 0].float(), mask, self.score_type, self.normalizer)
        if logits.size(-1) == 2:
            raw = logits[..., 1].float()[torch.arange(logits.size(0), device=logits.device), output.end_index]  # (B,)
            # σ is in the mean's units: the normaliser divides both by its std
            scale = self.normalizer["std"] if self.normalizer else 1.0
            output.end_stds = (F.softplus(raw) + MIN_STD) / scale  # size = (B,)
        return output


MIN_STD = 1e-3  # a mean-variance reward model's smallest σ: z stays finite


def score_output(scores: torch.Tensor, mask: torch.Tensor, score_type: ScoreType,
                  stats: dict[str, float] | None) -> ScoreOutput:
    """Normalise the raw per-token scores (B, L), zero them at padding and read each row's end score."""
    if stats is not None:
        shift = stats["mean"] if score_type == "reward" else 0.0  # cost: x/σ only
        scores = (scores - shift) / stats["std"]  # size = (B, L)
    scores = torch.where(mask, scores, torch.zeros_like(scores))  # size = (B, L)
    positions = torch.arange(mask.size(1), device=mask.device)  # size = (L,)
    end_index = (positions * mask).amax(dim=-1)  # size = (B,)
    # Indexed, not gathered then squeezed: a new tensor, not a view (FSDP2 warns on every view a module returns).
    end_scores = scores[torch.arange(scores.size(0), device=scores.device), end_index]  # size = (B,)
    return ScoreOutput(scores=scores, end_scores=end_scores, end_index=end_index)


def build_score_model(
    backbone: str | Path,
    *,
    score_type: ScoreType,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    outputs: int = 1,
) -> ScoreModel:
    """A new score model: a preset (`tiny`, `small`: needs `tokenizer`) built from scratch, or a pretrained
    backbone (`smollm2`, a local directory such as the SFT model, a hub name) with its weights loaded.

    A causal LM's LM head is dropped and a new scalar head initialised (seeded by `seed`); a score model's
    directory keeps its head (a critic initialised from the reward model). The normaliser is reset. `outputs` 2: a
    mean-variance reward model's head (mean, raw σ).
    """
    if score_type not in SCORE_TYPES:
        raise ValueError(f"score_type must be one of {SCORE_TYPES}, got {score_type!r}")
    name = str(backbone)
    if name in PRESETS:
        if tokenizer is None:
            raise ValueError(f"preset '{name}' needs a tokenizer to size its vocabulary")
        config = preset_config(name, tokenizer)
    else:
        config = AutoConfig.from_pretrained(resolve_pretrained(name), trust_remote_code=trust_remote_code)
    # a critic (or any one-output model) from a mean-variance reward model keeps the head's mean row: loaded with both
    # rows, then cut to the first
    source_outputs = getattr(config, "num_labels", 1) if getattr(config, "score_type", None) == "reward" else outputs
    keep_mean_row = source_outputs == 2 and outputs == 1
    config.num_labels = 2 if keep_mean_row else outputs
    config.score_type = score_type
    config.score_normalizer = None
    _disable_dropout(config)
    _set_pad_token_id(config, tokenizer)
    torch.manual_seed(seed)  # the new head's initial weights are part of the run's reproducibility
    if name in PRESETS:
        model = AutoModelForTokenClassification.from_config(config)
        model = model.to(dtype) if dtype is not None else model
    else:
        # From a causal LM (the SFT model) the LM head is dropped and the scalar head is new: both expected.
        model = from_pretrained(
            AutoModelForTokenClassification, name, new_heads=("score", "classifier"), dropped_heads=("lm_head",),
            config=config, dtype=dtype, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True,
        )
    if keep_mean_row:
        _keep_mean_output(model)
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return ScoreModel(model)


def save_score_model(
    model: ScoreModel, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> None:
    """Write config (with score_type and normaliser) and safetensors weights, atomically."""
    with atomic_path(out_dir) as tmp:
        model.backbone.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def load_score_model(
    path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> ScoreModel:
    """Load a directory written by `save_score_model` (head, score_type and normaliser included)."""
    require_model_dir(path, "score model")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if getattr(config, "score_type", None) not in SCORE_TYPES:
        raise ConfigError(
            f"{path} is not a safealign score model (its config has no score_type): give a directory written by "
            "`safealign rm` or `safealign cm` (e.g. runs/rm/model); in Python, build_score_model starts one from a backbone"
        )
    model = from_pretrained(AutoModelForTokenClassification, str(path), config=config, dtype=dtype,
                            trust_remote_code=trust_remote_code)
    return ScoreModel(model)


@torch.no_grad()
def score_texts(model: ScoreModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
                max_length: int, batch_size: int = 64) -> list[float]:
    """End score of each prompt + response + EOS (the input a score model is trained on), in order."""
    model.eval()
    device = next(model.parameters()).device
    ids = tokenize_for_scoring(tokenizer, prompts, responses, max_length)
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))  # similar lengths together: little padding
    scores = [math.nan] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, attention_mask = pad_batch([ids[k] for k in chunk], tokenizer.pad_token_id)  # size = (b, L)
        for k, score in zip(chunk, model(input_ids.to(device), attention_mask.to(device)).end_scores.tolist()):
            scores[k] = score
    return scores


def _keep_mean_output(model: PreTrainedModel) -> None:
    """Cut a two-output head (mean, raw σ) to its first output, in place."""
    head_name = next(n for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Linear))
    head: nn.Linear = getattr(model, head_name)
    mean = nn.Linear(head.in_features, 1, bias=head.bias is not None, dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        mean.weight.copy_(head.weight[:1])
        if head.bias is not None:
            mean.bias.copy_(head.bias[:1])
    setattr(model, head_name, mean)
    model.config.num_labels = 1


def _disable_dropout(config: PreTrainedConfig) -> None:
    """Zero every dropout probability in the config (head: `classifier_dropout`; GPT-2: `*_pdrop`, ...)."""
    config.classifier_dropout = 0.0
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)


def _set_pad_token_id(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Take the pad id from the tokenizer when the backbone has none, unless pad is EOS.

    The pad id becomes the embedding's `padding_idx`, whose row never gets a gradient; the end score is
    read at EOS, so when pad == EOS (SmolLM2 and most chat models) the score model keeps no pad id. It needs
    none: padding is found from the attention mask.
    """
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if config.pad_token_id is None and tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.pad_token_id in eos_ids:
        config.pad_token_id = None
