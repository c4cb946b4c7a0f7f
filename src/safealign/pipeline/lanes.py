"""Two lanes (`parallel_baselines: true`): the baselines in a second process beside Safe RLHF's rounds.

After SFT and the round-1 reward and cost models, the baselines (evaluate_sft, eval_scores, ppo, evaluate_ppo,
shaping, evaluate_shaping) depend on nothing else and nothing depends on them but compare and report; nor does
anything depend on the evaluations of the Safe RLHF rounds, which the second lane takes after the baselines (waiting
for a round's policy where it must), so that the first lane holds the training chain alone. On a CPU,
generation-heavy stages use a second thread poorly while training uses it well, so two one-thread lanes get through
the RL and evaluation stages faster than one two-thread lane; a lane takes the other's threads back when that one
ends. Each stage computes what it would in one lane (tests/pipeline/test_pipeline.py: the same numbers to the last
digit on the 2-core VM without AVX-512; on the one with AVX-512 a stage in the second lane's process differed in the
8th significant digit, float sums not being fixed across processes there); only the wall time changes. The second
lane's output goes to output_dir/logs/baselines.log.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from safealign.config import StageFailed
from safealign.console import quiet_steps, stderr_console
from safealign.io import atomic_write_json
from safealign.pipeline.config import PipelineConfig
from safealign.pipeline.stage_runner import StageRunner
from safealign.pipeline.stages import plan, prerequisites

console = stderr_console()


LANE_HEAD = ("world", "sft", "rm", "cm")  # every baseline stage needs these; they run first, with all threads
BASELINE_LANE = ("evaluate_sft", "eval_scores", "ppo", "evaluate_ppo", "shaping", "evaluate_shaping",
                 "dpo_harmless", "safedpo", "bfpo", "modpo", "grpo", "p3o")  # the family splits between the lanes (methods.yaml)
LANE_LOG = "logs/baselines.log"  # the second lane's output (stages, warnings, a traceback if it fails)
LANE_RESULT = "logs/baselines.json"  # its stage times, or the stage that failed and why
LANE_REQUEST = "logs/baselines-request.json"  # what it runs: the pipeline config, its stages, its threads
LANE_MAIN_DONE = "logs/safe_rlhf_lane.done"  # written when the main lane ends: the second takes all the threads


def enough_threads() -> bool:
    """At least two CPU threads to split between the lanes (else the stages run one after another, with a note)."""
    if torch.get_num_threads() < 2:
        console.print("[yellow]note:[/] parallel_baselines needs at least 2 CPU threads (torch has "
                      f"{torch.get_num_threads()}): the stages run one after another", highlight=False)
        return False
    return True


def run_beside(runner: StageRunner, main: list[str], side: list[str]) -> None:
    """Run `side` in a second process while this one runs `main`; each lane gets half the threads, and whichever
    finishes first hands its threads to the other at the other's next stage. A stage that fails in the second
    lane fails the pipeline once `main` is done (StageFailed naming the log); one failing here stops the second
    lane (re-running the command resumes both: done stages are skipped, interrupted ones resume from checkpoints)."""
    total = torch.get_num_threads()
    root = runner.root
    log, result, main_done = root / LANE_LOG, root / LANE_RESULT, root / LANE_MAIN_DONE
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    main_done.unlink(missing_ok=True)
    request = root / LANE_REQUEST
    atomic_write_json(request, {"config": dataclasses.asdict(runner.cfg), "stages": runner.stages, "names": side,
                                "threads": total - total // 2, "total_threads": total, "parent_pid": os.getpid()})
    console.print(f"{', '.join(s for s in side if not runner.done(s))} run in a second process beside the Safe RLHF "
                  f"lane, {total // 2} + {total - total // 2} threads; its log: {log}", highlight=False)
    # A fresh interpreter (not fork: no torch, CUDA or Accelerate state is inherited; not multiprocessing's spawn,
    # which re-runs the caller's main script when it has no __main__ guard).
    with open(log, "ab") as out:
        lane = subprocess.Popen([sys.executable, "-c", "import sys; from safealign.pipeline.lanes import side_lane; "
                                 "side_lane(sys.argv[1])", str(request)], stdout=out, stderr=subprocess.STDOUT)
    torch.set_num_threads(total // 2)

    def rebalance() -> None:
        if lane.poll() is not None and torch.get_num_threads() != total:
            torch.set_num_threads(total)

    runner.before_each = rebalance
    try:
        runner.run_all(main)
    except BaseException:
        lane.terminate()
        lane.wait()
        console.print(f"[yellow]the baselines lane was stopped[/] (its log: {log}); the same command resumes it",
                      highlight=False)
        raise
    finally:
        runner.before_each = lambda: None
        torch.set_num_threads(total)
    main_done.touch()
    if lane.poll() is None:
        runner.write_progress("baselines lane", log=LANE_LOG)
        console.print(f"waiting for the baselines lane (its log: {log})", highlight=False)
    lane.wait()
    outcome = json.loads(result.read_text()) if result.is_file() else {}
    if lane.returncode != 0 or outcome.get("error"):
        failure = outcome.get("error") or {"stage": "?", "message": f"the process ended with exit code {lane.returncode}"}
        raise StageFailed(f"pipeline stage {failure['stage']} failed in the baselines lane: {failure['message']} "
                          f"(traceback in {log}). The Safe RLHF lane finished; re-run the same command to resume.")
    runner.timings.update(outcome["timings"])
    runner.cpu_timings.update(outcome["cpu_timings"])
    for name in side:  # the lane's results, as a skipped stage's
        runner.results[name] = json.loads(runner.done_file(name).read_text())


def side_lane(request_path: str) -> None:
    """The second lane's process (started by `_run_beside`): runs the requested stages with its share of the
    threads (all of them once the main lane is done), then writes their times, or the stage that failed, to
    LANE_RESULT."""
    request = json.loads(Path(request_path).read_text())
    quiet_steps()
    _die_with_parent(request["parent_pid"])
    torch.set_num_threads(request["threads"])
    cfg = PipelineConfig(**request["config"])
    root = Path(cfg.output_dir)
    runner = StageRunner(cfg, root, request["stages"], watched=False)

    def rebalance() -> None:
        if (root / LANE_MAIN_DONE).exists() and torch.get_num_threads() != request["total_threads"]:
            torch.set_num_threads(request["total_threads"])

    runner.before_each = rebalance
    error = None
    for name in request["names"]:
        try:
            _wait_for_prerequisites(runner, name, root / LANE_MAIN_DONE)
            runner.run_one(name)
        except Exception as err:  # reported to the main process, which raises it after its own lane
            traceback.print_exc()
            error = {"stage": name, "message": f"{type(err).__name__}: {err}"}
            break
    atomic_write_json(root / LANE_RESULT, {"timings": runner.timings, "cpu_timings": runner.cpu_timings, "error": error})
    sys.exit(1 if error else 0)


def _wait_for_prerequisites(runner: StageRunner, name: str, main_done: Path) -> None:
    """Wait until the stages whose outputs `name` reads are done (the first lane writes them: a round's policy or
    value models); a StageFailed when the first lane ended without them."""
    table = plan(runner.cfg, runner.root)
    missing = [p for p in prerequisites(runner.cfg, table, name) if p in runner.stages and not runner.done_file(p).exists()]
    while missing:
        if main_done.exists():
            raise StageFailed(f"{name} needs {', '.join(missing)}, which the Safe RLHF lane ended without")
        time.sleep(1.0)
        missing = [p for p in missing if not runner.done_file(p).exists()]


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, the second lane gets SIGTERM when the pipeline process that started it dies (even by SIGKILL): a
    re-run must not find an orphaned lane still training into the same directories. Elsewhere it runs on, so stop
    it yourself before re-running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request took effect
        sys.exit(1)
