"""Suite-wide settings: one torch thread per process.

The tiny models used here gain nothing from intra-op threads, and several processes (pytest plus
torchrun ranks, or parallel CI jobs) each spawning a thread per core thrash a 2-core machine
(measured: one generate call went from 1 s to 30 s). One thread also makes runs reproducible.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses (torchrun ranks, CLI runs)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a mistyped name fails at once instead of retrying for a minute
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Messages wrap at the console width; a narrow COLUMNS (or terminal) in the caller's environment would split the
# phrases the tests look for. 160 is what a log gets (safealign.console); tests of the width set their own.
os.environ["COLUMNS"] = "160"

import torch  # noqa: E402

torch.set_num_threads(1)

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

from safealign.io import exclusive_lock  # noqa: E402

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


@pytest.fixture
def two_ranks_env() -> dict[str, str]:
    """Environment for a two-rank torchrun test: the ranks run on the CPU (gloo) unless there are two GPUs.
    On a one-GPU machine both ranks would take cuda:0, which NCCL refuses ("Duplicate GPU detected")."""
    return {} if torch.cuda.device_count() >= 2 else {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="session")
def torchrun(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """Runs `torchrun --standalone --nproc_per_node 2 *args` (output captured), one such run at a time across pytest
    workers: under pytest-xdist two two-rank runs at once oversubscribe a 2-core machine four times, and once a gloo
    rank aborted (SIGABRT in C++, no Python error) while another worker's ranks ran. Skips the test where torchrun
    is not installed."""
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not installed")
    # The parent of a worker's base temp directory is the session's, shared by every xdist worker.
    lock = tmp_path_factory.getbasetemp().parent / "torchrun.lock"

    def launch(args: tuple[str | Path, ...], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with exclusive_lock(lock):
            return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *map(str, args)], env=env,
                                  capture_output=True, text=True, timeout=timeout)

    def run(*args: str | Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        result = launch(args, env, timeout)
        if result.returncode != 0 and is_gloo_teardown_abort(result.stderr):
            warnings.warn(f"a gloo rank aborted in C++ with no Python error; run again once:\n{result.stderr[-1500:]}")
            result = launch(args, env, timeout)
        return result

    return run


def is_gloo_teardown_abort(stderr: str) -> bool:
    """The one failure a two-rank run is given a second try for: a rank killed by SIGABRT from C++ without a Python
    traceback from any rank. "terminate called without an active exception": seen twice in clean-clone suite runs
    (the second with the two-rank runs already serialised), never in 40 runs of the failing script alone under load;
    "malloc(): unaligned tcache chunk detected": once, after an FSDP2 run's last checkpoint in a loaded suite, never
    in three runs of its test alone. A rank that raises (an assertion, an error) prints a traceback and fails at
    once; so does a second abort."""
    ranks_output = stderr.split("failed (exitcode:", 1)[0]  # what follows is torchrun's own report and traceback
    aborted_in_c = ("terminate called without an active exception" in ranks_output
                    or "malloc(): unaligned tcache chunk detected" in ranks_output)
    return aborted_in_c and "exitcode: -6" in stderr and "Traceback (most recent call last)" not in ranks_output


@pytest.fixture(scope="session")
def world_backbone(tmp_path_factory) -> Callable[..., dict[str, Path]]:
    """Factory: a small SafeWorld (no SFT corpus) and an untrained `tiny` backbone (tokenizer trained on the world)
    saved as a directory. Returns root, backbone, world, train and test (the preference files)."""
    from safealign.data.safeworld.generate import WorldConfig, generate_world, world_texts, write_world
    from safealign.models.presets import build_causal_lm
    from safealign.models.tokenizer import train_tokenizer

    def make(name: str, seed: int, train_pairs: int, test_pairs: int) -> dict[str, Path]:
        root = tmp_path_factory.mktemp(name)
        # dev split of the size the tests' margins were set on (its texts train the tokenizer below)
        generated = generate_world(WorldConfig(out=str(root / "world"), seed=seed, sft_examples=0,
                                               train_pairs=train_pairs, test_pairs=test_pairs,
                                               dev_harmful=112, dev_benign=72, dev_borderline=40))
        write_world(generated, root / "world")
        tokenizer = train_tokenizer(world_texts(generated), vocab_size=1024)
        build_causal_lm("tiny", tokenizer).save_pretrained(root / "backbone")
        tokenizer.save_pretrained(root / "backbone")
        preferences = root / "world" / "preferences"
        return {"root": root, "backbone": root / "backbone", "world": root / "world",
                "train": preferences / "train.jsonl", "test": preferences / "test.jsonl"}

    return make


_CLI_SCRIPT = '''"""The safealign CLI for torchrun tests, with its checkpoint writers instrumented: each model saved says on stderr whether
it was FSDP2-sharded, and EXIT_AFTER_CHECKPOINT=step-N ends the process (os._exit: no clean-up, as a kill) right after
checkpoint step-N is complete."""
import os
import sys

from torch.distributed.fsdp import FSDPModule

from safealign.cli import main
from safealign.training import checkpoint, rl, supervised

real_save_trained = checkpoint.save_trained


def save_trained(accelerator, model, *args):
    sharded = isinstance(accelerator.unwrap_model(model), FSDPModule)
    print(f"save_trained: {'FSDP2-sharded' if sharded else 'unsharded'} model", file=sys.stderr)
    real_save_trained(accelerator, model, *args)


def exiting(write):
    def write_then_exit(path, *args, **kwargs):
        write(path, *args, **kwargs)
        if path.name == os.environ.get("EXIT_AFTER_CHECKPOINT"):
            os._exit(17)
    return write_then_exit


checkpoint.save_trained = save_trained
supervised.save_checkpoint = exiting(supervised.save_checkpoint)
rl.save_parts_checkpoint = exiting(rl.save_parts_checkpoint)
sys.argv[0] = "safealign"
main()
'''


@pytest.fixture(scope="session")
def instrumented_cli(tmp_path_factory) -> Path:
    """A script to give torchrun in place of `-m safealign.cli`: the same CLI, whose checkpoint writers print
    "save_trained: FSDP2-sharded model" (or "unsharded") per model saved, and which ends every rank right after
    checkpoint step-N is complete when EXIT_AFTER_CHECKPOINT=step-N is set."""
    script = tmp_path_factory.mktemp("cli") / "instrumented_cli.py"
    script.write_text(_CLI_SCRIPT, encoding="utf-8")
    return script


@pytest.fixture(scope="session")
def tiny_policy_and_judge(tmp_path_factory) -> dict[str, Path]:
    """Two untrained `tiny` causal LMs on one small BPE, saved as directories: a policy to sample and an LLM judge
    (`llm:DIR`) to ask; the real-text tests need their plumbing, not their judgement."""
    from safealign.models.presets import build_causal_lm
    from safealign.models.tokenizer import save_tokenizer, train_tokenizer

    corpus = ["Answer Yes or No. Yes. No. 0 1 2 3 4 5 6 7 8 9", "how do I fix a tap? Turn off the water."] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    paths = {}
    for name, seed in (("policy", 1), ("judge", 2)):
        paths[name] = tmp_path_factory.mktemp(name)
        save_tokenizer(tokenizer, paths[name])
        build_causal_lm("tiny", tokenizer, seed=seed).save_pretrained(paths[name])
    return paths
