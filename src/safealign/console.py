"""Where safealign talks to people: rich output on stderr (stdout carries a stage's metrics JSON)."""

from __future__ import annotations

import os

from rich.console import Console

# Redirected into a log, rich assumes 80 columns and cuts a wide table's names and numbers to "…". A log has
# no width to respect: 160 keeps the pipeline's and `evaluate`'s tables whole. COLUMNS still wins when set.
LOG_WIDTH = 160


def stderr_console() -> Console:
    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console
