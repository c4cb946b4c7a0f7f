"""The pipeline over several seeds, then one summary: `safealign seeds`.

    safealign seeds --config configs/pipeline.yaml --output_dir runs/seeds --seeds "[0, 1, 2, 3]" [--jobs 4]

(Name the output_dir: configs/pipeline.yaml sets its own, runs/demo, which would put the seeds inside the demo run.)

Every key of `safealign pipeline` is accepted (same YAML); `seed` is replaced by `seeds`. Seed S runs as its own
`safealign pipeline` process into `output_dir/seed-S/` (its config in `output_dir/seed-S.yaml`, its output in
`seed-S/pipeline.log` and, when one job runs at a time, on the terminal), `jobs` of them at a time; `safealign aggregate` then summarises the
runs into `output_dir/seeds.{html,md,json}` (claims counted over runs, every number as mean ± std and range).

Why processes: each pipeline owns its Accelerate state, threads and memory, a seed that crashes does not take the
others down, and several small runs share one GPU well (eight tiny-preset pipelines at once on one H100 took
6.5 minutes, docs/results.md). On a machine with several GPUs the jobs take one GPU each in turn; on a CPU they
split its cores (each gets cpu_count / jobs threads), so `jobs: 1` is as fast there. Reproducibility: a seed's run
is repeatable on the same device and thread count; another thread count (what `jobs` > 1 sets on a CPU) or another
GPU changes float summation order, and training amplifies that into different numbers (docs/results.md saw one
such change move SFT's harmful rate by 5 points), so compare runs made the same way. Re-running the same command
resumes: a seed whose pipeline finished with the same settings is not started again, the others skip their
finished stages. A seed that fails is reported with its log, the others are
still summarised, and the command exits non-zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from safealign.config import ConfigError, StageFailed, changed_settings, config_field, save_config
from safealign.console import stderr_console
from safealign.evaluation.aggregate import AggregateConfig
from safealign.evaluation.aggregate import run as aggregate
from safealign.pipeline.config import PipelineConfig
from safealign.pipeline.runner import check_config

console = stderr_console()


@dataclass
class SeedsConfig(PipelineConfig):
    output_dir: str = config_field("runs/seeds", help="Parent directory: seed S runs into output_dir/seed-S/, the summary goes here.")
    seed: int = config_field(0, help="Not used: `seeds` gives each run its seed (the key stays so that a pipeline YAML loads as it is).")
    seeds: list[int] = config_field([0, 1, 2], help="Seeds to run the pipeline with (each replaces the pipeline's `seed`).")
    jobs: int = config_field(1, help="Pipelines running at once (several small runs share a GPU well; on a CPU they split its cores).")
    harmful_target: float = config_field(0.03, help="Summary claim: harmful rate after the last round ≤ this.")
    over_refusal_margin: float = config_field(0.02, help="Summary claim: over-refusal after the last round ≤ SFT's + this.")


SEEDS_ONLY = ("seeds", "jobs", "harmful_target", "over_refusal_margin")


def seed_dir(cfg: SeedsConfig, seed: int) -> Path:
    return Path(cfg.output_dir) / f"seed-{seed}"


def pipeline_config(cfg: SeedsConfig, seed: int) -> PipelineConfig:
    """The pipeline run of one seed: every pipeline key of cfg, with that seed and its own directory."""
    values = {k: v for k, v in asdict(cfg).items() if k not in SEEDS_ONLY}
    return PipelineConfig(**{**values, "seed": seed, "output_dir": str(seed_dir(cfg, seed))})


def child_env(environ: dict[str, str], jobs: int, slot: int, num_gpus: int, num_cpus: int) -> dict[str, str]:
    """The environment of the pipeline in job slot `slot` (0 .. jobs-1) of `jobs` running at once.

    Several jobs share the CPU cores (torch's threads: num_cpus // jobs each) and, on a machine with several GPUs,
    take one GPU each in turn (CUDA_VISIBLE_DEVICES = slot mod num_gpus); settings the user made are kept."""
    env = dict(environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, num_cpus // jobs))
    if jobs > 1 and num_gpus > 1 and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % num_gpus)
    return env


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _copy_output(stream: IO[bytes], log_path: Path, echo: bool) -> None:
    """Append a child's output to its log as it comes (and to this terminal when `echo`)."""
    with open(log_path, "ab") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if echo:
                sys.stderr.write(line.decode("utf-8", errors="replace"))
                sys.stderr.flush()
    stream.close()


def _finished_before(cfg: SeedsConfig, seed: int) -> bool:
    """Seed's pipeline ran to its end (progress.json) with exactly the settings it would get now (config.yaml)."""
    out = seed_dir(cfg, seed)
    try:
        progress = json.loads((out / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "finished_utc" in progress and changed_settings(
        pipeline_config(cfg, seed), out / "config.yaml", ignore=("parallel_baselines",)) == []  # one lane or two: the same results


def _current_stage(run_dir: Path) -> str | None:
    """'rm (5/26)' from a running pipeline's progress.json; None before its first stage or when unreadable."""
    try:
        progress = json.loads((run_dir / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not progress.get("stage"):
        return None
    return f"{progress['stage']} ({progress['number']}/{progress['stages']})"


def run(cfg: SeedsConfig) -> dict[str, Any]:
    _check(cfg)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    finished = _run_pipelines(cfg)
    metrics: dict[str, Any] = {f"seed-{s}/time_s": finished[s]["time_s"] for s in cfg.seeds}
    summarised = [s for s in cfg.seeds if (seed_dir(cfg, s) / "policies.json").is_file()]  # a failed seed's done stages count
    if summarised:
        metrics.update(aggregate(AggregateConfig(
            run_dirs=[str(seed_dir(cfg, s)) for s in summarised], output_dir=str(root),
            harmful_target=cfg.harmful_target, over_refusal_margin=cfg.over_refusal_margin)))
    failed = [s for s in cfg.seeds if finished[s]["returncode"] != 0]
    if failed:
        logs = ", ".join(f"seed {s}: {seed_dir(cfg, s) / 'pipeline.log'}" for s in failed)
        summary = f"the stages that finished are summarised in {root / 'seeds.html'}" if summarised else "nothing to summarise"
        raise StageFailed(f"{len(failed)} of {len(cfg.seeds)} pipelines failed ({logs}); {summary}. "
                          "Re-run the same command to resume them.")
    return metrics


def _check(cfg: SeedsConfig) -> None:
    """Everything that can be wrong before a process starts (the pipeline's own checks included)."""
    if not cfg.seeds:
        raise ConfigError("seeds: give at least one seed, e.g. --seeds \"[0, 1, 2]\"")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds: each seed once, got {cfg.seeds}")
    if cfg.jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {cfg.jobs}")
    for key in ("harmful_target", "over_refusal_margin"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"{key} is a rate in [0, 1] (0.03 = 3%), got {getattr(cfg, key)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("safealign seeds starts its own pipeline processes: run it without accelerate launch / torchrun")
    check_config(pipeline_config(cfg, cfg.seeds[0]))  # a bad stage name or setting fails here, not in every process


def _run_pipelines(cfg: SeedsConfig) -> dict[int, dict[str, Any]]:
    """Run one pipeline process per seed, `cfg.jobs` at a time; {seed: {returncode, time_s}}."""
    pending = list(cfg.seeds)
    running: dict[int, tuple[subprocess.Popen, float, threading.Thread, int]] = {}  # seed: process, start, pump, slot
    finished: dict[int, dict[str, Any]] = {}
    num_gpus = _num_gpus() if cfg.jobs > 1 else 0
    shown: dict[int, str] = {}  # the stage last shown per running seed
    for seed in list(pending):
        if _finished_before(cfg, seed):
            pending.remove(seed)
            finished[seed] = {"returncode": 0, "time_s": 0.0}
            console.print(f"seed {seed}: finished before with these settings ({seed_dir(cfg, seed)}): not run again",
                          highlight=False)
    while pending or running:
        while pending and len(running) < cfg.jobs:
            seed = pending.pop(0)
            slot = min(set(range(cfg.jobs)) - {job[3] for job in running.values()})
            out = seed_dir(cfg, seed)
            out.mkdir(parents=True, exist_ok=True)
            # The request goes next to the runs: the pipeline compares it with the config.yaml of its earlier start.
            request = Path(cfg.output_dir) / f"seed-{seed}.yaml"
            save_config(pipeline_config(cfg, seed), request)
            command = [sys.executable, "-m", "safealign.cli", "pipeline", "--config", str(request)]
            env = child_env(dict(os.environ), cfg.jobs, slot, num_gpus, os.cpu_count() or 1)
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            # One job at a time: its output also goes to the terminal (stages, progress); several: to their logs only.
            pump = threading.Thread(target=_copy_output, args=(process.stdout, out / "pipeline.log", cfg.jobs == 1), daemon=True)
            pump.start()
            running[seed] = (process, time.monotonic(), pump, slot)
            gpu = f", GPU {env['CUDA_VISIBLE_DEVICES']}" if num_gpus > 1 and "CUDA_VISIBLE_DEVICES" in env else ""
            console.print(f"seed {seed}: started ({out}{gpu}, log: {out / 'pipeline.log'})", highlight=False)
        time.sleep(0.2)
        if cfg.jobs > 1:  # several jobs: a line when a pipeline starts a stage
            for seed in running:
                stage = _current_stage(seed_dir(cfg, seed))
                if stage is not None and stage != shown.get(seed):
                    shown[seed] = stage
                    console.print(f"seed {seed}: {stage}", highlight=False)
        for seed, (process, started, pump, _) in list(running.items()):
            if process.poll() is None:
                continue
            pump.join()
            del running[seed]
            finished[seed] = {"returncode": process.returncode, "time_s": round(time.monotonic() - started, 1)}
            state = "done" if process.returncode == 0 else f"[bold red]failed[/] (exit code {process.returncode})"
            console.print(f"seed {seed}: {state} in {finished[seed]['time_s']:.0f} s", highlight=False)
    return finished
