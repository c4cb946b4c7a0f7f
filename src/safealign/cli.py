"""The `safealign` command line: `safealign COMMAND [--config FILE] [--key value ...]`.

One command per row of the command table (`pipeline.commands.COMMANDS`): resolve the command's config dataclass
(defaults < YAML < CLI), call its function, print the metrics it returns as JSON on stdout. `safealign COMMAND --help`
lists every config key. A command's module (which imports torch) is imported only when the command runs or its help
is asked for, so `safealign --help` is instant.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from safealign.config import ConfigError, StageFailed, config_keys, describe_config, load_config
from safealign.console import stderr_console
from safealign.data.schema import DataError
from safealign.data.validate import validate_file
from safealign.pipeline.commands import COMMANDS, Command

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0], context_settings=HELP)
world_app = typer.Typer(no_args_is_help=True, help="SafeWorld, the embedded simulated world.", context_settings=HELP)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate data files.", context_settings=HELP)
app.add_typer(world_app, name="world")
app.add_typer(data_app, name="data")
console = stderr_console()

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True, **HELP}
ASKS_HELP = bool({"--help", "-h"} & set(sys.argv))  # only then import a command's module to list its config keys


def _user_error(message: str) -> None:
    # soft_wrap: never break a long path or row reference across lines (copy-paste, grep)
    from rich.markup import escape  # a message may hold brackets ("[system,] user"): text, not markup

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def run_command(command: Command, config: Optional[Path], args: list[str]) -> Any:
    """Resolve the command's config, run it, print the metrics it returns."""
    config_class, function = command.load()
    try:
        metrics = function(load_config(config_class, config, args))
    except (ConfigError, DataError, FileNotFoundError, StageFailed) as err:
        _user_error(str(err))
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:  # a path the user gave
        _user_error(f"{err.strerror or err}: {err.filename}" + (f" -> {err.filename2}" if err.filename2 else ""))
    if metrics is not None:
        print(json.dumps(metrics, indent=2, default=str))
    return metrics


def command_help(command: Command) -> str:
    """The summary and, when help is asked for this command, every config key with its default and meaning."""
    if not (ASKS_HELP and command.name.split()[-1] in sys.argv):
        return command.summary
    try:
        config_class, _ = command.load()
    except Exception:  # noqa: BLE001 - help must never crash
        return command.summary
    return command.summary + "\n\n\b\nConfig keys (YAML or --key value):\n" + describe_config(config_class)


def _add(command: Command) -> None:
    def run(ctx: typer.Context, config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file.")) -> None:
        run_command(command, config, list(ctx.args))

    group, _, name = command.name.rpartition(" ")
    parent = {"": app, "world": world_app}[group]
    parent.command(name=name, context_settings=EXTRA_ARGS, help=command_help(command))(run)


for _command in COMMANDS.values():
    if _command.cli:
        _add(_command)


@data_app.command("validate")
def data_validate(
    file: Path = typer.Argument(..., help="A JSONL/JSON/Parquet/CSV file or a `datasets` directory."),
    kind: str = typer.Option("auto", help="preference, sft, prompt, or auto (from the fields)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on contradictory safety labels instead of skipping them."),
) -> None:
    """Check a data file and print a summary (rows, safe/unsafe counts, categories, contradictions)."""
    try:
        summary = validate_file(file, kind=kind, on_contradiction="error" if strict else "skip")
    except (DataError, FileNotFoundError) as err:
        _user_error(str(err))
    print(json.dumps(summary, indent=2))


@app.command("judge")
def judge(
    file: Path = typer.Argument(..., help="{prompt, response} rows (or PKU-SafeRLHF rows): JSONL, JSON, CSV, Parquet."),
    output: Path = typer.Option(..., "--output", "-o", help="Where the judged rows go (JSONL, input order)."),
    judge_name: str = typer.Option("gold", "--judge", help="The judge: gold (SafeWorld's), llm:PATH (a local causal LM or preset) or openai:MODEL."),
    calibration: str = typer.Option("", "--calibration", help="An LLM judge's calibration.json (safealign calibrate-judge): its thresholds."),
) -> None:
    """Judge every response of a file: SafeWorld's gold judge (helpfulness, is_safe, harm_categories, severity, class, why)
    or an LLM judge (unsafe and refusal probabilities, is_safe, refused, refusal_match, helpfulness 0..9)."""
    from safealign.evaluation.judge import judge_file

    try:
        summary = judge_file(file, output, judge_name, calibration)
    except (DataError, FileNotFoundError, ValueError) as err:
        _user_error(str(err))
    print(json.dumps(summary, indent=2))


def command_reference() -> str:
    """docs/commands.md: every command with its config keys, as `--help` lists them (`make docs` writes it; a test
    checks that the file is current)."""
    lines = ["# Command reference", "",
             "Generated from the code by `make docs`: every `safealign` command, and every key of its config (YAML file "
             "given with `--config`, or `--key value` on the command line, which wins). Types are those of the config "
             "dataclass; lists and mappings are written as YAML (`--nus \"[0.5, 2]\"`).", "",
             "`safealign data validate FILE [--kind preference|sft|prompt|auto] [--strict]`: check a data file and print "
             "a summary.", "",
             "`safealign judge FILE --output OUT.jsonl [--judge gold]`: judge every `{prompt, response}` row of FILE (or both "
             "responses of a PKU-SafeRLHF row) and write the rows with `helpfulness`, `is_safe`, `harm_categories`, "
             "`severity`, `class` and `why` added, in input order. With `--judge llm:PATH` (a local causal LM or a preset "
             "such as `qwen2.5-coder-0.5b`) or `--judge openai:MODEL`, and `--calibration calibration.json` from "
             "`safealign calibrate-judge`: `unsafe_probability`, `is_safe`, `refusal_probability`, `refused`, "
             "`refusal_match` and `helpfulness` (0..9).", ""]
    for command in COMMANDS.values():
        if not command.cli:
            continue
        config_class, _ = command.load()
        lines += [f"## safealign {command.name}", "", command.summary, "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, kind, default, text in config_keys(config_class):
            cell = repr(default).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | `{cell}` | {text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


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
    gc.collect()  # the stage's models, optimizers and meshes (and the process groups they hold) go first
    distributed.destroy_process_group()


if __name__ == "__main__":
    main()
