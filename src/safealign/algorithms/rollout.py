"""Forward passes on a rollout batch (`training.rl.Experience`): which columns hold what.

A row is a left-padded prompt (P columns) then the response (T columns). The logits at column P + t − 1 predict
response token t; a critic's value of the state before token t is its score at column P + t − 1; a score model's
end score is read at the row's last real token (its EOS when the row ended).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from safealign.algorithms.losses import gather_log_probs, sft_loss
from safealign.data.collate import padding_mask_for_causal
from safealign.training.rl import Experience
from safealign.training.rl_setup import RLModels


def token_log_probs(model: nn.Module, batch: Experience) -> torch.Tensor:
    """log π(response token t | prompt, tokens < t) for every response column: (B, T).

    The logits at column P + t − 1 predict the token at P + t; only the last T + 1 positions go through
    the LM head (`logits_to_keep`).
    """
    num_response = batch["response_mask"].size(1)
    logits = model(input_ids=batch["sequences"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   use_cache=False, logits_to_keep=num_response + 1).logits  # size = (B, T + 1, V)
    return response_log_probs(logits, batch)


def critic_values(critic: nn.Module, batch: Experience) -> torch.Tensor:
    """V_t: the critic's score at the state before each response token (column P + t − 1): (B, T)."""
    scores = critic(batch["sequences"], batch["attention_mask"], batch["position_ids"]).scores  # size = (B, P + T)
    return response_values(scores, batch)


def policy_and_values(models: RLModels, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """log π of the response tokens (B, T) and each stream's values V_t (B, T): in the shared_backbone layout
    from one forward of the actor and its value heads, otherwise from the actor and each critic."""
    if models.critic_layout != "shared_backbone":
        return token_log_probs(models.actor, batch), {s: critic_values(c, batch) for s, c in models.critics.items()}
    num_response = batch["response_mask"].size(1)
    out = models.actor(batch["sequences"], batch["attention_mask"], batch["position_ids"], logits_to_keep=num_response + 1,
                       with_values=True)
    return response_log_probs(out.logits, batch), {s: response_values(v, batch) for s, v in out.values.items()}


def response_log_probs(logits: torch.Tensor, batch: Experience) -> torch.Tensor:
    """From the logits of the last T + 1 positions (B, T + 1, V): log π of each response token, (B, T)."""
    return gather_log_probs(logits[:, :-1], batch["sequences"][:, batch.prompt_length:])  # size = (B, T)


def response_values(scores: torch.Tensor, batch: Experience) -> torch.Tensor:
    """From per-position scores (B, P + T): the ones at the states before each response token, (B, T)."""
    start = batch.prompt_length - 1
    return scores[:, start:start + batch["response_mask"].size(1)]  # size = (B, T)


def end_scores(score_model: Any, batch: Experience) -> torch.Tensor:
    """Score of prompt + response (+ EOS when generated) at its last token: (B,)."""
    return score_model(batch["sequences"], batch["attention_mask"], batch["position_ids"]).end_scores


def ptx_loss(actor: nn.Module, ptx_batch: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_PTX: the actor's language-modelling loss on a micro-batch of SFT data (the InstructGPT-style term that keeps
    the actor a language model of that data), with grad; its value goes into `metrics`."""
    logits = actor(input_ids=ptx_batch["input_ids"], attention_mask=padding_mask_for_causal(ptx_batch["attention_mask"]),
                   use_cache=False).logits  # size = (b, L, V)
    loss = sft_loss(logits, ptx_batch["labels"])
    metrics["ptx_loss"] = loss.detach()
    return loss
