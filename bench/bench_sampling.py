"""Sampling speed: safealign's `generate_tokens` vs transformers' plain `model.generate`, same model, prompts, batch.

    .venv/bin/python bench/bench_sampling.py                       # tiny and small presets, batches 32 and 256
    .venv/bin/python bench/bench_sampling.py --preset tiny --batch 64 --threads 1 --repeats 5

Both sides sample (temperature 1, no top-k or top-p) `--new-tokens` tokens per row from the same left-padded batch of
SafeWorld prompts (prompt-major, as the RL rollouts and the evaluation build them), with a KV cache, rows stopping at
EOS. The models are the presets with random weights (seeded, identical on both sides): they rarely say EOS, so both
sides decode the full length and the comparison is one of per-token cost. A trained policy's rows end at different
lengths, which `generate_tokens` also exploits (it drops ended rows from its batch): `--trained DIR` runs that case
on a policy directory (e.g. runs/demo/sft/model).

Reported per configuration: new tokens per second (tokens up to and including EOS) of each side, medians over
`--repeats` interleaved runs (A B, B A, ...), and the ratio safealign / generate (the median of adjacent pairs' ratios).
One process, one model per configuration, warm-up runs left out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from safealign.data.collate import pad_batch
from safealign.data.formatting import tokenize_prompts
from safealign.data.safeworld import WorldConfig, generate_world, world_texts
from safealign.models.generation import SamplingConfig, generate_tokens
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import load_tokenizer, train_tokenizer


def new_tokens(sequences: torch.Tensor, prompt_length: int, eos_id: int) -> int:
    """Tokens generated up to and including each row's first EOS (`model.generate` pads after it)."""
    responses = sequences[:, prompt_length:]
    is_eos = responses == eos_id
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return int((before == 0).sum())


def run_generate(model, tokenizer, prompt_ids: list[list[int]], max_new: int, seed: int) -> int:
    input_ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return new_tokens(out, input_ids.size(1), tokenizer.eos_token_id)


def run_safealign(model, tokenizer, prompt_ids: list[list[int]], max_new: int, seed: int) -> int:
    batch = generate_tokens(model, tokenizer, prompt_ids, SamplingConfig(max_new_tokens=max_new),
                            torch.Generator().manual_seed(seed))
    return int(batch.response_mask.sum())


def measure(fn, *args) -> float:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny,small")
    parser.add_argument("--batch", default="32,256", help="Rows per batch (32: an RL rollout; 256: the evaluation's).")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--trained", default="", help="Also a trained policy directory (its rows end at EOS).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    world = generate_world(WorldConfig(seed=0, sft_examples=2000, train_pairs=0, test_pairs=0))
    tokenizer = train_tokenizer(world_texts(world), vocab_size=2048)
    prompts = [row["prompt"] for row in world.prompts["train"]]
    models = [(preset, build_causal_lm(preset, tokenizer, seed=0).eval(), tokenizer) for preset in args.preset.split(",")]
    if args.trained:
        models.append((args.trained, build_causal_lm(args.trained).eval(), load_tokenizer(args.trained)))

    print(f"threads {torch.get_num_threads()}, {args.new_tokens} new tokens per row, {args.repeats} interleaved runs")
    print("| model | batch | generate tokens/s | safealign tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for name, model, tok in models:
        for batch in map(int, args.batch.split(",")):
            prompt_ids = tokenize_prompts(tok, prompts[:batch])
            run_generate(model, tok, prompt_ids[:8], 4, 0)  # warm-up: first-call costs out of the timing
            run_safealign(model, tok, prompt_ids[:8], 4, 0)
            ours, theirs, ratios = [], [], []
            for repeat in range(args.repeats):
                order = [("generate", run_generate), ("safealign", run_safealign)]
                pair = {}
                for side, fn in (order if repeat % 2 == 0 else order[::-1]):
                    pair[side] = measure(fn, model, tok, prompt_ids, args.new_tokens, repeat)
                ours.append(pair["safealign"])
                theirs.append(pair["generate"])
                ratios.append(pair["safealign"] / pair["generate"])
            print(f"| {name} | {batch} | {statistics.median(theirs):,.0f} | {statistics.median(ours):,.0f} | "
                  f"{statistics.median(ratios):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
