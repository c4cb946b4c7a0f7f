"""The `safealign` command line: `safealign STAGE [--config FILE] [--key value ...]`.

Each stage command is a thin wrapper: resolve the stage's config dataclass (defaults < YAML < CLI),
call the stage's `run(cfg)`, print its metrics. `safealign STAGE --help` lists every config key.
Heavy imports (torch, transformers) happen inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from safealign.config import ConfigError, StageFailed, describe_config, load_config
from safealign.console import stderr_console

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0], context_settings=HELP)
world_app = typer.Typer(no_args_is_help=True, help="SafeWorld, the embedded simulated world.", context_settings=HELP)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate data files.", context_settings=HELP)
app.add_typer(world_app, name="world")
app.add_typer(data_app, name="data")
console = stderr_console()

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True, **HELP}
ASKS_HELP = bool({"--help", "-h"} & set(sys.argv))  # only then import a stage to list its config keys (fast start)


def _user_error(message: str) -> None:
    # soft_wrap: never break a long path or row reference across lines (copy-paste, grep)
    from rich.markup import escape  # a message may hold brackets ("[system,] user"): text, not markup

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _run_stage(module: str, config_class: str, config: Optional[Path], args: list[str], fixed: dict | None = None) -> Any:
    """Resolve `config_class` from `module`, run `module.run(cfg)`, print the metrics it returns."""
    from safealign.data.schema import DataError  # light import: no torch

    stage = importlib.import_module(module)
    try:
        cfg = load_config(getattr(stage, config_class), config, args)
        if fixed:
            cfg = type(cfg)(**{**cfg.__dict__, **{k: v for k, v in fixed.items() if v is not None}})
        metrics = stage.run(cfg)
    except (ConfigError, DataError, FileNotFoundError, StageFailed) as err:
        _user_error(str(err))
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:  # a path the user gave
        _user_error(f"{err.strerror or err}: {err.filename}" + (f" -> {err.filename2}" if err.filename2 else ""))
    if metrics is not None:
        print(json.dumps(metrics, indent=2, default=str))
    return metrics


def _stage_help(module: str, config_class: str, summary: str) -> str:
    try:
        cls = getattr(importlib.import_module(module), config_class)
    except Exception:  # noqa: BLE001 - help must never crash
        return summary
    return summary + "\n\n\b\nConfig keys (YAML or --key value):\n" + describe_config(cls)


def _stage_command(name: str, module: str, config_class: str, summary: str) -> None:
    def command(ctx: typer.Context, config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file.")) -> None:
        _run_stage(module, config_class, config, list(ctx.args))

    command.__doc__ = summary
    app.command(name=name, context_settings=EXTRA_ARGS, help=_stage_help(module, config_class, summary)
                if ASKS_HELP and name in sys.argv else summary)(command)


_stage_command("sft", "safealign.algorithms.sft", "SFTConfig", "Supervised fine-tuning of the policy (loss on response tokens).")
_stage_command("rm", "safealign.algorithms.reward", "RewardConfig", "Train the reward model (helpfulness, Bradley-Terry).")
_stage_command("cm", "safealign.algorithms.cost", "CostConfig", "Train the cost model (harmlessness, Bradley-Terry + safety sign).")
_stage_command("eval-scores", "safealign.evaluation.scores", "ScoreEvalConfig", "Evaluate a reward/cost model on a preference file (accuracies, figures).")
_stage_command("evaluate", "safealign.evaluation.compare", "CompareConfig",
               "Generate with a policy (--model) and judge it, or compare a set of models (--models): gold and model judges, Elo, win rates, arena.")
_stage_command("ppo", "safealign.algorithms.ppo", "PPOConfig", "RLHF: PPO of the policy on the reward model.")
_stage_command("ppo-lag", "safealign.algorithms.ppo_lag", "PPOLagConfig", "Safe RLHF: PPO-Lagrangian on the reward and cost models.")
_stage_command("shaping", "safealign.algorithms.reward_shaping", "RewardShapingConfig", "Baseline: PPO on the shaped reward R - nu*C (nu fixed, or a sweep).")
_stage_command("redteam", "safealign.rounds", "RedTeamConfig",
               "One red-teaming round's data: probe a policy, gather unsafe prompts, sample and annotate new pairs (SafeWorld).")
_stage_command("report", "safealign.evaluation.report", "ReportConfig",
               "Render a run directory as report.html (self-contained), report.md and report.json.")
_stage_command("pipeline", "safealign.pipeline", "PipelineConfig", "The main job: SafeWorld -> SFT -> reward + cost models -> Safe RLHF and baselines -> evaluation, in one run directory.")
_stage_command("seeds", "safealign.seeds", "SeedsConfig",
               "The pipeline once per seed (--seeds \"[0, 1, 2]\", --jobs at once), then the summary over the runs (seeds.html).")
_stage_command("aggregate", "safealign.evaluation.aggregate", "AggregateConfig",
               "Summarise finished pipeline runs (e.g. one per seed): claims counted over runs, numbers as mean ± std (seeds.html).")


WORLD_SUMMARY = "Generate SafeWorld (prompts, SFT corpus, annotated preference pairs) as PKU-format files."


@world_app.command("generate", context_settings=EXTRA_ARGS,
                   help=_stage_help("safealign.data.safeworld.generate", "WorldConfig", WORLD_SUMMARY)
                   if ASKS_HELP and "generate" in sys.argv else WORLD_SUMMARY)
def world_generate(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of WorldConfig keys."),
) -> None:
    _run_stage("safealign.data.safeworld.generate", "WorldConfig", config, list(ctx.args))


@data_app.command("validate")
def data_validate(
    file: Path = typer.Argument(..., help="A JSONL/JSON/Parquet/CSV file or a `datasets` directory."),
    kind: str = typer.Option("auto", help="preference, sft, prompt, or auto (from the fields)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on contradictory safety labels instead of skipping them."),
) -> None:
    """Check a data file and print a summary (rows, safe/unsafe counts, categories, contradictions)."""
    from safealign.data.loading import validate_file
    from safealign.data.schema import DataError

    try:
        summary = validate_file(file, kind=kind, on_contradiction="error" if strict else "skip")
    except (DataError, FileNotFoundError) as err:
        _user_error(str(err))
    print(json.dumps(summary, indent=2))


def main() -> None:
    try:
        app()
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Tear torch.distributed down before the interpreter does (a no-op in one process, or where torch was never
    imported). The torch docs ask every rank to call destroy_process_group at the end; a gloo process group still
    alive at interpreter shutdown (FSDP2's device meshes hold theirs) is destroyed while Python is being torn
    down, where its worker threads can abort the process (SIGABRT) after the run's outputs are written."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return
    import gc

    gc.collect()  # the stage's models, optimizers and meshes (and the process groups they hold) go first
    distributed.destroy_process_group()


if __name__ == "__main__":
    main()
