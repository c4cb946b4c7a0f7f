"""LoRA adapters (peft) on frozen weights: what `adapter: lora` trains in SFT and the reward and cost models, the
actor of `actor_layout: lora`, and the LoRA critics' base.

An adapter adds (α/r)·B A x to each adapted linear layer W x, with B = 0 at the start, so the adapted model starts
equal to the model, exactly; only A and B train (and, for a score model, a float32 copy of its head: peft's
`modules_to_save`). Whatever trained an adapter saves it twice (`training.common.save_final_model`): merged into
`model/` (a plain model that every stage and any Hugging Face code load as they load a full fine-tune) and alone
into `adapter/` (peft's `adapter_model.safetensors` + `adapter_config.json`, for `PeftModel.from_pretrained` on
the base model). Checkpoints hold the trained parameters only.

A LoRA actor (`actor_layout: lora`) is the SFT model with an adapter. The frozen reference of PPO is the
same network with the adapter switched off (`AdapterDisabledPolicy`), so the run holds the SFT weights once
instead of twice, and the AdamW state covers only the adapters. Together with LoRA critics
(`critic_layout: lora`) and frozen models in bf16, this is the layout that lets one GPU hold a 7B PPO-Lag run:
one policy backbone (actor and reference), one reward and one cost backbone (each also its critic's), and the
adapters with their optimizer state.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from safealign.config import ConfigError
from safealign.models.presets import PRESETS
from safealign.models.score_model import ScoreModel, ScoreOutput, ScoreType, score_output


def require_peft() -> Any:
    """The peft module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA layouts need peft: pip install 'safealign[peft]' (or pip install peft)") from None
    return peft


def linear_layer_names(model: nn.Module) -> list[str]:
    """The last name part of every linear layer of a transformer (q_proj, v_proj, ..., c_attn for GPT-2): what
    an adapter attaches to when the user names no target modules. Heads are left out by the callers."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))})


def uses_conv1d(model: nn.Module) -> bool:
    """GPT-2 stores its linear weights transposed (Conv1D); peft must be told (`fan_in_fan_out`)."""
    return any(isinstance(m, Conv1D) for m in model.modules())


def add_adapter(model: nn.Module, config: Any) -> nn.Module:
    """`peft.get_peft_model`, with the FutureWarning peft 0.21 triggers in transformers 5 silenced, and every trained
    parameter in float32 (AdamW state in float32 even when the frozen weights are bf16)."""
    peft = require_peft()
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = peft.get_peft_model(model, config)
    for parameter in adapted.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return adapted


def require_pretrained_base(model: str, stage: str) -> None:
    """`adapter: lora` freezes the base weights, so the base must be a trained model, not a preset built from scratch."""
    if model in PRESETS:
        raise ConfigError(f"{stage}: adapter: lora trains an adapter on frozen weights, but model '{model}' is a preset built "
                          "from scratch (random weights); give a trained model directory, or adapter: none")


def lora_policy(model: nn.Module, rank: int, alpha: float, target_modules: list[str] | None = None,
                frozen_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM `model` (the SFT policy) as a LoRA actor: a peft model whose frozen weights are cast to
    `frozen_dtype` and whose adapters (rank `rank`, scale α/r, no dropout, on `target_modules`: default every
    linear layer of the transformer, not the LM head) train in float32."""
    peft = require_peft()
    lm_head = model.get_output_embeddings()
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is lm_head}
    if not target_modules:
        target_modules = [name for name in linear_layer_names(model) if name not in head_names]
    model = model.to(frozen_dtype)
    return add_adapter(model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                                              task_type="CAUSAL_LM", fan_in_fan_out=uses_conv1d(model)))


def lora_score_model(score_model: nn.Module, rank: int, alpha: float, target_modules: list[str] | None = None) -> nn.Module:
    """A `ScoreModel` as a LoRA adapter (`rank`, `alpha`, no dropout, on `target_modules`: default every linear layer
    of the transformer, not the head) on its frozen backbone, plus a trainable float32 copy of its head (peft's
    `modules_to_save`). It starts equal to `score_model`; the head copy is what a merged model keeps."""
    peft = require_peft()
    backbone = score_model.backbone
    head_name = next((n for n in ("score", "classifier") if isinstance(getattr(backbone, n, None), nn.Module)), None)
    if head_name is None:
        raise ValueError(f"{type(backbone).__name__}: no head named 'score' or 'classifier' to train beside the adapter")
    adapted = add_adapter(backbone, peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules or linear_layer_names(backbone.base_model),
        modules_to_save=[head_name], fan_in_fan_out=uses_conv1d(backbone.base_model)))
    head = getattr(backbone, head_name).modules_to_save["default"]
    head.register_forward_pre_hook(lambda module, args: tuple(a.to(module.weight.dtype) for a in args))
    return ScoreModel(adapted)


def add_lora(model: nn.Module, rank: int, alpha: float, target_modules: list[str] | None = None) -> nn.Module:
    """`adapter: lora`: a LoRA adapter on a score model (`lora_score_model`) or on a causal LM (`lora_policy`)."""
    if isinstance(model, ScoreModel):
        return lora_score_model(model, rank, alpha, target_modules)
    return lora_policy(model, rank, alpha, target_modules, next(model.parameters()).dtype)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def adapter_of(model: nn.Module) -> nn.Module | None:
    """The peft model inside `model` (the model itself, or a score model's backbone); None when it has no adapter."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and _is_peft(candidate):
            return candidate
    return None


def merge_adapter(model: nn.Module) -> nn.Module:
    """`model` with its adapter merged into the frozen weights: a plain causal LM or score model (in place: call it once,
    after training). A model without an adapter is returned as it is."""
    adapted = adapter_of(model)
    if adapted is None:
        return model
    merged = adapted.merge_and_unload()
    return ScoreModel(merged) if isinstance(model, ScoreModel) else merged


class AdapterDisabledPolicy:
    """The frozen reference of a LoRA actor: the actor's forward with its adapter disabled, i.e. the SFT model.
    Called like a causal LM (`reference(input_ids=..., attention_mask=...)`), always without gradients."""

    def __init__(self, actor: nn.Module) -> None:
        self.actor = actor  # the unwrapped peft model (not the DDP wrapper: a no-grad forward needs no gradient sync)

    def __call__(self, **inputs: Any) -> Any:
        with torch.no_grad(), self.actor.disable_adapter():
            return self.actor(**inputs)


# --------------------------------------------------------------------------------------------------
# A critic as a LoRA adapter on a frozen score model (the RL loop's `lora` critic layout)
# --------------------------------------------------------------------------------------------------
class AdapterDisabledScores:
    """The frozen score model inside a LoRA critic: the critic's forward with its adapter disabled (the
    original weights and head), normalised as the score model was. It owns no weights: the critic does."""

    def __init__(self, critic: ScoreModel, score_type: ScoreType, normalizer: dict[str, float] | None) -> None:
        self.critic, self.score_type, self.normalizer = critic, score_type, normalizer

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> ScoreOutput:
        with self.critic.backbone.disable_adapter():
            raw = self.critic(input_ids, attention_mask, position_ids).scores  # size = (B, L), unnormalised
        return score_output(raw, attention_mask.bool(), self.score_type, self.normalizer)


def lora_critic(score_model: ScoreModel, rank: int, alpha: float,
                target_modules: list[str] | None = None) -> tuple[ScoreModel, AdapterDisabledScores]:
    """Make a loaded, frozen score model into a critic that shares its weights; returns (critic, frozen scores).

    The critic is the score model plus a peft LoRA adapter (`rank`, `alpha`, lora_dropout 0, on
    `target_modules`: default every linear layer of the transformer, not the head) and a trainable float32
    copy of the head (peft's `modules_to_save`); its scores are never normalised. LoRA's B starts at zero, so
    the critic starts equal to the score model, as a full-copy critic does. The frozen scores are the same
    forward with the adapter disabled: peft then runs the original layers and the original head.
    """
    score_type, normalizer = score_model.score_type, score_model.normalizer
    score_model.config.score_type, score_model.config.score_normalizer = "critic", None  # the critic's view of the config
    critic = lora_score_model(score_model, rank, alpha, target_modules)
    return critic, AdapterDisabledScores(critic, score_type, normalizer)
