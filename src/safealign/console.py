"""Where safealign talks to people: rich output on stderr (stdout carries a stage's metrics JSON)."""

from __future__ import annotations

import os

from rich.console import Console

# Redirected into a log, rich assumes 80 columns and cuts a wide table's names and numbers to "…". A log has
# no width to respect: 160 keeps the pipeline's and `evaluate`'s tables whole. COLUMNS still wins when set.
LOG_WIDTH = 160


class Verbosity:
    """What the training loops print besides their progress bar. A stage run alone prints a line of scalars every
    `logging_steps`; inside the pipeline each stage shows its progress bar (with its ETA) only, the scalars going to
    TensorBoard and the run directory as always (`quiet_steps`)."""

    step_lines = True


def quiet_steps() -> None:
    Verbosity.step_lines = False


def stderr_console() -> Console:
    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console
