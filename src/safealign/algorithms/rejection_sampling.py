"""Rejection-sampling fine-tuning (RS-FT; Llama 2, Touvron et al. 2023, §3.2.3), with an optional safety gate.

    safealign rsft --model runs/sft/model --reward_model runs/rm/model --cost_model runs/cm/model \
        --prompts runs/world/prompts/train.jsonl --mode safe

    archive = {}
    for t = 1 .. rounds:
        (r, c) = round t's reward and cost models (`round_reward_models[t]`, `round_cost_models[t]`; by default the same
                 `reward_model` and `cost_model` every round); when they changed, the archive is re-scored by them
        for each of `num_prompts` prompts x (the same seeded set every round):
            y_1 .. y_k ~ π_{t−1}(·|x), scored by r and c
            y* = the best of them (`best_of_n.select_best_of_n`: by r; or `safe`: by r among c ≤ d, else the lowest c)
            archive[x] = y* if y* ranks above archive[x] in the same order      (the best of every round so far)
        π_t = SFT of π_{t−1} on the archive (in `safe` mode without the prompts that never had a candidate c ≤ d)

Keeping the best of all rounds, not only the last round's, is Llama 2's fix for the regression it saw when each
round trained on its own samples only. A prompt whose k candidates are all over the bound is logged
(`no_safe_share`): those prompts need red-teaming data, not more samples.

Llama 2 retrained its reward models between its rounds of rejection sampling. In the pipeline RS-FT runs on Safe
RLHF's round engine: with more than one Safe RLHF round, RS-FT round t ranks its candidates with round t's reward and
cost models (retrained on the pairs the red-teaming of round t gathered), given here as `round_reward_models` and
`round_cost_models`. Scores of two models are not comparable, so the archive's answers are re-scored whenever the
round's models differ from the previous round's. Round t lives in output_dir/round-{t}
(data.jsonl, then a whole `sft` run); rounds.json logs each round; the last policy is output_dir/model. A restarted
run continues after the last finished round.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from safealign.algorithms import sft
from safealign.algorithms.best_of_n import SelectionMode, select_best_of_n, selection_keys
from safealign.config import ConfigError, config_field, save_config
from safealign.data.loading import load_prompts
from safealign.io import atomic_path, atomic_write_json, atomic_write_jsonl
from safealign.models.generation import SamplingConfig, sample_responses
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.run_directory import read_json_or_none


@dataclass
class RSFTConfig(sft.SFTConfig):
    """RS-FT from a trained policy: sample k, keep the best (safe-gated), fine-tune on the best so far; `rounds` times."""

    output_dir: str = config_field("runs/rsft", help="Run directory: round-{t}/ (data.jsonl and an sft run each), rounds.json, model/ (the last policy).")
    model: str = config_field("runs/sft/model", help="The policy to start from (the SFT model).")
    learning_rate: float = config_field(1e-4, help="Peak learning rate of each round's fine-tuning (of a trained policy: below SFT's from-scratch 1e-3).")
    num_epochs: float = config_field(1.0, help="Passes over the archive in each round's fine-tuning.")
    reward_model: str = config_field("runs/rm/model", help="The reward model that ranks the candidates.")
    cost_model: str = config_field("", help="The cost model of the safety gate (mode safe); '' with mode reward.")
    prompts: str = config_field("", help="Prompt file (or a preference/SFT file's prompts) to sample from.")
    num_prompts: int = config_field(512, help="Prompts per round (one seeded set, the same every round).")
    k: int = config_field(4, help="Candidates sampled per prompt and round.")
    mode: SelectionMode = config_field("safe", help="reward: the highest reward; safe: the highest reward among costs <= threshold (Llama 2's safety gate, as a cost bound).")
    threshold: float = config_field(0.0, help="safe: d, the bound on a kept answer's cost (cost model units; 0 = its safe/unsafe boundary).")
    rounds: int = config_field(3, help="Sampling and fine-tuning rounds.")
    max_new_tokens: int = config_field(64, help="Most tokens per sampled answer.")
    temperature: float = config_field(1.0, help="Sampling temperature (Llama 2 re-tuned it per round; 1 samples the policy itself).")
    round_reward_models: list[str] = config_field(
        [], help="Round t's reward model, round 1 first, one per round (the pipeline passes its Safe RLHF rounds' "
                 "retrained models); [] = reward_model every round.")
    round_cost_models: list[str] = config_field(
        [], help="Round t's cost model, round 1 first, one per round; [] = cost_model every round.")
    generation_batch_size: int = config_field(64, help="Answers per generation batch.")
    score_batch_size: int = config_field(64, help="Texts per forward of the reward and cost models.")

    def __post_init__(self) -> None:
        if self.mode not in ("reward", "safe"):
            raise ConfigError(f"rsft: mode must be reward or safe, got {self.mode!r}")
        if self.mode == "safe" and not self.cost_model:
            raise ConfigError("rsft: mode safe needs cost_model (the safety gate)")
        if self.rounds < 1 or self.k < 1 or self.num_prompts < 1:
            raise ConfigError("rsft: rounds, k and num_prompts must be >= 1")
        for key in ("round_reward_models", "round_cost_models"):
            given = getattr(self, key)
            if given and len(given) != self.rounds:
                raise ConfigError(f"rsft: {key} lists {len(given)} models for {self.rounds} rounds (one per round, or [])")
        if self.round_cost_models and not self.cost_model:
            raise ConfigError("rsft: round_cost_models without cost_model (set cost_model to round 1's)")


def round_models(cfg: RSFTConfig, t: int) -> tuple[str, str]:
    """Round t's (reward model, cost model) paths; the cost model is '' without one."""
    reward = cfg.round_reward_models[t - 1] if cfg.round_reward_models else cfg.reward_model
    cost = cfg.round_cost_models[t - 1] if cfg.round_cost_models else cfg.cost_model
    return reward, cost


def rank_key(reward: float, cost: float | None, cfg: RSFTConfig) -> tuple[float, float]:
    """An answer's place in the selection order (higher is better), comparable across rounds."""
    tier, value = selection_keys(torch.tensor([[reward]]), None if cost is None else torch.tensor([[cost]]), cfg.mode,
                                 cfg.threshold)
    return float(tier.item()), float(value.item())


def score(cfg: RSFTConfig, model_dir: str, prompts: list[str], answers: list[str]) -> list[float]:
    """One score per (prompt, answer) by the reward or cost model in model_dir."""
    return score_texts(load_score_model(model_dir), load_tokenizer(model_dir), prompts, answers, cfg.max_length,
                       cfg.score_batch_size)


def sample_round(cfg: RSFTConfig, policy_dir: str, prompts: list[str], round_: int) -> list[dict[str, Any]]:
    """Each prompt's best of k answers from the policy, by round `round_`'s models:
    {prompt, response, reward, cost, no_safe_candidate}."""
    reward_model, cost_model = round_models(cfg, round_)
    tokenizer = load_tokenizer(policy_dir)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, num_samples=cfg.k)
    answers = sample_responses(build_causal_lm(policy_dir).eval(), tokenizer, prompts, sampling, cfg.generation_batch_size,
                               cfg.seed + round_)  # prompt-major: answer i is prompt i // k's
    repeated = [p for p in prompts for _ in range(cfg.k)]
    rewards = torch.tensor(score(cfg, reward_model, repeated, answers)).view(len(prompts), cfg.k)
    costs = torch.tensor(score(cfg, cost_model, repeated, answers)).view(len(prompts), cfg.k) if cost_model else None
    chosen, no_safe = select_best_of_n(rewards, costs, cfg.mode, cfg.threshold)  # size = (P,) each
    return [{"prompt": p, "response": answers[i * cfg.k + j], "reward": rewards[i, j].item(),
             "cost": None if costs is None else costs[i, j].item(), "no_safe_candidate": bool(no_safe[i])}
            for i, (p, j) in enumerate(zip(prompts, chosen.tolist()))]


def rescore_archive(archive: dict[str, dict[str, Any]], cfg: RSFTConfig, round_: int) -> None:
    """Score the archive's answers again by round `round_`'s models (another model's scores do not compare)."""
    if not archive:
        return
    reward_model, cost_model = round_models(cfg, round_)
    rows = list(archive.values())
    prompts, answers = [r["prompt"] for r in rows], [r["response"] for r in rows]
    rewards = score(cfg, reward_model, prompts, answers)
    costs = score(cfg, cost_model, prompts, answers) if cost_model else [None] * len(rows)
    for row, reward, cost in zip(rows, rewards, costs):
        row["reward"], row["cost"] = reward, cost


def update_archive(archive: dict[str, dict[str, Any]], best: list[dict[str, Any]], cfg: RSFTConfig) -> int:
    """Keep each prompt's best non-empty answer over the rounds; returns how many prompts this round improved."""
    improved = 0
    for row in best:
        if not row["response"].strip():  # an empty answer is no example to learn from, whatever its scores
            continue
        kept = archive.get(row["prompt"])
        if kept is None or rank_key(row["reward"], row["cost"], cfg) > rank_key(kept["reward"], kept["cost"], cfg):
            archive[row["prompt"]] = row
            improved += 1
    return improved


def training_rows(archive: dict[str, dict[str, Any]], cfg: RSFTConfig) -> list[dict[str, Any]]:
    """The archive as SFT rows; in safe mode only answers within the cost bound (never train on an unsafe best)."""
    return [{"prompt": row["prompt"], "response": row["response"]} for row in archive.values()
            if cfg.mode == "reward" or row["cost"] <= cfg.threshold]


def run(cfg: RSFTConfig) -> dict[str, Any]:
    """The rounds; returns the last round's SFT metrics with each round's selection statistics."""
    if not cfg.prompts:
        raise ConfigError("rsft: prompts is required (a prompt file to sample from)")
    if cfg.train_data or cfg.eval_data:  # inherited from sft: each round's data is the policy's own kept answers
        raise ConfigError("rsft: train_data and eval_data are not read (each round trains on the kept answers); give prompts")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    records = load_prompts(cfg.prompts)
    prompts = [r.prompt for r in random.Random(cfg.seed).sample(records, min(cfg.num_prompts, len(records)))]
    log: list[dict[str, Any]] = read_json_or_none(out / "rounds.json") or []
    archive: dict[str, dict[str, Any]] = {}  # prompt -> its best answer so far (rows of sample_round)
    if log and (out / "archive.jsonl").is_file():
        for line in (out / "archive.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            archive[row["prompt"]] = row
    policy, metrics = cfg.model, {}
    for t in range(1, cfg.rounds + 1):
        round_dir = out / f"round-{t}"
        if t <= len(log):  # finished before a restart
            policy = str(round_dir / "model")
            continue
        rescored = t > 1 and round_models(cfg, t) != round_models(cfg, t - 1)
        if rescored:
            rescore_archive(archive, cfg, t)
        best = sample_round(cfg, policy, prompts, t)
        improved = update_archive(archive, best, cfg)
        rows = training_rows(archive, cfg)
        if not rows:
            raise ConfigError(f"rsft: round {t} kept no answer within the cost bound {cfg.threshold}: nothing to train on")
        atomic_write_jsonl(round_dir / "data.jsonl", rows)
        metrics = sft.run(replace(cfg, model=policy, train_data=str(round_dir / "data.jsonl"), eval_data="",
                                  eval_fraction=0.0, tokenizer="", output_dir=str(round_dir)))
        policy = str(round_dir / "model")
        log.append({"round": t, "no_safe_share": statistics.fmean(r["no_safe_candidate"] for r in best),
                    "chosen_reward": statistics.fmean(r["reward"] for r in best),
                    **({"chosen_cost": statistics.fmean(r["cost"] for r in best)} if cfg.cost_model else {}),
                    "improved_prompts": improved, "training_rows": len(rows), "archive_rescored": float(rescored)})
        atomic_write_jsonl(out / "archive.jsonl", list(archive.values()))
        atomic_write_json(out / "rounds.json", log)
    with atomic_path(out / "model") as tmp:
        shutil.copytree(Path(policy), tmp)
    result = {**(metrics or read_json_or_none(out / f"round-{cfg.rounds}" / "metrics.json") or {}),
              **{f"round{e['round']}/{k}": v for e in log for k, v in e.items() if k != "round"}}
    atomic_write_json(out / "metrics.json", result)
    return result
