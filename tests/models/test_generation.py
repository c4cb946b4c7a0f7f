"""Generation on tiny random models: left padding, EOS handling, seeding, num_samples, the sampler.

Left padding is checked on a Llama (RoPE) and on a GPT-2 (absolute position embeddings). RoPE only sees
relative positions, so on a Llama a uniform shift of every real token by the pad count changes nothing
but rounding; on GPT-2 a forward without mask-derived position ids gives other logits, which is what
makes the left-padding test catch a missing `position_ids`.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from safealign.data.collate import pad_batch, position_ids_from_mask
from safealign.data.formatting import tokenize_prompt
from safealign.models.generation import (
    SamplingConfig,
    generate_samples,
    generate_tokens,
    sample_next_token,
    sample_responses,
)
from safealign.models.llama_decoder import LlamaDecoder
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import train_tokenizer

TEXTS = [
    "How do I bake bread at home with flour, water and salt?",
    "The quick brown fox jumps over the lazy dog again and again.",
    "Tell me about the weather in spring and in autumn.",
    "How do I kill a stuck process on Linux?",
]
PROMPTS = ["bake bread", "Tell me about the weather in spring and in autumn, please, in detail.", "kill a process"]
GREEDY = SamplingConfig(max_new_tokens=12, greedy=True)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 20, vocab_size=400)


def _spread_weights(model, std=0.2):
    """Random init with larger weights: a default-init tiny model repeats one token greedily."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, std, generator=generator)
    return model.eval()


def tiny_gpt2(tokenizer):
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return _spread_weights(GPT2LMHeadModel(config))


@pytest.fixture(scope="module")
def model(tokenizer):
    return _spread_weights(build_causal_lm("tiny", tokenizer, seed=0))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def any_model(request, tokenizer, model):
    return model if request.param == "llama" else tiny_gpt2(tokenizer)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids = [tokenize_prompt(tokenizer, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)  # different lengths: the batch really is padded
    return ids


def no_eos(tokenizer):
    """The tokenizer's ids with an EOS that no model can emit: every row runs to max_new_tokens."""
    return SimpleNamespace(eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)


class WithEos:
    """The real tokenizer with another EOS id (to make a random model stop where a test wants)."""

    def __init__(self, tokenizer, eos_token_id):
        self._tokenizer, self.eos_token_id = tokenizer, eos_token_id

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_left_padded_batch_continues_each_prompt_as_if_alone(any_model, tokenizer, prompt_ids):
    model = any_model
    batch = generate_tokens(model, no_eos(tokenizer), prompt_ids, GREEDY)
    assert batch.sequences[:, 0].eq(tokenizer.pad_token_id).sum() == len(prompt_ids) - 1  # left padding
    for row, ids in enumerate(prompt_ids):
        alone = generate_tokens(model, no_eos(tokenizer), [ids], GREEDY)
        assert batch.responses[row].tolist() == alone.responses[0].tolist()


def test_padding_without_position_ids_would_change_the_logits(tokenizer, prompt_ids):
    # Guards the test above: on GPT-2, positions counted from the padded start give other logits.
    model = tiny_gpt2(tokenizer)
    short, long = prompt_ids[0], prompt_ids[1]
    input_ids, mask = pad_batch([short, long], tokenizer.pad_token_id, side="left")
    alone = model(torch.tensor([short])).logits[0, -1]
    with_positions = model(input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[0, -1]
    without_positions = model(input_ids, attention_mask=mask).logits[0, -1]
    torch.testing.assert_close(with_positions, alone, atol=1e-4, rtol=1e-4)
    assert (without_positions - alone).abs().max() > 1e-2


def test_greedy_matches_hf_generate_on_a_left_padded_batch(any_model, tokenizer, prompt_ids):
    model = any_model
    # transformers' generate() derives position ids from the mask too: both must agree.
    batch = generate_tokens(model, no_eos(tokenizer), prompt_ids, GREEDY)
    input_ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    hf = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                        min_new_tokens=12, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert batch.sequences.tolist() == hf.tolist()


def test_rollout_position_ids_reproduce_the_sampling_logits(any_model, tokenizer, prompt_ids):
    model = any_model
    # What PPO relies on: a forward over (sequences, attention_mask, position_ids) scores the
    # response tokens under the distribution they were sampled from.
    batch = generate_tokens(model, no_eos(tokenizer), prompt_ids, GREEDY)
    logits = model(batch.sequences, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    P = batch.prompt_length
    predicted = logits[:, P - 1:-1].argmax(-1)  # size = (B, T)
    assert predicted.tolist() == batch.responses.tolist()


def test_eos_stops_a_row_and_masks_what_follows(model, tokenizer, prompt_ids):
    free = generate_tokens(model, no_eos(tokenizer), prompt_ids, GREEDY)
    # Call the token that row 0 emits at step 3 "EOS" (choose a step where it is new to the row).
    row0 = free.responses[0].tolist()
    step = next(t for t in range(3, 12) if row0[t] not in row0[:t])
    eos = row0[step]
    ids = SimpleNamespace(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    batch = generate_tokens(model, ids, prompt_ids, GREEDY)
    pad = tokenizer.pad_token_id
    for row in range(len(prompt_ids)):
        expected = free.responses[row].tolist()
        stop = expected.index(eos) if eos in expected else None
        got, mask = batch.responses[row].tolist(), batch.response_mask[row].tolist()
        if stop is None:
            assert got == expected[:len(got)] and all(mask) and not batch.ended_with_eos[row]
        else:
            assert got[:stop + 1] == expected[:stop + 1]  # EOS included in the response
            assert got[stop + 1:] == [pad] * (len(got) - stop - 1)
            assert mask == [1] * (stop + 1) + [0] * (len(got) - stop - 1)
            assert batch.ended_with_eos[row]
    assert batch.response_mask[0].sum() == step + 1
    P = batch.prompt_length
    assert batch.attention_mask[:, P:].tolist() == batch.response_mask.tolist()
    assert batch.position_ids[0, P + step] == batch.attention_mask[0].sum() - 1


def test_generation_stops_when_every_row_has_ended(model, tokenizer, prompt_ids):
    first = generate_tokens(model, no_eos(tokenizer), prompt_ids[:1], dataclasses.replace(GREEDY, num_samples=3))
    ids = SimpleNamespace(eos_token_id=first.responses[0, 0].item(), pad_token_id=tokenizer.pad_token_id)
    batch = generate_tokens(model, ids, prompt_ids[:1], dataclasses.replace(GREEDY, num_samples=3))
    assert batch.responses.shape == (3, 1)
    assert batch.ended_with_eos.all() and batch.response_mask.sum() == 3


def test_truncated_rows_are_flagged(model, tokenizer, prompt_ids):
    batch = generate_tokens(model, no_eos(tokenizer), prompt_ids, GREEDY)
    assert batch.responses.shape == (3, 12)
    assert not batch.ended_with_eos.any() and batch.response_mask.all()


def test_seeded_sampling_is_reproducible(model, tokenizer, prompt_ids):
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)

    def sample(seed):
        return generate_tokens(model, tokenizer, prompt_ids, cfg, torch.Generator().manual_seed(seed)).sequences

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    texts = sample_responses(model, tokenizer, PROMPTS, cfg, batch_size=2, seed=5)
    assert texts == sample_responses(model, tokenizer, PROMPTS, cfg, batch_size=2, seed=5)


def test_num_samples_gives_prompt_major_rows(model, tokenizer, prompt_ids):
    greedy = generate_tokens(model, no_eos(tokenizer), prompt_ids, dataclasses.replace(GREEDY, num_samples=2))
    assert greedy.sequences.shape[0] == 6
    assert torch.equal(greedy.sequences[0::2], greedy.sequences[1::2])  # rows 2i, 2i+1 answer prompt i
    cfg = SamplingConfig(max_new_tokens=6, num_samples=4)
    sampled = generate_tokens(model, no_eos(tokenizer), prompt_ids[:1], cfg, torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in sampled.responses.tolist()}) > 1  # independent samples, not copies
    texts = sample_responses(model, tokenizer, PROMPTS, cfg, batch_size=8)
    assert len(texts) == len(PROMPTS) * 4


def test_sample_responses_keeps_input_order_and_strips_special_tokens(model, tokenizer):
    cfg = dataclasses.replace(GREEDY, max_new_tokens=8)
    batched = sample_responses(model, tokenizer, PROMPTS, cfg, batch_size=2)  # sorted by length inside
    alone = [sample_responses(model, tokenizer, [p], cfg)[0] for p in PROMPTS]
    assert batched == alone
    for text in batched:
        assert tokenizer.eos_token not in text and tokenizer.pad_token not in text and text == text.strip()


def test_generate_samples_counts_tokens_without_eos(model, tokenizer):
    cfg = dataclasses.replace(GREEDY, max_new_tokens=8, num_samples=2)
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in PROMPTS]
    free = generate_tokens(model, no_eos(tokenizer), prompt_ids, cfg)
    # Make the token that prompt 0 emits at step 2 the EOS: its rows end there with 2 tokens of text.
    eos = free.responses[0, 2].item()
    tokens = free.responses.tolist()
    tokenizer_with_eos = WithEos(tokenizer, eos)
    samples = generate_samples(model, tokenizer_with_eos, PROMPTS, cfg)
    assert len(samples) == 6
    for sample, row in zip(samples, tokens):
        stop = row.index(eos) if eos in row else None
        assert sample.ended_with_eos == (stop is not None)
        assert sample.num_tokens == (stop if stop is not None else 8)
    assert samples[0].num_tokens == samples[1].num_tokens <= 2


def test_sampler_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, SamplingConfig(top_k=1), g), greedy)
    assert torch.equal(sample_next_token(logits, SamplingConfig(top_p=1e-6), g), greedy)
    # top_k=2 only ever draws one of the two best tokens.
    draws = torch.stack([sample_next_token(logits, SamplingConfig(top_k=2), g) for _ in range(50)])
    top2 = logits.topk(2, dim=-1).indices
    assert ((draws[..., None] == top2).any(-1)).all()


def test_sampler_top_p_keeps_the_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 ≤ 0.8).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, SamplingConfig(top_p=0.7), g).item() for _ in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1), dict(num_samples=0),
                                 dict(max_new_tokens=0)])
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_generator_samples_the_same_tokens_for_a_cuda_model():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    on_cpu = sample_next_token(logits, SamplingConfig(top_k=10), torch.Generator().manual_seed(1))
    on_cuda = sample_next_token(logits.cuda(), SamplingConfig(top_k=10), torch.Generator().manual_seed(1))
    assert on_cuda.device.type == "cuda" and torch.equal(on_cuda.cpu(), on_cpu)

# --------------------------------------------------------------------------------------------------
# The lean Llama decoder against transformers' forward, and the sampler
# --------------------------------------------------------------------------------------------------
class TransformersPath(torch.nn.Module):
    """The same model seen through a wrapper: `generate_tokens` then decodes with transformers' forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs)

    @property
    def device(self):
        return self.model.device


def grouped_query_llama(tokenizer):
    """A Llama with grouped-query attention (4 query heads, 2 key/value heads), as SmolLM2 and larger models have."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500.0,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return _spread_weights(LlamaForCausalLM(config))


@pytest.mark.parametrize("kind", ["preset", "grouped_query"])
def test_the_lean_decoder_decodes_what_transformers_forward_decodes(kind, model, tokenizer, prompt_ids):
    """Greedy on a left-padded batch: the same tokens through the lean decoder and through transformers' forward;
    with an EOS that ends rows early (they are dropped from the decoder's batch), still the same."""
    llama = model if kind == "preset" else grouped_query_llama(tokenizer)
    assert LlamaDecoder.supports(llama) and not LlamaDecoder.supports(TransformersPath(llama))
    cfg = dataclasses.replace(GREEDY, max_new_tokens=16, num_samples=2)
    for tok in (no_eos(tokenizer), WithEos(tokenizer, generate_tokens(llama, no_eos(tokenizer), prompt_ids, cfg)
                                           .responses[0, 3].item())):
        lean = generate_tokens(llama, tok, prompt_ids, cfg)
        reference = generate_tokens(TransformersPath(llama), tok, prompt_ids, cfg)
        assert torch.equal(lean.sequences, reference.sequences)
        assert torch.equal(lean.response_mask, reference.response_mask)
    # The next-token logits themselves, after a prompt and after one decode step.
    input_ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    positions = position_ids_from_mask(mask)
    decoder = LlamaDecoder(llama, len(prompt_ids), input_ids.size(1) + 1)
    keys = torch.cat([mask.bool(), torch.ones(len(prompt_ids), 1, dtype=torch.bool)], dim=1)
    first = decoder.forward(input_ids, positions, keys)
    with torch.no_grad():
        expected = llama(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-4)
        token = first.argmax(-1, keepdim=True)
        second = decoder.forward(token, positions[:, -1:] + 1, keys)
        full_mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        expected = llama(input_ids=torch.cat([input_ids, token], 1), attention_mask=full_mask,
                         position_ids=position_ids_from_mask(full_mask)).logits[:, -1]
        torch.testing.assert_close(second, expected, atol=1e-4, rtol=1e-4)


def test_the_sampler_draws_each_token_with_its_probability():
    """50,000 draws from a known distribution: every frequency within 4 standard errors of its probability, tokens of
    probability 0 (masked by top-k) never drawn, and the same generator seed gives the same draws."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(50_000, -1)  # size = (N, 6)
    draws = sample_next_token(logits, SamplingConfig(), torch.Generator().manual_seed(1))
    frequencies = torch.bincount(draws, minlength=6).double() / len(draws)
    standard_error = (probs * (1 - probs) / len(draws)).sqrt()
    assert ((frequencies - probs).abs() <= 4 * standard_error + 1e-12).all(), frequencies
    assert torch.equal(draws, sample_next_token(logits, SamplingConfig(), torch.Generator().manual_seed(1)))
    top2 = sample_next_token(logits, SamplingConfig(top_k=2), torch.Generator().manual_seed(2))
    assert set(top2.tolist()) == {0, 1} and abs((top2 == 0).double().mean().item() - 2 / 3) < 0.01



LOCK_STEP_SCRIPT = """
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from safealign.data.collate import pad_batch, position_ids_from_mask
from safealign.data.formatting import tokenize_prompt
from safealign.models.generation import SamplingConfig, generate_tokens
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import load_tokenizer

dist.init_process_group("gloo")
rank = dist.get_rank()
tokenizer = load_tokenizer(sys.argv[1])
model = build_causal_lm(sys.argv[1]).eval()
prompts = [tokenize_prompt(tokenizer, "bake bread")]
# top_k 1: the argmax token, drawn from the generator all the same (so its state after the rollout can be compared).
cfg = SamplingConfig(max_new_tokens=6, top_k=1, num_samples=2)
free = generate_tokens(model, SimpleNamespace(eos_token_id=-1, pad_token_id=tokenizer.pad_token_id), prompts, cfg)
# Rank 0 calls its rows' first token EOS: they end after one token. Rank 1's never end.
eos = -1 if rank else free.responses[0, 0].item()
ids = SimpleNamespace(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
alone_rng = torch.Generator().manual_seed(7)
alone = generate_tokens(model, ids, prompts, cfg, alone_rng)
for layer in model.model.layers:
    fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
sharded_rng = torch.Generator().manual_seed(7)
sharded = generate_tokens(model, ids, prompts, cfg, sharded_rng)
for name in ("sequences", "attention_mask", "response_mask", "position_ids", "ended_with_eos"):
    assert torch.equal(getattr(sharded, name), getattr(alone, name)), name
# The pad-only steps draw nothing: the next rollout samples as it would unsharded.
assert torch.equal(sharded_rng.get_state(), alone_rng.get_state()), "the generator moved on during the pad-only steps"
print(f"rank {rank}: responses {tuple(sharded.responses.shape)}", flush=True)
dist.barrier()  # neither rank tears its process group down while the other may still talk to it
dist.destroy_process_group()
# The sharded model's device meshes keep their gloo groups alive; destroyed during interpreter shutdown they can
# abort the process (SIGABRT, "terminate called without an active exception"). Nothing is left to write: leave now.
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)
"""


@pytest.mark.slow  # ~15 s: two torchrun ranks
def test_sharded_model_decodes_in_lock_step_until_every_rank_has_ended(model, tokenizer, tmp_path, torchrun):
    """Under FSDP2 every forward all-gathers the weights: a rank whose rows ended keeps decoding (pad) until every
    rank's have, or the other rank would wait forever in its next forward. Each rank's rollout is still the one
    it samples unsharded (the pad-only columns are dropped, and drew nothing from its generator)."""
    import os
    from pathlib import Path

    import safealign

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "lock_step.py").write_text(LOCK_STEP_SCRIPT)
    src = str(Path(safealign.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU whatever the machine has
    result = torchrun(tmp_path / "lock_step.py", tmp_path / "model", env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 0: responses (2, 1)" in result.stdout and "rank 1: responses (2, 6)" in result.stdout, result.stdout
