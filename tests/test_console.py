"""Rich output in a log keeps whole tables: 160 columns when stderr is not a terminal, COLUMNS when set."""

from __future__ import annotations

import io
import sys

from safealign.console import LOG_WIDTH, stderr_console


def test_a_redirected_console_is_wide_enough_for_the_tables(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    console = stderr_console()
    assert console.width == LOG_WIDTH
    console.print("x" * (LOG_WIDTH - 1))
    assert sys.stderr.getvalue() == "x" * (LOG_WIDTH - 1) + "\n"  # one line, not folded at 80


def test_columns_overrides_the_log_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert stderr_console().width == 100
