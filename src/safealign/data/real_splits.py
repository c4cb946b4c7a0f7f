"""`safealign real-prompts`: training and held-out prompt files from the real benchmarks (`real_benchmarks`).

Harmful prompts are split *across* benchmarks: training samples AdvBench, the held-out set HarmBench and
Do-Not-Answer (by default), so no test prompt is a rewording the policy was trained on; the edgy (borderline) and
benign sets have one source each and are split in two disjoint halves by `seed`. Then every training prompt whose
word-3-gram Jaccard similarity to a held-out prompt reaches `near_duplicate_threshold` is left out of training
(AdvBench and HarmBench overlap in spirit), and the dropped pairs are listed in metrics.json.

Output (`output_dir`): train.jsonl and test.jsonl (prompt rows: prompt, kind, category, benchmark, id), metrics.json
(counts per benchmark and split, the near-duplicates dropped).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safealign.config import ConfigError, config_field, save_config
from safealign.data.real_benchmarks import BENCHMARKS, BenchmarkPrompt, load_benchmark, near_duplicates
from safealign.io import atomic_write_json, atomic_write_jsonl

HARMFUL_BENCHMARKS = ("harmbench", "advbench", "donotanswer")


@dataclass
class RealPromptsConfig:
    """Split the real prompt sets into training and held-out prompt files."""

    output_dir: str = config_field("runs/real-prompts", help="Where train.jsonl, test.jsonl and metrics.json go.")
    train_harmful: list[str] = config_field(["advbench"], help="Harmful benchmarks of the training prompts.")
    test_harmful: list[str] = config_field(["harmbench", "donotanswer"], help="Harmful benchmarks of the held-out prompts (none of train_harmful).")
    train_per_benchmark: int = config_field(64, help="Training prompts per harmful benchmark (a seeded subset; 0 = all).")
    test_per_benchmark: int = config_field(40, help="Held-out prompts per harmful benchmark, and of edgy and benign (0 = all; benign needs one).")
    train_edgy: int = config_field(16, help="Borderline (edgy) training prompts, from the half of the 150 the held-out set does not use.")
    train_benign: int = config_field(16, help="Benign (ShareGPT) training prompts, disjoint from the held-out ones.")
    near_duplicate_threshold: float = config_field(0.5, help="Training prompts this similar (word 3-gram Jaccard) to a held-out one are left out.")
    seed: int = config_field(0, help="Seed of the subsets and of the edgy/benign halves.")

    def __post_init__(self) -> None:
        for key in ("train_harmful", "test_harmful"):
            unknown = [b for b in getattr(self, key) if b not in HARMFUL_BENCHMARKS]
            if unknown:
                raise ConfigError(f"real-prompts: {key} {unknown}: choose from {list(HARMFUL_BENCHMARKS)}")
        shared = set(self.train_harmful) & set(self.test_harmful)
        if shared:
            raise ConfigError(f"real-prompts: {sorted(shared)} in both train_harmful and test_harmful: the held-out "
                              "prompts must come from other benchmarks")
        if self.test_per_benchmark <= 0:
            raise ConfigError("real-prompts: test_per_benchmark must be > 0 (the benign set holds thousands)")


def _subset(prompts: list[BenchmarkPrompt], count: int, rng: random.Random) -> list[BenchmarkPrompt]:
    """A seeded subset of `count` (all when 0 or more than there are), in the file's order."""
    if count <= 0 or count >= len(prompts):
        return list(prompts)
    return [prompts[i] for i in sorted(rng.sample(range(len(prompts)), count))]


def _halves(prompts: list[BenchmarkPrompt], rng: random.Random) -> tuple[list[BenchmarkPrompt], list[BenchmarkPrompt]]:
    """Two disjoint seeded halves (held-out first), each in the file's order."""
    order = list(range(len(prompts)))
    rng.shuffle(order)
    half = len(order) // 2
    return [prompts[i] for i in sorted(order[:half])], [prompts[i] for i in sorted(order[half:])]


def split_prompts(cfg: RealPromptsConfig) -> tuple[list[BenchmarkPrompt], list[BenchmarkPrompt], list[dict[str, Any]]]:
    """(training prompts, held-out prompts, the near-duplicates left out of training)."""
    rng = random.Random(cfg.seed)
    test = [p for name in cfg.test_harmful for p in _subset(load_benchmark(name), cfg.test_per_benchmark, rng)]
    train = [p for name in cfg.train_harmful for p in _subset(load_benchmark(name), cfg.train_per_benchmark, rng)]
    edgy_test, edgy_train = _halves(load_benchmark("edgy"), rng)
    test += _subset(edgy_test, cfg.test_per_benchmark, rng)
    train += _subset(edgy_train, cfg.train_edgy, rng)
    # benign: enough of the file's first usable requests for both halves, then the halves
    benign_test, benign_train = _halves(load_benchmark("benign", limit=2 * (cfg.test_per_benchmark + cfg.train_benign)), rng)
    test += _subset(benign_test, cfg.test_per_benchmark, rng)
    train += _subset(benign_train, cfg.train_benign, rng)
    pairs = near_duplicates([p.prompt for p in train], [p.prompt for p in test], cfg.near_duplicate_threshold)
    dropped = sorted({i for i, _, _ in pairs})
    kept = [p for i, p in enumerate(train) if i not in set(dropped)]
    listed = [{"train": train[i].id, "test": test[j].id, "similarity": round(s, 3), "train_prompt": train[i].prompt,
               "test_prompt": test[j].prompt} for i, j, s in pairs]
    return kept, test, listed


def _rows(prompts: list[BenchmarkPrompt]) -> list[dict[str, Any]]:
    return [{"prompt": p.prompt, "kind": p.kind, "category": p.category, "benchmark": p.benchmark, "id": p.id}
            for p in prompts]


def _counts(prompts: list[BenchmarkPrompt]) -> dict[str, int]:
    return {name: n for name in BENCHMARKS if (n := sum(p.benchmark == name for p in prompts))}


def run(cfg: RealPromptsConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    train, test, dropped = split_prompts(cfg)
    atomic_write_jsonl(out / "train.jsonl", _rows(train))
    atomic_write_jsonl(out / "test.jsonl", _rows(test))
    metrics = {"train": len(train), "test": len(test), "train_per_benchmark": _counts(train),
               "test_per_benchmark": _counts(test), "near_duplicates_dropped": len({d["train"] for d in dropped}),
               "near_duplicates": dropped}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
