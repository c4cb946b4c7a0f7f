"""A lean KV-cache decoder for Llama-architecture causal LMs (the tiny and small presets, SmolLM2): the sampling
loop's forward passes without transformers' per-call machinery.

It computes what `LlamaForCausalLM.forward` computes (RMSNorm in float32, rotary embeddings from the model's own
`inv_freq` and scaling, grouped-query attention with a padding mask, SiLU MLP, the LM head on the last position
only), reading the model's own weights, but:
- the key/value cache is allocated once for the whole rollout (prompt + max_new_tokens) and written in place, where
  transformers' dynamic cache concatenates a new tensor per token and layer;
- q, k and v come from one matrix product (their weights stacked), as do the MLP's gate and up projections;
- a decode step is a plain sequence of tensor operations (no mask construction, output dataclasses or hooks);
- rows that have ended can be dropped from the cache (`keep`), so that later steps compute on the others alone.
On the tiny preset a decode step costs a fraction of transformers' (bench/bench_sampling.py). The results are those
of the transformers forward up to float rounding: the stacked products sum in another order
(tests/models/test_generation.py compares the two).

`LlamaDecoder.supports(model)` says whether a model can take this path: a plain `LlamaForCausalLM` (no adapter, not
sharded, no attention or MLP bias, the SiLU activation); anything else decodes through transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM


class LlamaDecoder:
    """Prefill then one-token decode steps of a batch of rows, with a static KV cache of `capacity` positions."""

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        if type(model) is not LlamaForCausalLM:  # a subclass, a peft or FSDP wrapper: transformers' forward
            return False
        config = model.config
        return (not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
                and getattr(config, "hidden_act", "silu") == "silu" and getattr(config, "pretraining_tp", 1) == 1)

    @torch.no_grad()
    def __init__(self, model: LlamaForCausalLM, batch_size: int, capacity: int) -> None:
        config, decoder = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.norm_eps = config.rms_norm_eps
        self.embed, self.final_norm, self.lm_head = decoder.embed_tokens.weight, decoder.norm.weight, model.lm_head.weight
        self.layers = []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight,
                torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),  # size = (Q + 2K, H)
                attention.o_proj.weight,
                layer.post_attention_layernorm.weight,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),  # size = (2I, H)
                mlp.down_proj.weight,
            ))
        rotary = decoder.rotary_emb
        self.inv_freq, self.rope_scaling = rotary.inv_freq.float(), rotary.attention_scaling
        dtype, device = self.embed.dtype, self.embed.device
        shape = (batch_size, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.length = 0  # cache positions filled

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the cache (the others have ended): later steps compute on them alone."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def _rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return weight * hidden.to(dtype)

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # size = (B, L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # size = (B, L, D)
        return ((angles.cos() * self.rope_scaling).to(dtype).unsqueeze(1),  # size = (B, 1, L, D)
                (angles.sin() * self.rope_scaling).to(dtype).unsqueeze(1))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _attention(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√D + mask)·v, (B, heads, L, D). One query per row (a decode step): products and sums over the
        cache, which on a CPU cost a fraction of a fused or batched-matmul kernel's per-call set-up at these sizes;
        the prompt: the fused kernel."""
        if query.size(2) > 1:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.kv_heads != self.heads)
        if self.kv_heads != self.heads:  # grouped-query attention: each key/value head serves a group of query heads
            keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = (query * keys).sum(-1) * self.scale  # size = (B, heads, end)
        weights = scores.masked_fill(~mask[:, :, 0], float("-inf")).float().softmax(dim=-1).to(values.dtype)
        return (weights.unsqueeze(-1) * values).sum(-2, keepdim=True)  # size = (B, heads, 1, D)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Append `input_ids` (B, L) at cache positions [length, length + L) and return the next-token logits of the
        last position (B, V). `key_mask` (B, length + L), bool: the cache positions a row may attend to (its real
        tokens); the new positions also attend causally among themselves."""
        batch, new = input_ids.shape
        start, end = self.length, self.length + new
        hidden = F.embedding(input_ids, self.embed)  # size = (B, L, H)
        cos, sin = self._rotary(position_ids, hidden.dtype)
        mask = key_mask[:, None, None, :end]  # size = (B, 1, 1, end)
        if new > 1:  # the prompt: causal among the new positions, which come after everything cached
            causal = torch.ones(new, end, dtype=torch.bool, device=input_ids.device).tril(diagonal=start)
            mask = mask & causal  # size = (B, 1, L, end)
            # A left-pad position attends to no real token: let every position see itself, so that no attention row
            # is empty (an empty row is NaN, and NaN times a zero weight is NaN in the rows that read its value).
            diagonal = torch.zeros(new, end, dtype=torch.bool, device=input_ids.device)
            diagonal[torch.arange(new), start + torch.arange(new)] = True
            mask = mask | diagonal
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for k, (norm_in, qkv_weight, o_weight, norm_post, gate_up_weight, down_weight) in enumerate(self.layers):
            qkv = F.linear(self._rms_norm(hidden, norm_in), qkv_weight)  # size = (B, L, Q + 2K)
            query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
            query = self._rotate(query.view(batch, new, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            key = self._rotate(key.view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            self.keys[k][:, :, start:end] = key
            self.values[k][:, :, start:end] = value.view(batch, new, self.kv_heads, self.head_dim).transpose(1, 2)
            attended = self._attention(query, self.keys[k][:, :, :end], self.values[k][:, :, :end], mask)
            hidden = hidden + F.linear(attended.transpose(1, 2).reshape(batch, new, q_size), o_weight)
            gate, up = F.linear(self._rms_norm(hidden, norm_post), gate_up_weight).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, down_weight)
        self.length = end
        return F.linear(self._rms_norm(hidden[:, -1], self.final_norm), self.lm_head)  # size = (B, V)
