"""Best-of-n at inference (`safealign bon`): sample n answers, let the reward and cost models choose one, judge it.

    safealign bon --model runs/sft/model --reward_model runs/rm/model --cost_model runs/cm/model \
        --prompts runs/world/prompts/test.jsonl --n 8 --mode safe --output_dir runs/bon

Safe RLHF without training: the policy is left as it is and the value models pick among its own answers
(`safealign.algorithms.best_of_n`: `reward` = highest reward, `safe` = highest reward among the answers with
cost ≤ threshold, else the lowest cost, `lagrangian` = highest r − λ·c). For each prompt and each of its
`samples_per_prompt` answer slots, n candidates are sampled as `safealign evaluate` samples (the one sampler, its
seeding), every candidate is scored by the reward and cost models (each distinct prompt + answer once) and by the
policy's log-probability (for the KL estimate), the chosen one becomes the slot's answer, and the answers are judged
by SafeWorld's gold judges exactly as `safealign evaluate` judges (`gold.judge_and_summarise`; judge-free metrics off
SafeWorld).

Writes into output_dir, each file atomically: `samples.jsonl` (`safealign evaluate`'s rows, one per answer slot, plus
`candidate`, the chosen candidate's index, and its `reward`, and with a cost model its `cost` and
`no_feasible_candidate`), `candidates.jsonl` (every candidate: prompt, sample, candidate, response, response_tokens,
ended_with_eos, log_prob, reward, [cost], chosen), `model_scores/candidates.json` (the score cache), `config.yaml`,
and `metrics.json`: the gold (or judge-free) summary of the chosen answers, plus `n`, `mode`, `threshold`,
`lagrange`, `no_feasible_share` (the answer slots with no candidate of cost ≤ threshold), `mean_reward_chosen` /
`mean_reward_candidates`, `mean_cost_chosen` / `mean_cost_candidates`, `mean_distinct_texts` (per slot),
`kl_bound` (log n − (n−1)/n) and `kl_estimate` (the plug-in estimate, mean over slots), and the curve over
n' ∈ {1, 2, 4, ..., n} from the same candidates (selection among the first n' of each slot, no new sampling, no gold
judging): `curve/<n'>/{mean_reward_chosen, mean_cost_chosen, feasible_share, kl_bound, kl_estimate}`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safealign.algorithms.best_of_n import SELECTION_MODES, best_of_n_kl_bound, best_of_n_kl_estimate, select_best_of_n
from safealign.algorithms.losses import sequence_log_probs
from safealign.config import ConfigError, config_field
from safealign.data.collate import collate_sft, padding_mask_for_causal
from safealign.data.formatting import IGNORE_INDEX, tokenize_examples
from safealign.data.loading import load_prompts
from safealign.evaluation.gold import (
    DEFAULT_PROMPTS,
    judge_and_summarise,
    load_policy,
    sample_row,
    sampling_config,
    select_prompts,
    uses_gold,
    write_evaluation,
)
from safealign.evaluation.model_scores import score_samples
from safealign.io import atomic_write_jsonl
from safealign.models.generation import Sample, SamplingConfig, generate_samples

SCORE_CACHE = "model_scores"  # output_dir/model_scores/candidates.json: the candidates' reward and cost scores


@dataclass
class BestOfNConfig:
    model: str = config_field("", help="Policy to sample the candidates from: a model directory (or a preset / hub name).")
    tokenizer: str = config_field("", help="Tokenizer directory; empty = the model directory.")
    prompts: str = config_field(DEFAULT_PROMPTS, help="Prompt file ({prompt, kind, category} rows); default SafeWorld's test prompts.")
    output_dir: str = config_field("runs/bon", help="Where metrics.json, samples.jsonl, candidates.jsonl and config.yaml go.")
    reward_model: str = config_field("", help="Reward model directory (`safealign rm`): every mode ranks by its reward.")
    cost_model: str = config_field(
        "", help="Cost model directory (`safealign cm`): needed by the safe and lagrangian modes; optional with reward (then reported only).")
    n: int = config_field(4, help="Candidates sampled per answer; the metrics also give the curve over 1, 2, 4, ..., n of them.")
    mode: Literal["reward", "safe", "lagrangian"] = config_field(
        "safe", help="reward: highest reward; safe: highest reward with cost <= threshold, else lowest cost; lagrangian: highest r - lagrange*c.")
    threshold: float = config_field(0.0, help="Cost limit d of the safe mode (Safe RLHF: cost > 0 is unsafe).")
    lagrange: float = config_field(1.0, help="λ of the lagrangian mode: the reward given up per unit of cost.")
    samples_per_prompt: int = config_field(1, help="Answers per prompt, each chosen from its own n candidates (every rate is over all of them).")
    max_new_tokens: int = config_field(64, help="Most response tokens per candidate.")
    temperature: float = config_field(1.0, help="Sampling temperature: 1 samples the policy's own distribution.")
    top_p: float = config_field(1.0, help="Nucleus sampling threshold (1 = off; the KL estimate ignores it).")
    top_k: int = config_field(0, help="Top-k sampling (0 = off; the KL estimate ignores it).")
    batch_size: int = config_field(256, help="Candidates per generation batch (prompts × samples_per_prompt × n).")
    seed: int = config_field(0, help="Seed of the sampling and of the prompt subset (see limit).")
    limit: int = config_field(0, help="Use a seeded random subset of this many prompts, in file order (0 = all).")
    device: str = config_field("auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    progress: bool = config_field(True, help="Show a progress bar (on stderr) while generating.")
    gold: Literal["auto", "true", "false"] = config_field(
        "auto", help="Judge the chosen answers with SafeWorld's gold judges: auto = when every prompt carries a `kind`.")
    score_batch_size: int = config_field(64, help="Texts per forward of the reward / cost model and of the policy's log-probs.")
    score_max_length: int = config_field(256, help="Tokens per scored text (prompt + response + EOS), as the score models were trained.")


# --------------------------------------------------------------------------------------------------
# The candidates' log-probabilities and the metrics
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def response_log_probs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                       responses: Sequence[str], ended_with_eos: Sequence[bool], temperature: float,
                       batch_size: int) -> list[float]:
    """log π(response | prompt) of each text under the sampling distribution at `temperature` (top-p / top-k not
    applied): the response re-tokenised as training tokenises it (the sampler keeps no log-probs), its EOS counted
    only when the answer ended with one."""
    examples = tokenize_examples(tokenizer, prompts, responses, max_length=sys.maxsize)
    for example, ended in zip(examples, ended_with_eos):
        if not ended:  # cut at max_new_tokens: the policy did not stop there
            example.labels[-1] = IGNORE_INDEX
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda k: len(examples[k]))  # similar lengths together: little padding
    log_probs = [math.nan] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_sft([examples[k] for k in chunk], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=padding_mask_for_causal(batch["attention_mask"]),
                       use_cache=False).logits  # size = (b, L, V)
        for k, value in zip(chunk, sequence_log_probs(logits.float() / temperature, batch["labels"]).tolist()):
            log_probs[k] = value
    return log_probs


def curve_sizes(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n."""
    return [2 ** i for i in range(n.bit_length()) if 2 ** i < n] + [n]


def best_of_n_metrics(rewards: torch.Tensor, costs: torch.Tensor | None, log_probs: torch.Tensor,
                      text_ids: torch.Tensor, mode: str, threshold: float, lagrange: float) -> dict[str, Any]:
    """The selection's numbers over P answer slots of n candidates each (every tensor (P, n), in draw order): the
    headline ones at n, then the curve over n' ∈ `curve_sizes(n)`, selecting among each slot's first n'."""
    def mean(values: torch.Tensor) -> float:
        return float(values.double().mean())

    def at(size: int) -> dict[str, Any]:
        r, c = rewards[:, :size], costs[:, :size] if costs is not None else None  # size = (P, n')
        chosen, no_feasible = select_best_of_n(r, c, mode, threshold, lagrange)  # size = (P,) each
        kl = best_of_n_kl_estimate(log_probs[:, :size], text_ids[:, :size], r, c, mode, threshold,
                                   lagrange)  # size = (P,)
        return {"mean_reward_chosen": mean(r.gather(1, chosen[:, None])),
                "mean_cost_chosen": mean(c.gather(1, chosen[:, None])) if c is not None else None,
                "feasible_share": 1.0 - mean(no_feasible) if c is not None else None,
                "kl_bound": best_of_n_kl_bound(size), "kl_estimate": mean(kl)}

    n = rewards.size(1)
    distinct = (text_ids[:, :, None] == text_ids[:, None, :]).double()  # size = (P, n, n)
    headline = at(n)
    metrics: dict[str, Any] = {
        "n": n, "mode": mode, "threshold": threshold, "lagrange": lagrange,
        "no_feasible_share": 1.0 - headline["feasible_share"] if costs is not None else None,
        "mean_reward_chosen": headline["mean_reward_chosen"], "mean_reward_candidates": mean(rewards),
        "mean_cost_chosen": headline["mean_cost_chosen"],
        "mean_cost_candidates": mean(costs) if costs is not None else None,
        "mean_distinct_texts": mean((1.0 / distinct.sum(dim=-1)).sum(dim=-1)),  # Σ_k 1/(copies of text k) per slot
        "kl_bound": headline["kl_bound"], "kl_estimate": headline["kl_estimate"],
    }
    for size in curve_sizes(n):
        metrics.update({f"curve/{size}/{key}": value for key, value in (headline if size == n else at(size)).items()})
    return metrics


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def _check(cfg: BestOfNConfig) -> None:
    if not cfg.model:
        raise ConfigError("bon: 'model' is required (a model directory)")
    if cfg.mode not in SELECTION_MODES:
        raise ConfigError(f"bon: mode must be one of {list(SELECTION_MODES)}, got {cfg.mode!r}")
    if not cfg.reward_model:
        raise ConfigError("bon: 'reward_model' is required (a score model directory, e.g. runs/rm/model)")
    if cfg.mode != "reward" and not cfg.cost_model:
        raise ConfigError(f"bon: mode {cfg.mode} needs a 'cost_model' (e.g. runs/cm/model); mode reward needs none")
    for key in ("reward_model", "cost_model"):
        path = getattr(cfg, key)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"bon: {key}: score model directory not found: {path}")
    for key in ("n", "samples_per_prompt", "score_batch_size", "score_max_length"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"bon: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lagrange < 0:
        raise ConfigError(f"bon: lagrange must be >= 0 (a cost's price in reward), got {cfg.lagrange}")


def _sample_candidates(cfg: BestOfNConfig, sampling: SamplingConfig, prompts: list[str],
                       ) -> tuple[list[Sample], list[float]]:
    """samples_per_prompt × n candidates per prompt (prompt-major, slot-major within: candidate k of slot s of prompt p
    is number (p·S + s)·n + k) and each one's log-prob under the sampling distribution."""
    model, tokenizer = load_policy(cfg.model, cfg.tokenizer, cfg.device)
    generated = generate_samples(model, tokenizer, prompts, sampling, batch_size=cfg.batch_size, seed=cfg.seed,
                                 progress=cfg.progress)
    per_prompt = cfg.samples_per_prompt * cfg.n
    texts = [(prompts[i // per_prompt], g.text, g.ended_with_eos) for i, g in enumerate(generated)]
    distinct = list(dict.fromkeys(texts))  # a repeated answer is scored once
    values = response_log_probs(model, tokenizer, [p for p, _, _ in distinct], [r for _, r, _ in distinct],
                                [e for _, _, e in distinct], cfg.temperature, cfg.score_batch_size)
    by_text = dict(zip(distinct, values))
    return generated, [by_text[t] for t in texts]


def run(cfg: BestOfNConfig) -> dict[str, Any]:
    """Sample n candidates per answer slot, score them, choose, judge the chosen answers; write the files, return the
    metrics."""
    _check(cfg)
    sampling = sampling_config("bon", cfg, cfg.samples_per_prompt * cfg.n)
    records = select_prompts(load_prompts(cfg.prompts), cfg.limit, cfg.seed)
    gold = uses_gold(cfg.gold, [r.kind for r in records])
    generated, log_probs = _sample_candidates(cfg, sampling, [r.prompt for r in records])

    n, per_prompt, out = cfg.n, cfg.samples_per_prompt, Path(cfg.output_dir)
    slots = len(records) * per_prompt  # P·S rows of n candidates: candidate i is number i % n of slot i // n
    candidates = [{"prompt": records[i // (per_prompt * n)].prompt, "sample": (i // n) % per_prompt, "candidate": i % n,
                   "response": g.text, "response_tokens": g.num_tokens, "ended_with_eos": g.ended_with_eos,
                   "log_prob": log_probs[i]} for i, g in enumerate(generated)]
    scores = score_samples({"candidates": candidates}, cfg.reward_model, cfg.cost_model, out / SCORE_CACHE,
                           cfg.score_max_length, cfg.score_batch_size, cfg.device)["candidates"]
    rewards = torch.tensor(scores["reward"], dtype=torch.float64).view(slots, n)  # size = (P·S, n)
    costs = torch.tensor(scores["cost"], dtype=torch.float64).view(slots, n) if scores["cost"] is not None else None
    text_index: dict[tuple[str, bool], int] = {}  # the same answer, the same id
    text_ids = torch.tensor([text_index.setdefault((g.text, g.ended_with_eos), len(text_index))
                             for g in generated]).view(slots, n)  # size = (P·S, n)
    chosen, no_feasible = select_best_of_n(rewards, costs, cfg.mode, cfg.threshold, cfg.lagrange)  # size = (P·S,)

    rows = []
    for slot, k in enumerate(chosen.tolist()):
        row = {**sample_row(records[slot // per_prompt], slot % per_prompt, generated[slot * n + k]),
               "candidate": k, "reward": float(rewards[slot, k])}
        if costs is not None:
            row.update(cost=float(costs[slot, k]), no_feasible_candidate=bool(no_feasible[slot]))
        rows.append(row)
    for i, candidate in enumerate(candidates):
        candidate["reward"] = scores["reward"][i]
        if costs is not None:
            candidate["cost"] = scores["cost"][i]
        candidate["chosen"] = i % n == int(chosen[i // n])
    rows, metrics = judge_and_summarise(rows, gold)
    log_probs_by_slot = torch.tensor(log_probs, dtype=torch.float64).view(slots, n)  # size = (P·S, n)
    metrics.update(best_of_n_metrics(rewards, costs, log_probs_by_slot, text_ids, cfg.mode, cfg.threshold,
                                     cfg.lagrange))
    atomic_write_jsonl(out / "candidates.jsonl", candidates)
    write_evaluation(cfg, rows, metrics)
    return metrics
