"""LoRA adapters (peft) on frozen weights: the actor of `actor_layout: lora`, and what the LoRA critics share.

A LoRA actor is the SFT model with a low-rank adapter on its linear layers: W x + (α/r)·B A x, with B = 0 at the
start, so the actor starts as the SFT model, exactly. Only A and B train. The frozen reference of PPO is the
same network with the adapter switched off (`AdapterDisabledPolicy`), so the run holds the SFT weights once
instead of twice, and the AdamW state covers only the adapters. Together with LoRA critics
(`critic_layout: lora`) and frozen models in bf16, this is the layout that lets one GPU hold a 7B PPO-Lag run:
one policy backbone (actor and reference), one reward and one cost backbone (each also its critic's), and the
adapters with their optimizer state.

What the stage saves: `model/` is the SFT model with the adapter merged in (a plain causal LM: `safealign
evaluate`, the next round and any Hugging Face code load it as they load a full fine-tune), and
`adapter/` the adapter alone (peft's `adapter_model.safetensors` + `adapter_config.json`, to load on the SFT
model with `PeftModel.from_pretrained`). Checkpoints hold the adapter weights only.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


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
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))})


def uses_conv1d(model: nn.Module) -> bool:
    """GPT-2 stores its linear weights transposed (Conv1D); peft must be told (`fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

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


class AdapterDisabledPolicy:
    """The frozen reference of a LoRA actor: the actor's forward with its adapter disabled, i.e. the SFT model.
    Called like a causal LM (`reference(input_ids=..., attention_mask=...)`), always without gradients."""

    def __init__(self, actor: nn.Module) -> None:
        self.actor = actor  # the unwrapped peft model (not the DDP wrapper: a no-grad forward needs no gradient sync)

    def __call__(self, **inputs: Any) -> Any:
        with torch.no_grad(), self.actor.disable_adapter():
            return self.actor(**inputs)


def is_lora_policy(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_policy(actor: nn.Module) -> nn.Module:
    """The LoRA actor with its adapter merged into the frozen weights, as a plain causal LM (in place: call it
    once, after training)."""
    return actor.merge_and_unload()
