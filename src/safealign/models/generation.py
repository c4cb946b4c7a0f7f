"""Sampling from a causal LM: the one generation path of safealign (RL rollouts, evaluation, red-teaming).

Prompts are formatted with `format_prompt` / `tokenize_prompt` (data/formatting.py), **left-padded**
into a batch, and decoded with a hand-written KV-cache loop. Every forward gets position ids derived
from the attention mask (docs/maths.md §3): a prompt then continues exactly as it would alone, and the log-probs
that PPO later recomputes on `RolloutBatch.sequences` with `RolloutBatch.position_ids` are those of the
sampling distribution.

Why not `model.generate`? In transformers 5.23 it derives position ids from the mask too (a test pins
that both agree greedily) and is as fast (tiny preset, batch 64, 64 new tokens, 2 shared CPU cores:
equal within the ±10% noise), but it cannot take a `torch.Generator` (it samples from the global RNG)
and returns no masks; this loop seeds sampling locally and gives PPO a `RolloutBatch` directly.
Note: `LlamaModel.forward` without `position_ids` counts positions from the padded start; RoPE sees only
relative positions, so on Llama-like models that is a rounding difference, but on absolute-position
models (GPT-2, OPT) it changes the output: the tests check left padding on both.

A row stops at its first EOS: the EOS is part of the response (reward and cost models score
prompt + response + EOS), every later position holds the pad token and is 0 in `response_mask` and
`attention_mask`. A row that reaches `max_new_tokens` without EOS is truncated (`ended_with_eos` False).

A model sharded with FSDP2 (`fully_shard`, the RL stages under FSDP) all-gathers its weights in every forward, a
collective call: decoding then goes on until every rank's rows have ended (one all-reduce of a flag per token), and
the columns a rank decoded after its own rows ended (pad only, sampled from no RNG) are dropped, so each rank's
rollout, and its generator's state after it, are those of an unsharded run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safealign.config import config_field
from safealign.console import stderr_console
from safealign.data.collate import pad_batch, position_ids_from_mask
from safealign.data.formatting import tokenize_prompts
from safealign.models.llama_decoder import LlamaDecoder


@dataclass
class SamplingConfig:
    """How responses are sampled. Defaults sample the policy's own distribution (as PPO rollouts do)."""

    max_new_tokens: int = config_field(64, help="Most response tokens per row (EOS included).")
    temperature: float = config_field(1.0, help="Softmax temperature (> 0); ignored when greedy.")
    top_p: float = config_field(1.0, help="Nucleus sampling: keep the smallest token set with this much probability (1 = off).")
    top_k: int = config_field(0, help="Keep only the k most likely tokens (0 = off).")
    num_samples: int = config_field(1, help="Responses per prompt (rows are prompt-major: p0s0, p0s1, ..., p1s0, ...).")
    greedy: bool = config_field(False, help="Take the most likely token at every step instead of sampling.")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (use greedy=True), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


@dataclass
class RolloutBatch:
    """A batch of left-padded prompts and their sampled responses. B = prompts × num_samples.

    Row i answers prompt i // num_samples. P = prompt_length (longest prompt), T = generated steps
    (≤ max_new_tokens; fewer when every row ended earlier).
    """

    sequences: torch.Tensor  # size = (B, P + T): left-padded prompt, then response, then pad
    attention_mask: torch.Tensor  # size = (B, P + T): 1 on real prompt tokens and response tokens up to EOS
    prompt_length: int  # P: responses start at column P
    response_mask: torch.Tensor  # size = (B, T): 1 on response tokens up to and including EOS
    position_ids: torch.Tensor  # size = (B, P + T): attention_mask.cumsum(-1) - 1, 0 on padding
    ended_with_eos: torch.Tensor  # size = (B,) bool: False for rows truncated at max_new_tokens

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]  # size = (B, T)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # size = (B,)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token")
    return pad


def sample_next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from last-position logits (B, V) -> (B,): greedy, or temperature, top-k, top-p, sample."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature  # size = (B, V)
    if cfg.top_k > 0 and cfg.top_k < logits.size(-1):
        kth_largest = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # size = (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)  # size = (B, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p: the most likely one always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= cfg.top_p  # size = (B, V)
        drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF sampling: one uniform draw per row against the cumulative probabilities (a token with probability 0,
    # masked above, spans no interval and is never drawn). torch.multinomial draws the same distribution at several
    # times the cost on a CPU.
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # size = (B, V)
    where = generator.device if generator is not None else cdf.device
    # A generator on another device (a CPU one with a CUDA model) draws where it lives: the same tokens on any device.
    uniform = torch.rand(cdf.size(0), 1, generator=generator, device=where).to(cdf.device)  # size = (B, 1)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1).clamp(max=cdf.size(-1) - 1)


@torch.no_grad()
def generate_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
) -> RolloutBatch:
    """Sample `cfg.num_samples` responses per tokenised prompt (one left-padded batch, KV cache).

    `generator` makes sampling reproducible (best on the model's device; a CPU one also works); None uses the
    global RNG.
    The model is put in eval mode for the loop and given back in the mode it came in.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_tokens needs at least one prompt and no empty prompt")
    eos_id, pad_id = tokenizer.eos_token_id, _pad_id(tokenizer)
    device = model.device
    rows = [p for p in prompt_ids for _ in range(cfg.num_samples)]  # prompt-major
    input_ids, prompt_mask = pad_batch(rows, pad_id, side="left")  # size = (B, P)
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
    batch_size, prompt_length = input_ids.shape

    lock_step = _is_sharded(model)
    # The lean decoder for plain Llama models; transformers' forward for the rest (and for FSDP2's lock-step).
    decoder = LlamaDecoder(model, batch_size, prompt_length + cfg.max_new_tokens) \
        if LlamaDecoder.supports(model) and not lock_step else None
    was_training = model.training
    model.eval()
    try:
        position_ids = position_ids_from_mask(prompt_mask)  # size = (B, P)
        if decoder is not None:
            key_mask = torch.ones(batch_size, prompt_length + cfg.max_new_tokens, dtype=torch.bool, device=device)
            key_mask[:, :prompt_length] = prompt_mask.bool()  # generated positions are keys for every row
            logits = decoder.forward(input_ids, position_ids, key_mask)  # size = (B, V)
        else:
            attention_mask = prompt_mask  # size = (B, P + t) during the loop
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :]
        next_position = position_ids[:, -1:] + 1  # size = (B, 1)
        new_tokens: list[torch.Tensor] = []
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)  # size = (B,)
        # The rows the decoder still computes (all of them on transformers' path, where finished rows keep computing
        # and their outputs are discarded); `logits`, `next_position` and the decoder's cache hold these rows only.
        active = torch.arange(batch_size, device=device)
        num_kept = cfg.max_new_tokens  # tokens of this batch's rollout: fewer when every row ended earlier
        for step in range(cfg.max_new_tokens):
            token = torch.full((batch_size,), pad_id, dtype=torch.long, device=device)  # size = (B,)
            if num_kept > step:  # else lock-step only: this rank's rows have ended; no draw, its RNG stays as unsharded
                token[active] = sample_next_token(logits, cfg, generator)
            token = token.masked_fill(finished, pad_id)
            new_tokens.append(token)
            if eos_id is not None:
                finished = finished | (token == eos_id)
            rows_done = bool(finished.all())
            if rows_done:
                num_kept = min(num_kept, step + 1)
            if step == cfg.max_new_tokens - 1 or (_every_rank_done(rows_done, device) if lock_step else rows_done):
                break
            if decoder is not None:
                running = ~finished[active]  # size = (A,)
                if 4 * int(running.sum()) <= 3 * len(active):  # a quarter of the rows has ended: drop them
                    decoder.keep(running.nonzero().squeeze(-1))
                    active, next_position, key_mask = active[running], next_position[running], key_mask[running]
                logits = decoder.forward(token[active, None], next_position, key_mask)
            else:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=-1)
                out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                            cache=out.cache, use_cache=True)
                logits = out.logits[:, -1, :]
            next_position = next_position + 1
    finally:
        model.train(was_training)

    # Lock-step steps after this batch's rows ended hold only pad: dropped, the rollout is the one an unsharded run samples.
    responses = torch.stack(new_tokens[:num_kept], dim=1)  # size = (B, T)
    # A response token is real up to and including the row's first EOS.
    if eos_id is not None:
        is_eos = responses == eos_id  # size = (B, T)
        eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS strictly before t
        response_mask = (eos_before == 0).long()  # size = (B, T)
        ended_with_eos = is_eos.any(-1)  # size = (B,)
    else:
        response_mask = torch.ones_like(responses)
        ended_with_eos = torch.zeros(batch_size, dtype=torch.bool, device=device)
    responses = responses.masked_fill(response_mask == 0, pad_id)
    full_mask = torch.cat([prompt_mask, response_mask], dim=-1)  # size = (B, P + T)
    return RolloutBatch(
        sequences=torch.cat([input_ids, responses], dim=-1),
        attention_mask=full_mask,
        prompt_length=prompt_length,
        response_mask=response_mask,
        position_ids=position_ids_from_mask(full_mask),
        ended_with_eos=ended_with_eos,
    )


def _is_sharded(model: torch.nn.Module) -> bool:
    """Sharded by FSDP2 over several ranks: every forward all-gathers the weights, a collective that each rank must join."""
    return isinstance(model, FSDPModule) and torch.distributed.is_initialized()


def _every_rank_done(rows_done: bool, device: torch.device) -> bool:
    """Whether every rank's rows have ended (one all-reduce): a rank whose rows ended keeps decoding pad until then,
    so that all ranks make the same number of forward calls."""
    flag = torch.tensor([int(rows_done)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def decode_responses(tokenizer: PreTrainedTokenizerBase, batch: RolloutBatch) -> list[str]:
    """Response texts of a batch: special tokens (EOS, pad) stripped, whitespace trimmed."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.responses, batch.response_mask)]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


@dataclass
class Sample:
    """One decoded response and what the text alone no longer tells."""

    text: str  # special tokens stripped, whitespace trimmed
    num_tokens: int  # response tokens generated, EOS not counted
    ended_with_eos: bool  # False: cut at max_new_tokens


def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: SamplingConfig,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[Sample]:
    """Responses to raw prompts, `cfg.num_samples` per prompt, prompt-major (len = len(prompts) × num_samples).

    `batch_size` counts rows (prompts × num_samples). Prompts are batched by token length (less padding)
    and answers come back in the input order. The same (model, prompts, cfg, batch_size, seed) gives the
    same responses.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    prompts_per_batch = max(1, batch_size // cfg.num_samples)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    answers: list[list[Sample]] = [[] for _ in prompts]

    starts = range(0, len(order), prompts_per_batch)
    if progress:
        from rich.progress import track

        starts = track(starts, description="generating", total=len(starts), transient=True,
                       console=stderr_console())  # stdout stays clean for the CLI's metrics
    for start in starts:
        chunk = order[start:start + prompts_per_batch]
        batch = generate_tokens(model, tokenizer, [prompt_ids[i] for i in chunk], cfg, generator)
        texts = decode_responses(tokenizer, batch)
        ended = batch.ended_with_eos.tolist()
        num_tokens = (batch.response_lengths - batch.ended_with_eos.long()).tolist()
        for j, i in enumerate(chunk):
            rows = range(j * cfg.num_samples, (j + 1) * cfg.num_samples)
            answers[i] = [Sample(texts[r], num_tokens[r], ended[r]) for r in rows]
    return [sample for per_prompt in answers for sample in per_prompt]


def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: SamplingConfig,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """The texts of `generate_samples`: len(prompts) × num_samples responses, prompt-major."""
    return [s.text for s in generate_samples(model, tokenizer, prompts, cfg, batch_size, seed, progress)]
