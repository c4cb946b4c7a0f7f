"""The `safealign` entry point tears torch.distributed down on the way out, whether its command succeeded or failed
(a gloo group left for interpreter shutdown can abort a finished run with SIGABRT)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
import torch.distributed as dist
from safealign.cli import main

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
sys.argv = ["safealign", "data", "validate", *sys.argv[2:]]
try:
    main()
except SystemExit as exit_:
    print("exit", exit_.code)
print("initialized after main:", dist.is_initialized())
"""


@pytest.mark.parametrize("succeeds", [True, False])
def test_main_destroys_the_process_group_after_a_command(tmp_path, succeeds):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "How?", "response_0": "A.", "response_1": "B.", "better_response_id": 0, '
                    '"safer_response_id": 1, "is_response_0_safe": false, "is_response_1_safe": true}\n')
    target = data if succeeds else tmp_path / "missing.jsonl"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store"), str(target)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"exit {0 if succeeds else 2}" in result.stdout, result.stdout
    assert "initialized after main: False" in result.stdout, result.stdout
