"""Memory and speed of PPO-Lagrangian per layout (`critic_layout`: full, shared_backbone, lora; and all_lora: LoRA
critics with a LoRA actor, `actor_layout: lora`, whose reference is the same network with the adapter off).

Each layout runs a few PPO-Lag steps of bench_ppo.py's shape (32 prompts × 64 new tokens, one PPO epoch in 2
mini-batches of 16 rows) in a fresh process, from the same models (`bench_ppo.prepare_models`: the preset's
actor and reward/cost score models, seeded), so the `full` layout is the baseline of every ratio. Per layout:
- tensor bytes, counted from the tensors after the last update: the weights of every model (actor, reference,
  reward and cost models, critics; a storage two models share, as a LoRA critic shares its score model's, is
  counted once), of which trained, and the optimizer states (AdamW: exp_avg and exp_avg_sq per trained
  parameter). This is what the layout changes, exactly, whatever else runs on the machine;
- peak RSS of the run's process (`ru_maxrss`: Python, torch, data, models, activations, allocator caches) and
  its growth during training; on CUDA, `torch.cuda.max_memory_allocated` (which is what counts there);
- samples/s over the steady-state steps (rollout start to rollout start, warm-up steps excluded, as in
  bench_ppo.py).

    python bench/bench_ppo_memory.py --preset tiny                # 4 layouts, ~3 min on a busy 2-core CPU
    python bench/bench_ppo_memory.py --preset tiny --mmap-threshold 131072   # peak RSS closer to live tensors
    python bench/bench_ppo_memory.py --preset small               # 2 steps per layout, the first one timed
    python bench/bench_ppo_memory.py --preset tiny,small --count-only   # the tensor columns alone, in seconds
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ppo import NEW_TOKENS, PROMPTS, TRAIN_BATCH, PhaseClock, prepare_models, run_safealign  # noqa: E402
from common import Trial, common_args, precisions, prepare_world, run_in_child, steps_per_preset, work_directory  # noqa: E402

LAYOUTS = {  # name -> the RL config's layout options
    "full": {"critic_layout": "full"},
    "shared_backbone": {"critic_layout": "shared_backbone"},
    "lora": {"critic_layout": "lora"},
    "all_lora": {"critic_layout": "lora", "actor_layout": "lora"},
}
MIB = 2**20


def tensor_bytes(accelerator: Any, models: Any, parts: dict[str, tuple]) -> dict[str, float]:
    """MiB of the weights (trained, frozen incl. buffers) and optimizer states; each storage counted once."""
    import torch

    from safealign.models.lora import AdapterDisabledPolicy
    from safealign.models.score_model import AdapterDisabledScores

    seen: set[tuple[str, int]] = set()

    def size(tensors) -> float:
        total = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        return total / MIB

    reference = models.reference.actor if isinstance(models.reference, AdapterDisabledPolicy) else models.reference
    modules = [accelerator.unwrap_model(models.actor), reference,
               *(m.critic if isinstance(m, AdapterDisabledScores) else m for m in models.score_models.values()),
               *(accelerator.unwrap_model(c) for c in models.critics.values())]
    trained = size(p for m in modules for p in m.parameters() if p.requires_grad)
    frozen = size(t for m in modules for t in (*m.parameters(), *m.buffers()))  # the rest: trained ones are seen
    optimizers = [getattr(optimizer, "optimizer", optimizer) for _, optimizer, _ in parts.values()]
    optimizer = size(t for o in optimizers for state in o.state.values() for t in state.values() if torch.is_tensor(t))
    return {"trained_mib": trained, "weights_mib": trained + frozen, "optimizer_mib": optimizer}


def count_tensors(trial: Trial) -> dict[str, Any]:
    """Worker for --count-only: the loop's models and optimizers for the trial's layout, AdamW's state created by
    one step on zero gradients, counted; no rollout (seconds, for presets too slow to train here)."""
    import torch

    from safealign.algorithms.ppo_lag import PPOLag, PPOLagConfig
    from safealign.models.tokenizer import load_tokenizer
    from safealign.training.common import make_accelerator
    from safealign.training.rl_setup import build_models, prepare_training

    models_dir = Path(trial.work_dir) / "models" / trial.preset
    cfg = PPOLagConfig(output_dir=trial.out_dir, actor_model=str(models_dir / "actor"), reward_model=str(models_dir / "reward"),
                       cost_model=str(models_dir / "cost"), mixed_precision="bf16" if trial.precision == "bf16" else "no",
                       **trial.options["config"])
    accelerator = make_accelerator(cfg)
    algorithm = PPOLag(cfg)
    models = build_models(cfg, algorithm.score_model_paths(), algorithm.critic_paths(), load_tokenizer(cfg.actor_model),
                          accelerator)
    parts = prepare_training(cfg, accelerator, models, total_updates=1)
    for model, optimizer, _ in parts.values():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tensor_bytes(accelerator, models, parts)


def run_trial(trial: Trial) -> dict[str, Any]:
    """Worker: one PPO-Lag run with the trial's critic layout (or only its tensors counted: --count-only)."""
    import torch

    from safealign.training.rl import RLRun

    if trial.options.get("count_only"):
        return count_tensors(trial)

    memory: dict[str, float] = {}
    original = RLRun.update

    def counted(run, *args):
        result = original(run, *args)
        memory.update(tensor_bytes(run.accelerator, run.models, run.parts))
        return result

    RLRun.update = counted
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = PhaseClock()
    extra = run_safealign(trial, Path(trial.work_dir) / "models" / trial.preset, clock)
    if torch.cuda.is_available():
        memory["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB
    return {**clock.measure(trial.warmup), **extra, **memory}


def machine() -> str:
    import platform

    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return (f"{time.strftime('%Y-%m-%d %H:%M')}, {device}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def main() -> None:
    parser = common_args(__doc__.split("\n")[0], steps="tiny=5,small=2", batch_size=PROMPTS, presets="tiny")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="Set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the runs: larger blocks are then always "
                             "returned to the system when freed, so peak RSS follows live tensors (0 = glibc's default).")
    parser.add_argument("--count-only", action="store_true",
                        help="Only build each layout's models and optimizers and count their tensors (no training: seconds).")
    parser.set_defaults(warmup=2, repeats=1)
    args = parser.parse_args()
    if args.mmap_threshold > 0:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # inherited by the runs' processes
    presets = args.preset.split(",")
    steps = steps_per_preset(args.steps, presets)
    if min(steps.values()) < 2:
        raise SystemExit("--steps: at least 2 per preset (a step is timed from its rollout to the next one's)")
    warmup = {p: min(args.warmup, n - 2) for p, n in steps.items()}  # small: 2 steps, the first one timed
    rows = []
    with work_directory(args) as work:
        prepare_world(work, examples=2000, seed=args.seed)
        for preset in presets:
            prepare_models(work, preset, args.seed)
        allocator = f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold > 0 else "glibc's default malloc"
        print(f"machine: {machine()}; {args.threads or 'default'} torch threads per run; {allocator}")
        print(f"at start: {load()}")
        print(f"PPO-Lag, rollout {PROMPTS} prompts x {NEW_TOKENS} new tokens, 1 PPO epoch in mini-batches of {TRAIN_BATCH}; "
              f"steps {steps} (warm-up {warmup} not timed); {args.repeats} round(s), layouts in rotating order")
        for preset in presets:
            for precision in precisions(args):
                results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
                for r in range(args.repeats):
                    names = list(LAYOUTS)
                    for layout in names[r % len(names):] + names[:r % len(names)]:
                        trial = Trial(framework="safealign-ppo_lag", preset=preset, precision=precision, steps=steps[preset],
                                      warmup=warmup[preset], batch_size=PROMPTS, max_length=0, seed=args.seed, work_dir=str(work),
                                      out_dir=str(work / "runs" / f"memory-{preset}-{precision}-{layout}-{r}"),
                                      threads=args.threads, options={"config": LAYOUTS[layout],
                                                                     "count_only": args.count_only})
                        res = run_in_child(__file__, trial)
                        results[layout].append(res)
                        if args.count_only:
                            print(f"  {preset:5s} {precision} {layout:15s}: weights {res['weights_mib']:,.1f} MiB (trained "
                                  f"{res['trained_mib']:,.1f}), optimizer {res['optimizer_mib']:,.1f} MiB", flush=True)
                            continue
                        s = res["seconds"] / res["steps"]
                        print(f"  {preset:5s} {precision} {layout:15s} round {r + 1}/{args.repeats}: {PROMPTS / s:6.2f} samples/s, "
                              f"weights {res['weights_mib']:,.1f} MiB (trained {res['trained_mib']:,.1f}), optimizer "
                              f"{res['optimizer_mib']:,.1f} MiB, peak RSS {res['peak_rss_mib']:,.0f} MiB", flush=True)
                for layout, runs in results.items():
                    median = {k: statistics.median(x[k] for x in runs) for k in
                              ("weights_mib", "trained_mib", "optimizer_mib", "peak_rss_mib", "peak_cuda_mib") if k in runs[0]}
                    if not args.count_only:
                        median["growth_mib"] = statistics.median(x["peak_rss_mib"] - x["rss_before_mib"] for x in runs)
                        median["seconds"] = statistics.median(x["seconds"] / x["steps"] for x in runs)
                    rows.append({"preset": preset, "precision": precision, "layout": layout, **median})
        print(f"at end: {load()}")
    if args.count_only:
        print("\n| preset | layout | weights MiB (trained) | optimizer MiB | weights + optimizer MiB | vs full |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            base = next(b for b in rows if (b["preset"], b["precision"], b["layout"]) == (row["preset"], row["precision"], "full"))
            tensors = row["weights_mib"] + row["optimizer_mib"]
            print(f"| {row['preset']} | {row['layout']} | {row['weights_mib']:,.1f} ({row['trained_mib']:,.1f}) "
                  f"| {row['optimizer_mib']:,.1f} | {tensors:,.1f} | {tensors / (base['weights_mib'] + base['optimizer_mib']):.2f}× |")
        return
    print("\nPPO-Lag per critic layout: tensor MiB counted from the tensors (weights of all models, each storage once; "
          "AdamW states), peak RSS of the run's process; ratios against the full layout of the same preset\n")
    cuda = any("peak_cuda_mib" in row for row in rows)
    print("| preset | layout | samples/s | vs full | weights MiB (trained) | optimizer MiB | weights + optimizer MiB | vs full "
          "| peak RSS MiB | RSS growth in training MiB | vs full |" + (" peak CUDA MiB | vs full |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else ""))
    for row in rows:
        base = next(b for b in rows if (b["preset"], b["precision"], b["layout"]) == (row["preset"], row["precision"], "full"))
        tensors, base_tensors = row["weights_mib"] + row["optimizer_mib"], base["weights_mib"] + base["optimizer_mib"]
        line = (f"| {row['preset']}{'' if row['precision'] == 'fp32' else ' ' + row['precision']} | {row['layout']} "
                f"| {PROMPTS / row['seconds']:.2f} | {base['seconds'] / row['seconds']:.2f}× "
                f"| {row['weights_mib']:,.1f} ({row['trained_mib']:,.1f}) "
                f"| {row['optimizer_mib']:,.1f} | {tensors:,.1f} | {tensors / base_tensors:.2f}× "
                f"| {row['peak_rss_mib']:,.0f} | {row['growth_mib']:,.0f} | {row['peak_rss_mib'] / base['peak_rss_mib']:.2f}× |")
        if cuda:
            line += f" {row['peak_cuda_mib']:,.0f} | {row['peak_cuda_mib'] / base['peak_cuda_mib']:.2f}× |"
        print(line)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from common import worker_main

        worker_main(run_trial)
    else:
        main()
