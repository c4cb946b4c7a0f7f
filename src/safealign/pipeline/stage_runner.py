"""Running the stages of a pipeline in one process: skip what is done, resume what was interrupted, time the rest."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from safealign.config import changed_settings, load_config
from safealign.console import stderr_console
from safealign.io import atomic_write_json
from safealign.pipeline.commands import COMMANDS
from safealign.pipeline.config import PipelineConfig
from safealign.pipeline.manifest import policies_manifest
from safealign.pipeline.stages import ALWAYS_RUN, Stage, plan
from safealign.run_directory import write_manifest, write_progress
from safealign.training.checkpoint import latest_checkpoint

console = stderr_console()
StageConfig = TypeVar("StageConfig")


def resume_interrupted(config: StageConfig) -> StageConfig:
    """A training stage's config, set to continue the attempt that crashed in its output_dir.

    The pipeline runs a stage again when it has no metrics.json. If that stage left checkpoints under the very same
    config (output_dir/config.yaml, written when it started; `resume` aside), it continues from the newest one
    (`resume: latest`: the same trajectory as an uninterrupted run, as `--resume` of the stage's own command). After
    a config change it starts fresh, with a note. A `resume` the user set in the stage's settings is kept as given.
    """
    if getattr(config, "resume", None) != "":
        return config
    out = Path(config.output_dir)
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return config
    if changed_settings(config, out / "config.yaml", ignore=("resume",)) != []:
        console.print(f"[yellow]note:[/] {out} holds checkpoints of an interrupted attempt with another config: "
                      "starting it fresh", highlight=False)
        return config
    console.print(f"resuming the interrupted stage in {out} from {checkpoint.name}", highlight=False)
    return dataclasses.replace(config, resume="latest")


STAGE_TIME = "stage_time.json"  # in a stage's directory: its wall and CPU seconds when it ran


class StageRunner:
    """Runs stages in one process: skips a stage whose done file exists (loading its metrics), times the others,
    and after each one rewrites policies.json (and progress.json when this process is the one people watch)."""

    def __init__(self, cfg: PipelineConfig, root: Path, stages: list[str], watched: bool = True,
                 planner: Callable[[Any, Path], dict[str, Stage]] = plan, manifest: bool = True) -> None:
        """`planner`: the stage table (the main pipeline's `plan`, or another job's, e.g. `rlaif.plan`); `manifest`:
        rewrite policies.json after each stage (the main pipeline's)."""
        self.cfg, self.root, self.stages, self.watched = cfg, root, stages, watched
        self.planner, self.manifest = planner, manifest
        self.results: dict[str, dict] = {}
        self.timings: dict[str, float] = {}  # wall seconds of the stages that ran
        self.cpu_timings: dict[str, float] = {}  # CPU seconds of this process (all threads): on a busy shared machine, close to a quiet run's wall time
        self.before_each: Callable[[], None] = lambda: None  # the lanes' thread rebalancing

    def stage(self, name: str) -> Stage:
        """The stage as planned now: its inputs may depend on what earlier stages wrote."""
        return self.planner(self.cfg, self.root)[name]

    def done_file(self, name: str) -> Path:
        stage = self.stage(name)
        return stage.directory / stage.done_file

    def done(self, name: str) -> bool:
        return self.done_file(name).exists() and self.stage(name).group not in ALWAYS_RUN and name not in ALWAYS_RUN

    def run_all(self, names: list[str]) -> None:
        for name in names:
            self.run_one(name)

    def run_one(self, name: str) -> None:
        if self.done(name):
            console.print(f"[dim]skip {name}: {self.done_file(name)} exists[/]")
            self.results[name] = json.loads(self.done_file(name).read_text())
            times = self.stage(name).directory / STAGE_TIME  # the time it took when it ran (absent before 2026-12-04)
            if times.is_file():
                recorded = json.loads(times.read_text())
                self.timings[name], self.cpu_timings[name] = recorded["time_s"], recorded["cpu_time_s"]
            return
        self.before_each()
        if self.watched:  # progress.json: which stage runs now, for whoever watches the run (`safealign seeds`, a dashboard)
            self.write_progress(name)
        console.rule(f"[bold]{name}")
        stage = self.stage(name)
        config_class, run_stage = COMMANDS[stage.command].load()
        config = load_config(config_class, None, stage.config_values(self.cfg))
        if stage.resumable:
            config = resume_interrupted(config)
        start, cpu_start = time.perf_counter(), time.process_time()
        self.results[name] = run_stage(config)
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.cpu_timings[name] = round(time.process_time() - cpu_start, 1)
        if name not in ALWAYS_RUN:  # kept with the stage: a later invocation that skips it still reports what it cost
            atomic_write_json(stage.directory / STAGE_TIME, {"time_s": self.timings[name], "cpu_time_s": self.cpu_timings[name]})
        if self.manifest:
            write_manifest(self.root, policies_manifest(self.cfg, self.root, set(self.stages)))

    def write_progress(self, name: str, **extra: Any) -> None:
        number = self.stages.index(name) + 1 if name in self.stages else len(self.results)
        write_progress(self.root, name, number, len(self.stages), **extra)
