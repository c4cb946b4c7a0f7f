"""What the benchmarks share: the SafeWorld data and tokenizer, identical batches, the step clock, the
interleaved A/B runner and the result table.

How a benchmark works (`bench_sft.py`, `bench_rm.py`):
- The parent process generates a SafeWorld (`prepare_world`), trains the tokenizer on it and writes both
  to a temporary directory.
- Each measured run is a fresh child process (`python bench_x.py --worker JSON`) that loads them, builds
  the model (same seed, so the same initial weights for safealign and TRL), builds its trainer and trains
  `steps` optimizer steps. A child per run keeps the two frameworks' global state (Accelerate, autocast)
  apart and gives each its own peak RSS.
- Both frameworks see exactly the same batches: safealign's data order for epoch 0 (`batch_order`), fed to
  TRL as a dataset in that order with the sequential sampler.
- `StepClock`, a forward pre-hook on the top-level model, stamps the start of every training forward (one
  per optimizer step: no gradient accumulation). Steps `warmup .. steps-2` are timed start to start, so
  set-up (model build, tokenisation, trainer construction) and the first steps are excluded and
  everything a real step does (collation, forward, backward, clipping, optimizer, logging) is included.
- Runs alternate safealign/TRL (A B, then B A, ...); each number is a median over repeats and the ratio
  is the median of the ratios of adjacent pairs, which cancels slow drift of a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

RESULT_PREFIX = "BENCH_RESULT "


@dataclass
class Trial:
    """One measured run, passed to a worker process as JSON."""

    framework: str  # "safealign" or "trl"
    preset: str  # "tiny" or "small"
    precision: str  # "fp32" or "bf16" (autocast)
    steps: int  # optimizer steps in all, warm-up included
    warmup: int  # first steps left out of the timing
    batch_size: int  # examples (SFT) or pairs (RM) per optimizer step
    max_length: int
    seed: int
    work_dir: str  # holds world/ and tokenizer/
    out_dir: str  # the run directory of this trial
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # benchmark-specific


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------
def prepare_world(work_dir: Path, examples: int, seed: int = 0, vocab_size: int = 2048) -> None:
    """SafeWorld files in work_dir/world (`examples` SFT examples and as many train pairs) and a BPE
    trained on its texts in work_dir/tokenizer: the same world and tokenizer for every benchmark."""
    from safealign.data.safeworld import WorldConfig, generate_world, world_texts, write_world
    from safealign.models.tokenizer import save_tokenizer, train_tokenizer

    world = generate_world(WorldConfig(seed=seed, sft_examples=examples, train_pairs=examples, test_pairs=0))
    write_world(world, work_dir / "world")
    save_tokenizer(train_tokenizer(world_texts(world), vocab_size=vocab_size), work_dir / "tokenizer")


def load_tokenizer(trial: Trial):
    from safealign.models.tokenizer import load_tokenizer as load

    return load(Path(trial.work_dir) / "tokenizer")


def batch_order(num_examples: int, trial: Trial) -> list[int]:
    """Example indices in the order safealign's loop takes them (epoch 0): TRL gets the same batches."""
    from safealign.training.common import epoch_batches

    if trial.steps * trial.batch_size > num_examples:
        raise ValueError(f"{trial.steps} steps of {trial.batch_size} need more than the {num_examples} examples generated")
    batches = epoch_batches(num_examples, 0, trial.seed, trial.batch_size, 1, 1, 0)[: trial.steps]
    return [i for batch in batches for i in batch]


def safealign_options(trial: Trial) -> dict[str, Any]:
    """TrainingConfig fields shared by both benchmarks (no eval, no checkpoints, logging as TRL's)."""
    return dict(
        output_dir=trial.out_dir, seed=trial.seed, max_steps=trial.steps, per_device_train_batch_size=trial.batch_size,
        gradient_accumulation_steps=1, learning_rate=1e-4, weight_decay=0.0, adam_beta2=0.95, lr_scheduler="linear",
        warmup_ratio=0.0, max_grad_norm=1.0, mixed_precision="bf16" if trial.precision == "bf16" else "no",
        logging_steps=10, eval_steps=-1, save_steps=-1, gradient_checkpointing=False, max_length=trial.max_length,
        # Plain shuffling, so TRL can be fed the very same batches (`batch_order`); grouping by length is a
        # data-order choice both sides offer (TRL: train_sampling_strategy="group_by_length").
        length_group_size=1,
    )


def trl_options(trial: Trial) -> dict[str, Any]:
    """TRL config fields matching `safealign_options` (TRL defaults overridden: gradient checkpointing off,
    bf16 only when asked, sequential sampler so that the batches are safealign's)."""
    import torch

    return dict(
        output_dir=trial.out_dir, seed=trial.seed, max_steps=trial.steps, per_device_train_batch_size=trial.batch_size,
        gradient_accumulation_steps=1, learning_rate=1e-4, weight_decay=0.0, adam_beta2=0.95, lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, bf16=trial.precision == "bf16", fp16=False, logging_steps=10,
        eval_strategy="no", save_strategy="no", report_to="none", gradient_checkpointing=False, max_length=trial.max_length,
        train_sampling_strategy="sequential", dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )


def bf16_available() -> bool:
    from safealign.training.common import resolve_mixed_precision

    return resolve_mixed_precision("auto") == "bf16"


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
class StepClock:
    """Forward pre-hook on the top-level model: start time, non-padding tokens and rows of each forward."""

    def __init__(self, model: Any) -> None:
        self.marks: list[tuple[float, float, int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None:
            raise RuntimeError("StepClock needs attention_mask passed as a keyword argument")
        self.marks.append((time.perf_counter(), time.process_time(), int(mask.sum()), mask.size(0)))

    def measure(self, warmup: int) -> dict[str, float]:
        """Wall and CPU seconds, tokens and rows of steps warmup .. n-2 (each timed from its start to the
        next one's). CPU seconds (all threads of the process) are less sensitive to other processes."""
        self.handle.remove()
        if len(self.marks) < warmup + 2:
            raise RuntimeError(f"{len(self.marks)} training forwards; need at least warmup + 2 = {warmup + 2}")
        timed = self.marks[warmup:-1]
        return {"steps": len(timed), "seconds": self.marks[-1][0] - self.marks[warmup][0],
                "cpu_seconds": self.marks[-1][1] - self.marks[warmup][1],
                "tokens": sum(m[2] for m in timed), "rows": sum(m[3] for m in timed)}


def recording_first_loss(base: type, method: str, store: list[float], count: int = 1) -> type:
    """A subclass of `base` whose `method` (a Step's `loss`, a Trainer's `compute_loss`) appends the first
    `count` losses it returns to `store`: with the same weights, batches and labels both frameworks must agree
    on them."""

    def wrapped(self, *args, **kwargs):
        out = getattr(super(subclass, self), method)(*args, **kwargs)
        if len(store) < count:
            store.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    subclass = type(f"FirstLoss{base.__name__}", (base,), {method: wrapped})
    return subclass


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(run_trial: Callable[[Trial], dict[str, Any]]) -> None:
    """Child side: run the trial named in argv and print its result as one JSON line."""
    trial = Trial(**json.loads(sys.argv[sys.argv.index("--worker") + 1]))
    if trial.threads > 0:
        import torch

        torch.set_num_threads(trial.threads)
    result = run_trial(trial)
    result["peak_rss_mib"] = peak_rss_mib()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # on a GPU the memory that counts is the device's
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_in_child(script: str, trial: Trial, timeout: float = 1800) -> dict[str, Any]:
    """Run one trial in a fresh Python process; return its result."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if trial.threads > 0:
        env["OMP_NUM_THREADS"] = str(trial.threads)
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(dataclasses.asdict(trial))],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{trial.framework} {trial.preset} {trial.precision} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# --------------------------------------------------------------------------------------------------
# The A/B runner and the table
# --------------------------------------------------------------------------------------------------
def common_args(description: str, steps: str, batch_size: int | str, presets: str) -> argparse.ArgumentParser:
    """The options every benchmark takes. A `batch_size` given as a string ("tiny=16,small=8") makes --batch-size
    per preset too, read with `steps_per_preset` as --steps is."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default=presets, help="Comma-separated model presets (tiny, small).")
    parser.add_argument("--steps", default=steps,
                        help="Optimizer steps per run, warm-up included: one number, or preset=N pairs (tiny=40,small=8).")
    parser.add_argument("--warmup", type=int, default=2, help="First steps left out of the timing.")
    parser.add_argument("--batch-size", type=type(batch_size), default=batch_size,
                        help="Examples (SFT) or pairs (RM, DPO) per optimizer step"
                             + (": one number, or preset=N pairs." if isinstance(batch_size, str) else "."))
    parser.add_argument("--max-length", type=int, default=256, help="Tokens per sequence at most.")
    parser.add_argument("--bf16", action="store_true", help="Also run with bf16 autocast (when the CPU/GPU runs it fast).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each framework per configuration (interleaved).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (0 = torch's default). 1 by default: on a busy shared 2-core machine "
                             "two OpenMP threads per run spin-wait for each other, several times slower and noisier.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="", help="Where data and run directories go ('' = a temporary directory).")
    return parser


def steps_per_preset(value: str, presets: list[str]) -> dict[str, int]:
    if "=" not in value:
        return {p: int(value) for p in presets}
    given = dict(item.split("=") for item in value.split(","))
    missing = [p for p in presets if p not in given]
    if missing:
        raise SystemExit(f"--steps gives no number for {missing}")
    return {p: int(given[p]) for p in presets}


def precisions(args: argparse.Namespace) -> list[str]:
    if args.bf16 and not bf16_available():
        print("note: bf16 autocast is not fast on this machine (no avx512_bf16/AMX/CUDA bf16): fp32 only")
    return ["fp32", "bf16"] if args.bf16 and bf16_available() else ["fp32"]


def run_interleaved(script: str, configs: list[Trial], repeats: int, item: str,
                    rows_per_item: int = 1, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """For each configuration, run safealign and TRL alternately `repeats` times; return the table rows.
    An item (example, pair) is `rows_per_item` rows of the model's batch. `extra`: further result keys whose
    medians go into the rows (`first_losses` too, when the runs report them)."""
    rows = []
    for base in configs:
        results: dict[str, list[dict]] = {"safealign": [], "trl": []}
        for r in range(repeats):
            order = ("safealign", "trl") if r % 2 == 0 else ("trl", "safealign")
            for framework in order:
                trial = dataclasses.replace(base, framework=framework, out_dir=f"{base.out_dir}/{framework}-{r}")
                result = run_in_child(script, trial)
                results[framework].append(result)
                seconds, steps = result["seconds"], result["steps"]
                print(f"  {base.preset:5s} {base.precision} {framework:9s} run {r + 1}/{repeats}: "
                      f"{result['tokens'] / seconds:8.0f} tokens/s  "
                      f"{result['rows'] / rows_per_item / seconds:7.1f} {item}/s  "
                      f"{seconds / steps:.3f} s/step  ({result['cpu_seconds'] / steps:.3f} CPU s/step)", flush=True)
        pairs = list(zip(results["safealign"], results["trl"]))  # the same batches: a time ratio is a speed ratio
        for framework, runs in results.items():
            rows.append({
                "preset": base.preset, "precision": base.precision, "framework": framework,
                "tokens_per_s": statistics.median(x["tokens"] / x["seconds"] for x in runs),
                "per_s": statistics.median(x["rows"] / rows_per_item / x["seconds"] for x in runs),
                "s_per_step": statistics.median(x["seconds"] / x["steps"] for x in runs),
                "cpu_s_per_step": statistics.median(x["cpu_seconds"] / x["steps"] for x in runs),
                "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in runs),
                "train_rss_mib": statistics.median(x["peak_rss_mib"] - x["rss_before_mib"] for x in runs),
                "first_loss": runs[0]["first_loss"],
                **({"first_losses": runs[0]["first_losses"]} if "first_losses" in runs[0] else {}),
                **{key: statistics.median(x[key] for x in runs) for key in extra},
                "ratio": (statistics.median(b["seconds"] / a["seconds"] for a, b in pairs)
                          if framework == "safealign" else None),
                "cpu_ratio": (statistics.median(b["cpu_seconds"] / a["cpu_seconds"] for a, b in pairs)
                              if framework == "safealign" else None),
            })
    return rows


def print_table(rows: list[dict[str, Any]], item: str, title: str) -> None:
    """Markdown table; the ratios are speed ratios (> 1: safealign faster), medians of adjacent A/B pairs."""
    header = (f"| preset | precision | framework | tokens/s | {item}/s | s/step | CPU s/step | peak RSS MiB "
              f"| RSS growth in training MiB | step-1 loss | speed safealign/TRL (wall) | (CPU time) |")
    print(f"\n{title}\n")
    print(header)
    print("|" + "---|" * (header.count(" | ") + 1))
    for row in rows:
        ratio = f"**{row['ratio']:.2f}×**" if row["ratio"] is not None else ""
        cpu_ratio = f"{row['cpu_ratio']:.2f}×" if row["cpu_ratio"] is not None else ""
        print(f"| {row['preset']} | {row['precision']} | {row['framework']} | {row['tokens_per_s']:,.0f} "
              f"| {row['per_s']:,.1f} | {row['s_per_step']:.3f} | {row['cpu_s_per_step']:.3f} | {row['peak_rss_mib']:,.0f} "
              f"| {row['train_rss_mib']:,.0f} | {row['first_loss']:.4f} | {ratio} | {cpu_ratio} |")


@contextlib.contextmanager
def work_directory(args: argparse.Namespace) -> Iterator[Path]:
    """args.work_dir (kept), else a temporary directory removed at the end."""
    if args.work_dir:
        path = Path(args.work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="safealign-bench-") as tmp:
            yield Path(tmp)


def machine_line(threads: int) -> str:
    import platform

    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({threads or torch.get_num_threads()} threads per run), "
            f"bf16 autocast {'fast' if bf16_available() else 'slow (skipped)'}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}")
