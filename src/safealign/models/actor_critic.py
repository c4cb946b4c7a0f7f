"""The actor with value heads on its own backbone: the `shared_backbone` critic layout of the RL loop.

One transformer forward gives the policy's logits and, per stream ("reward", "cost"), a scalar value per
token from a linear head on the actor's last hidden state (the one the LM head reads, after the final norm:
`hidden_states[-1]` of transformers' output). The critics then cost two (H + 1)-parameter heads instead of two
full score models and their AdamW state; in exchange the value loss also trains the actor's backbone, which
is why the RL loop weighs it (`value_loss_coeff`) in the one objective L_actor + c·Σ_s L_V^s.

The heads are created at zero and then fitted, before the first update, by least squares on the first rollout
(`ridge_solution`, called by the RL loop): at step 0 the actor is the reference, so KL_t = 0 and every response
token's return is its stream's end score S; the fit gives V(h_t) ≈ E[S | h_t] from the actor's own features.
Why not leave them at zero: V = 0 is no baseline at all. The cost model scores safe answers around −4, so with
V^C = 0 every safe response gets a large positive cost-side advantage, and GAE (λ_GAE < 1) hands the early
tokens of short responses more of it than those of long ones: on SafeWorld the policy collapsed to
2-token answers within 60 rollouts (docs/results.md). The score models' heads are not copied either: they read
another backbone's features (a score model trained from the SFT model has moved away from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass
class ActorCriticOutput:
    logits: torch.Tensor  # size = (B, K, V): the last K positions (`logits_to_keep`), all when K = 0
    values: dict[str, torch.Tensor]  # stream -> size = (B, L), float32: V at every position ({} unless asked)


class ActorCritic(nn.Module):
    """A causal LM (`lm`) and one scalar head per stream (`value_heads`) on its last hidden state; the heads are
    created at zero and fitted by the RL loop on its first rollout (`set_value_heads`).

    The values are computed when asked (`with_values=True`); otherwise the forward is the LM's (a PTX loss on
    SFT data), so DDP (with `find_unused_parameters`) sees that the heads take no part in that loss.
    """

    def __init__(self, lm: PreTrainedModel, streams: tuple[str, ...] | list[str]) -> None:
        super().__init__()
        self.lm = lm
        hidden_size = lm.get_output_embeddings().in_features
        dtype = lm.get_output_embeddings().weight.dtype
        self.value_heads = nn.ModuleDict({s: nn.Linear(hidden_size, 1, dtype=dtype) for s in streams})
        for head in self.value_heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def config(self):
        return self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,  # size = (B, L)
        attention_mask: torch.Tensor | None = None,  # size = (B, L)
        position_ids: torch.Tensor | None = None,  # size = (B, L)
        logits_to_keep: int = 0,
        use_cache: bool = False,
        with_values: bool = False,
    ) -> ActorCriticOutput:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                      logits_to_keep=logits_to_keep, output_hidden_states=with_values)
        if not with_values:
            return ActorCriticOutput(logits=out.logits, values={})
        hidden = out.hidden_states[-1]  # size = (B, L, H): the final-norm output the LM head reads
        values = {s: head(hidden).squeeze(-1).float() for s, head in self.value_heads.items()}  # each (B, L)
        return ActorCriticOutput(logits=out.logits, values=values)

    @torch.no_grad()
    def set_value_heads(self, solution: torch.Tensor, streams: list[str]) -> None:
        """Load head weights and biases from `ridge_solution`'s θ (H + 1, S), column k = streams[k]."""
        for k, stream in enumerate(streams):
            head = self.value_heads[stream]
            head.weight.copy_(solution[:-1, k].to(head.weight.dtype).unsqueeze(0))
            head.bias.copy_(solution[-1:, k].to(head.bias.dtype))

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.lm.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        """Save the policy alone (a plain causal LM directory, what `safealign evaluate` reads); the heads live in
        the RL checkpoints. `state_dict` (gathered by Accelerate) has this module's key prefixes."""
        if state_dict is not None:
            state_dict = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
        self.lm.save_pretrained(path, state_dict=state_dict, **kwargs)


def ridge_solution(gram: torch.Tensor, moments: torch.Tensor, count: float, ridge: float = 1e-3) -> torch.Tensor:
    """Least squares with an L2 penalty on the weights, not the bias, from sufficient statistics.

    X = [h, 1] (N, H + 1) are the features with a constant column last, Y (N, S) one target per stream:
        gram = XᵀX (H + 1, H + 1),  moments = XᵀY (H + 1, S),  count = N
        θ = argmin ‖Xθ − Y‖² + ridge·N·‖θ[:H]‖²  = (XᵀX + ridge·N·D)⁻¹ XᵀY,  D = diag(1, …, 1, 0)
    Returns θ (H + 1, S): column s holds head s's weight (first H rows) and bias (last row). Float64 inside.
    Sums over processes of gram and moments give the fit on all of their rows.
    """
    size = gram.size(0)
    penalty = torch.eye(size, dtype=torch.float64, device=gram.device) * (ridge * count)
    penalty[-1, -1] = 0.0  # the bias is free
    return torch.linalg.solve(gram.double() + penalty, moments.double())  # size = (H + 1, S)


def causal_lm(model: nn.Module) -> nn.Module:
    """The policy LM inside an (unwrapped) actor: `model.lm` for an ActorCritic, else the model itself."""
    return model.lm if isinstance(model, ActorCritic) else model
