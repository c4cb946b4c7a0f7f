"""Batching: token-id lists into padded tensors, the one place that pads.

Right padding for training and scoring (`collate_sft`, `collate_pairs`, `pad_batch`), left padding for generation
(`pad_batch(side="left")`: every prompt ends at the same column, where the response starts). Position ids always
count real tokens only (`position_ids_from_mask`), so that left padding shifts nothing.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from safealign.data.formatting import IGNORE_INDEX, TokenizedExample, TokenizedPair


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length id lists into (ids, attention_mask), both (B, L_max), mask 1 on real tokens."""
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    max_len = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), max_len), pad_value, dtype=torch.long)  # size = (B, L)
    mask = torch.zeros((len(sequences), max_len), dtype=torch.long)  # size = (B, L)
    for row, seq in enumerate(sequences):
        span = slice(max_len - len(seq), max_len) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them.

    attention_mask: (B, L) -> (B, L); padding positions get 0 (they are masked anyway).
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0) * attention_mask.long()


def padding_mask_for_causal(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a causal model needs for this batch: None when every row starts at column 0 (right-padded or
    unpadded), since a real token never attends to the padding after it; the mask itself for left padding. Without a
    mask the attention takes its causal fast path (12% off a score model's forward on a CPU, the same scores)."""
    return None if bool(attention_mask[:, 0].all()) else attention_mask


def collate_sft(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    input_ids, attention_mask = pad_batch([e.input_ids for e in examples], pad_token_id)  # size = (B, L)
    labels, _ = pad_batch([e.labels for e in examples], IGNORE_INDEX)  # size = (B, L)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded rows (response_0 of every pair, then response_1) and the B pairs' labels."""
    input_ids, attention_mask = pad_batch([p.input_ids[0] for p in pairs] + [p.input_ids[1] for p in pairs],
                                          pad_token_id)  # size = (2B, L)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "better_response_id": torch.tensor([p.better_response_id for p in pairs], dtype=torch.long),  # size = (B,)
        "safer_response_id": torch.tensor([p.safer_response_id for p in pairs], dtype=torch.long),  # size = (B,)
        "is_safe": torch.tensor([p.is_safe for p in pairs], dtype=torch.bool),  # size = (B, 2)
        # soft labels when the pairs carry them (TokenizedPair.targets): (B, 4) columns P(r0 more helpful),
        # P(r0 more harmless), P(r0 unsafe), P(r1 unsafe)
        **({"targets": torch.tensor([p.targets for p in pairs], dtype=torch.float32)}
           if pairs and all(p.targets is not None for p in pairs) else {}),
    }
