"""Rich output in a log keeps whole tables: 160 columns when stderr is not a terminal, COLUMNS when set."""

from __future__ import annotations

from safealign.console import LOG_WIDTH, stderr_console


def test_a_redirected_console_is_wide_enough_for_the_tables(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert stderr_console().width == LOG_WIDTH  # pytest captures stderr: not a terminal


def test_columns_overrides_the_log_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert stderr_console().width == 100
