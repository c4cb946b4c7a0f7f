"""The logits a supervised loss needs from a causal LM: those of the positions that predict a label.

SFT and DPO read log p of the response tokens only, yet a plain forward projects every position of every row onto
the vocabulary: on a small model the LM head is about half of a step, and on a large vocabulary its (B, L, V) output
is the largest activation. `label_positions_only` feeds the head only the hidden states that predict a label (a
forward pre-hook on `get_output_embeddings()`, so the forward still goes through a DDP/FSDP-wrapped model and keeps
whatever the architecture does after its head: soft-capping, scaling). `LabelLogits` checks once, on the first batch,
that this gives the full forward's logits, and otherwise (a head the forward never calls through
`get_output_embeddings()`) slices the full logits instead, with a warning: the same values, slower.
`shared_prompt_logits` goes further for DPO's pairs: one row per pair, the prompt computed once (prefix sharing).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from safealign.data.collate import padding_mask_for_causal
from safealign.data.formatting import IGNORE_INDEX


def causal_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a right-padded batch (B, L, V), or what the LM head's pre-hook keeps of them."""
    return model(input_ids=batch["input_ids"], attention_mask=padding_mask_for_causal(batch["attention_mask"]),
                 use_cache=False).logits


@contextmanager
def head_on_positions(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """While active, the model's LM head sees only the hidden states at `positions` (N,), flat indices into the
    batch's (B·L) positions: (1, N, d) instead of (B, L, d); the logits are then (1, N, V), in that order."""

    def select(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # size = (B, L, d)
        return (hidden.flatten(0, 1)[positions].unsqueeze(0), *args[1:])  # size = (1, N, d)

    handle = getattr(model, "module", model).get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions that predict a label (position t predicts labels[t + 1]), as flat indices into (B·L), row-major:
    (N,), aligned with `labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]`."""
    rows, columns = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # each (N,)
    return rows * labels.size(1) + columns


@contextmanager
def label_positions_only(model: torch.nn.Module, labels: torch.Tensor) -> Iterator[None]:
    """While active, the model's LM head sees only the hidden states that predict a label: (1, N, d) instead of
    (B, L, d), N = label tokens; the logits are then (1, N, V), aligned with `labels[:, 1:][labels[:, 1:] !=
    IGNORE_INDEX]` (row-major: row 0's label tokens first)."""
    with head_on_positions(model, label_positions(labels)):
        yield


def shared_prompt_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of `batch["predictors"]` (N, V) for rows that hold one prompt and two answers to it (DPO's pairs:
    prompt + chosen + rejected, `segments` 1 / 2 / 3, padding 0).

    Prefix sharing: the prompt goes through the model once instead of once per answer. A 4D mask lets each position
    see the earlier ones except that the second answer does not see the first; its position ids restart where the
    prompt ends (`position_ids`), so every answer token sees exactly what it would see in a row of its own (the
    values equal those up to float rounding). Padding positions see themselves only (no empty softmax row)."""
    segments = batch["segments"]  # size = (B, L)
    length = segments.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()  # size = (L, L)
    second_sees_first = (segments == 3).unsqueeze(2) & (segments == 2).unsqueeze(1)  # size = (B, L, L)
    allowed = causal & (segments != 0).unsqueeze(1) & ~second_sees_first  # size = (B, L, L)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    with head_on_positions(model, batch["predictors"]):
        return model(input_ids=batch["input_ids"], attention_mask=allowed.unsqueeze(1), position_ids=batch["position_ids"],
                     use_cache=False).logits[0]  # size = (N, V)


class LabelLogits:
    """`label_logits(model, batch)`: the logits of the label positions, (N, V), aligned with the label tokens in
    row-major order; from the head on those positions only once the first batch has shown that it gives the full
    forward's logits (`fast`: None until then)."""

    def __init__(self, who: str) -> None:
        self.who = who  # named in the warning
        self.fast: bool | None = None

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fast is None:
            self.fast = self._check(model, batch)
        labels = batch["labels"]  # size = (B, L)
        if self.fast:
            with label_positions_only(model, labels):
                return causal_forward(model, batch)[0]  # size = (N, V)
        return causal_forward(model, batch)[:, :-1][labels[:, 1:] != IGNORE_INDEX]  # size = (N, V)

    def _check(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
        labels = batch["labels"]
        was_training = model.training
        model.eval()  # dropout off: the two forwards must see the same network
        with torch.no_grad():
            expected = causal_forward(model, batch)[:, :-1][labels[:, 1:] != IGNORE_INDEX].float()  # size = (N, V)
            try:
                with label_positions_only(model, labels):
                    selected = causal_forward(model, batch)[0].float()  # size = (N, V)
            except Exception:  # noqa: BLE001 - any failure of the fast path means: use the full logits
                selected = None
        model.train(was_training)
        ok = selected is not None and selected.shape == expected.shape and torch.allclose(selected, expected, rtol=1e-2, atol=1e-2)
        if not ok:
            warnings.warn(f"{self.who}: this model's LM head cannot be restricted to the label positions; computing full "
                          "logits (slower).")
        return ok
