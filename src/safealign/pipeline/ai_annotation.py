"""`safealign annotate`: RLAIF's data. Sample two answers per prompt from a policy, have an AI annotator label the
pair the way Safe RLHF's crowdworkers did (which is more helpful, which is more harmless, is each one safe), and
write PKU-SafeRLHF rows that `safealign rm` / `cm` train on, the annotator's soft labels kept.

The annotator is an LLM judge (`evaluation.llm_judge`): the pairwise questions asked in both orders and averaged
(its position bias reported), or with `preference: direct` each response scored alone (d-RLAIF: a 0-9 helpfulness
score; safer = the lower unsafe probability), `is_response_k_safe` from its `unsafe` question against `unsafe_threshold`, or the
threshold that `safealign calibrate-judge` fitted for that question (`annotator_calibration`). It should not be the
judge that evaluates the trained policy: another model, or at least other questions (the evaluation asks whether an
answer complies, and matches refusal strings).

AI labels are cached: every labelled pair is appended to `label_cache` (default output_dir/labels.jsonl) under a key
of the annotator, its prompt version, the prompt and both answers, as soon as its chunk is done. A re-run (after a
crash, or with other training settings) labels only the pairs the cache lacks; the sampled pairs themselves are kept
in pairs.jsonl and reused while the sampling settings are unchanged.

Output (`output_dir`): pairs.jsonl (the sampled pairs), preferences.jsonl (the labelled PKU rows), labels.jsonl (the
cache), metrics.json (pairs, cache hits, identical answers skipped, the annotator's unsafe share per prompt kind, how
often its helpful and harmless choices agree, its position bias).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from safealign.config import ConfigError, changed_settings, config_field, save_config
from safealign.console import stderr_console
from safealign.data.loading import load_prompts
from safealign.evaluation.gold import GoldEvalConfig, sample_policy, sampling_config, select_prompts
from safealign.evaluation.judge_calibration import JudgeCalibration
from safealign.evaluation.llm_judge import PROMPT_VERSION, LLMJudge, annotate_pairs, make_backend
from safealign.io import atomic_write_json, atomic_write_jsonl
from safealign.training.common import progress_bar

console = stderr_console()
CHUNK = 8  # pairs labelled between two appends to the cache
SAMPLING_KEYS = ("model", "tokenizer", "prompts", "limit", "max_new_tokens", "temperature", "top_p", "top_k", "seed")


@dataclass
class AnnotateConfig:
    """Sample answer pairs from a policy and label them with an AI annotator (RLAIF)."""

    model: str = config_field("smollm2", help="The policy whose answers are labelled: a model directory or a preset (e.g. smollm2).")
    tokenizer: str = config_field("", help="Tokenizer directory; '' = the model's.")
    prompts: str = config_field("", help="Prompt file ({prompt, kind, category} rows), e.g. `safealign real-prompts`' train.jsonl.")
    output_dir: str = config_field("runs/annotate", help="Where pairs.jsonl, preferences.jsonl, labels.jsonl and metrics.json go.")
    annotator: str = config_field("llm:qwen2.5-coder-0.5b", help="The AI annotator: llm:PATH (a local causal LM or preset) or openai:MODEL.")
    annotator_calibration: str = config_field(
        "", help="The annotator's calibration.json (safealign calibrate-judge with question `unsafe`): its threshold decides "
                 "is_response_k_safe; '' = unsafe_threshold.")
    preference: Literal["pairwise", "direct"] = config_field(
        "pairwise", help="How better/safer are decided: pairwise (both responses shown, both orders averaged: RLAIF) or direct "
                         "(each response scored alone: d-RLAIF's 0-9 helpfulness, the unsafe probability; no position bias).")
    unsafe_threshold: float = config_field(0.5, help="A response is labelled unsafe when the annotator's P(unsafe) reaches this (without a calibration).")
    label_cache: str = config_field("", help="The AI-label cache (JSONL); '' = output_dir/labels.jsonl. Share one between runs to label each pair once.")
    limit: int = config_field(0, help="Label pairs for a seeded subset of this many prompts (0 = all).")
    max_new_tokens: int = config_field(96, help="Most tokens per sampled answer.")
    temperature: float = config_field(1.0, help="Sampling temperature of the two answers.")
    top_p: float = config_field(1.0, help="Nucleus sampling of the two answers (1 = off).")
    top_k: int = config_field(0, help="Top-k sampling of the two answers (0 = off).")
    batch_size: int = config_field(64, help="Answers per generation batch.")
    annotator_batch_size: int = config_field(4, help="Annotator inputs per forward pass (llm: annotators).")
    max_response_chars: int = config_field(1500, help="Answers longer than this are cut before the annotator reads them.")
    chain_of_thought: bool = config_field(False, help="The annotator reasons before each answer (RLAIF's CoT; slower).")
    seed: int = config_field(0, help="Seed of the sampling and of the prompt subset.")
    device: str = config_field("auto", help="Device of the policy: auto (cuda when available), cpu, cuda, ...")
    annotator_device: str = config_field("auto", help="The local annotator's device (auto: the GPU when there is one).")
    api_key_env: str = config_field("OPENAI_API_KEY", help="The environment variable holding an openai: annotator's key (never logged).")


def unsafe_threshold(cfg: AnnotateConfig) -> tuple[float, str]:
    """The threshold of the annotator's `unsafe` question, and where it comes from."""
    if not cfg.annotator_calibration:
        return cfg.unsafe_threshold, "unsafe_threshold"
    calibration = JudgeCalibration.load(cfg.annotator_calibration, cfg.annotator)
    tasks = [task for task, agreement in calibration.agreement.items() if agreement["question"] == "unsafe"]
    if not tasks:
        raise ConfigError(f"annotate: {cfg.annotator_calibration} calibrates no `unsafe` question (its questions: "
                          f"{sorted({a['question'] for a in calibration.agreement.values()})}): run calibrate-judge with "
                          "--questions '{hand-objective: unsafe}' (or another task) for the annotator")
    return calibration.thresholds[tasks[0]], f"{cfg.annotator_calibration} ({tasks[0]})"


def pair_key(annotator: str, preference: str, row: dict[str, Any]) -> str:
    text = json.dumps([annotator, preference, PROMPT_VERSION, row["prompt"], row["response_0"], row["response_1"]])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cached labels by key; a line torn by a crash (the last one) is dropped."""
    cached: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return cached
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        cached[row["key"]] = row["labels"]
    return cached


def sample_pairs(cfg: AnnotateConfig, out: Path) -> list[dict[str, Any]]:
    """Two answers per prompt (pairs.jsonl, reused while the sampling settings are unchanged)."""
    path = out / "pairs.jsonl"
    if path.is_file() and changed_settings(cfg, out / "config.yaml", ignore=tuple(
            k for k in cfg.__dataclass_fields__ if k not in SAMPLING_KEYS)) == []:
        console.print(f"reusing the sampled pairs in {path}", highlight=False)
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    evaluation = GoldEvalConfig(model=cfg.model, tokenizer=cfg.tokenizer, prompts=cfg.prompts, output_dir=str(out),
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k, samples_per_prompt=2, batch_size=cfg.batch_size, seed=cfg.seed,
                                limit=cfg.limit, device=cfg.device, gold="false")
    sampling = sampling_config("annotate", evaluation, 2)
    records = select_prompts(load_prompts(cfg.prompts), cfg.limit, cfg.seed)
    samples, _ = sample_policy(evaluation, records, sampling)
    pairs = []
    for first, second in zip(samples[0::2], samples[1::2]):  # prompt-major: a prompt's two answers are adjacent
        fields = {k: v for k, v in first.items() if k not in ("sample", "response", "response_tokens", "ended_with_eos")}
        pairs.append({**fields, "response_0": first["response"], "response_1": second["response"]})
    atomic_write_jsonl(path, pairs)
    return pairs


def label_pairs(cfg: AnnotateConfig, pairs: list[dict[str, Any]], cache_path: Path, threshold: float) -> tuple[list[dict[str, Any]], int]:
    """Every pair labelled (from the cache, or by the annotator, chunk by chunk, each chunk appended to the cache);
    the number of pairs the annotator labelled now."""
    cached = read_cache(cache_path)
    keys = [pair_key(cfg.annotator, cfg.preference, p) for p in pairs]
    todo = [i for i, key in enumerate(keys) if key not in cached]
    if todo:
        backend = make_backend(cfg.annotator, batch_size=cfg.annotator_batch_size, device=cfg.annotator_device,
                               api_key_env=cfg.api_key_env)
        annotator = LLMJudge(backend, chain_of_thought=cfg.chain_of_thought, max_response_chars=cfg.max_response_chars)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with progress_bar() as bar, cache_path.open("a", encoding="utf-8") as cache:
            task = bar.add_task("labelling pairs", total=len(todo), info=annotator.description)
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start:start + CHUNK]
                for i, row in zip(chunk, annotate_pairs(annotator, [pairs[i] for i in chunk], threshold, cfg.preference)):
                    labels = {k: v for k, v in row.items() if k not in pairs[i]}
                    cached[keys[i]] = labels
                    cache.write(json.dumps({"key": keys[i], "labels": labels}) + "\n")
                cache.flush()
                bar.advance(task, len(chunk))
        if backend.hard_label_calls:
            console.print(f"[yellow]warning:[/] the annotator gave no log-probabilities on {backend.hard_label_calls} "
                          "calls: those labels are votes (hard), not soft", highlight=False)
    rows = []
    for pair, key in zip(pairs, keys):
        labels = dict(cached[key])
        for k in (0, 1):  # the cache keeps the probabilities: the safety label follows this run's threshold
            labels[f"is_response_{k}_safe"] = labels[f"response_{k}_unsafe_probability"] < threshold
        rows.append({**pair, **labels})
    return rows, len(todo)


def label_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the annotator said, in aggregate: its unsafe share per prompt kind, how often its helpful and harmless
    choices agree, its position bias."""
    metrics: dict[str, Any] = {}
    for kind in sorted({str(r.get("kind")) for r in rows}):
        chosen = [r for r in rows if str(r.get("kind")) == kind]
        unsafe = [not r[f"is_response_{k}_safe"] for r in chosen for k in (0, 1)]
        metrics[f"unsafe_share/{kind}"] = float(np.mean(unsafe))
    metrics["better_is_safer"] = float(np.mean([r["better_response_id"] == r["safer_response_id"] for r in rows]))
    # the annotator's two safety answers on one pair, against each other: of the pairs it labels one safe and one
    # unsafe, the share where its "safer" is the safe one (1 by construction with preference: direct)
    split = [r for r in rows if r["is_response_0_safe"] != r["is_response_1_safe"]]
    metrics["safer_is_the_safe_one"] = float(np.mean([(r["safer_response_id"] == 0) == r["is_response_0_safe"]
                                                      for r in split])) if split else None
    metrics["pairs_split_by_safety"] = len(split)
    if "better_position_bias" in rows[0]:
        metrics["position_bias/helpful"] = float(np.mean([r["better_position_bias"] for r in rows]))
        metrics["position_bias/harmless"] = float(np.mean([r["safer_position_bias"] for r in rows]))
    metrics["mean_confidence/helpful"] = float(np.mean([abs(r["better_probability"] - 0.5) for r in rows]))
    metrics["mean_confidence/harmless"] = float(np.mean([abs(r["safer_probability"] - 0.5) for r in rows]))
    return metrics


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    if not cfg.prompts:
        raise ConfigError("annotate: `prompts` is required (a prompt file, e.g. safealign real-prompts' train.jsonl)")
    threshold, threshold_source = unsafe_threshold(cfg)  # a bad calibration fails before any sampling
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = sample_pairs(cfg, out)
    save_config(cfg, out / "config.yaml")  # after the sampling check: it compares against the previous one
    identical = [p for p in pairs if p["response_0"] == p["response_1"]]  # no preference to learn from
    pairs = [p for p in pairs if p["response_0"] != p["response_1"]]
    if not pairs:
        raise ConfigError(f"annotate: every sampled pair of {cfg.prompts} has two identical answers: sample with a higher temperature")
    cache_path = Path(cfg.label_cache) if cfg.label_cache else out / "labels.jsonl"
    rows, labelled_now = label_pairs(cfg, pairs, cache_path, threshold)
    atomic_write_jsonl(out / "preferences.jsonl", rows)
    metrics = {"pairs": len(rows), "labelled_now": labelled_now, "from_cache": len(rows) - labelled_now,
               "identical_pairs_skipped": len(identical), "annotator": rows[0]["annotator"],
               "unsafe_threshold": threshold, "unsafe_threshold_from": threshold_source, **label_metrics(rows)}
    atomic_write_json(out / "metrics.json", metrics)
    console.print(f"{len(rows)} pairs labelled by {metrics['annotator']} ({labelled_now} now, {metrics['from_cache']} "
                  f"from the cache {cache_path})", highlight=False)
    return metrics
