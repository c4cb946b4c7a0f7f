"""The documentation a user reads stays true: the command reference is the code's, the README is a door (the two
commands first, short), and nothing points outside the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

from safealign.cli import command_reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_reference_is_generated_from_the_current_configs():
    assert (ROOT / "docs" / "commands.md").read_text(encoding="utf-8").rstrip("\n") == command_reference().rstrip("\n"), \
        "docs/commands.md is stale: run `make docs`"


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert len(readme.splitlines()) <= 150


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files", "src", "docs", "tests", "bench", "configs", "README.md"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    outside = ("../" + "shared", "spec " + "§")  # written so that this file does not hold them
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml") and path.is_file():
            text = path.read_text(encoding="utf-8")
            assert not any(marker in text for marker in outside), name
