"""The shared loop: accumulation equals one big batch, data order, pickle-free state, two processes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import safealign
from safealign.algorithms.sft import SFTConfig, run
from safealign.config import ConfigError
from safealign.data.schema import PromptRecord
from safealign.training.checkpoint import load_state_tree, rng_state, save_state_tree, set_rng_state
from safealign.training.common import epoch_batches, resolve_mixed_precision
from safealign.training.rl_setup import repeat_prompts_by_kind


def write_mixed_lengths(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Short and long responses, so that micro-batches hold very different numbers of label tokens."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            response = str(a + b) if i % 3 else f"{a} plus {b} is {a + b}, because {a} and {b} make {a + b} together"
            handle.write(json.dumps({"prompt": f"what is {a} plus {b}", "response": response}) + "\n")
    return path


def _grad_norms(out: Path) -> list[float]:
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["grad_norm"] for h in history if "grad_norm" in h]


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    data = write_mixed_lengths(tmp_path / "train.jsonl")
    runs = {}
    # "accumulated" sorts each step's examples by length before cutting its micro-batches (the default),
    # "unsorted" cuts them in shuffled order: both must compute the big batch's update.
    for name, batch, accumulation, sort in [("big", 16, 1, True), ("accumulated", 8, 2, True), ("unsorted", 4, 4, False)]:
        cfg = SFTConfig(train_data=str(data), output_dir=str(tmp_path / name), mixed_precision="no", max_steps=2,
                        sort_within_step=sort,
                        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, warmup_ratio=0.0,
                        lr_scheduler="constant", logging_steps=1, eval_fraction=0.0, save_steps=1, max_grad_norm=0.0,
                        adam_epsilon=1e-6)  # bounds how much Adam amplifies rounding noise on ~0 gradients
        metrics = run(cfg)
        runs[name] = (metrics, load_file(str(tmp_path / name / "model" / "model.safetensors")), _grad_norms(tmp_path / name))
    big_metrics, big, big_norms = runs["big"]
    for variant in ("accumulated", "unsorted"):
        acc_metrics, accumulated, acc_norms = runs[variant]
        # The gradient norm is sensitive to the normaliser (per-micro-batch means would change it).
        assert acc_norms == pytest.approx(big_norms, rel=1e-5) and len(big_norms) == 2
        assert acc_metrics["train_loss"] == pytest.approx(big_metrics["train_loss"], rel=1e-6)
        # The micro-batches' sums are reduced in another order than the big batch's, and Adam amplifies the rounding
        # on near-zero gradients: seen 1.03e-6 on one weight on an AVX-512 CPU, 2e-6 on an H100. A wrong normaliser
        # moves weights by a fraction of a step (lr 1e-3), far above 1e-5 (and changes the norms above).
        for name, tensor in big.items():
            torch.testing.assert_close(accumulated[name], tensor, atol=1e-5, rtol=0)


def test_a_loss_cut_off_from_the_weights_stops_at_the_first_step(tmp_path, monkeypatch):
    """A wrapper that loses the graph (FSDP2 on torch < 2.13 did, with the score model's output) trains nothing:
    the first step must say so instead of saving an untrained model."""
    from safealign.algorithms.sft import SFTStep

    real_loss = SFTStep.loss

    def detached_loss(self, model, batch, num_items):
        loss, metrics = real_loss(self, model, batch, num_items)
        return loss.detach().requires_grad_(), metrics  # a leaf: backward reaches no weight

    monkeypatch.setattr(SFTStep, "loss", detached_loss)
    cfg = SFTConfig(train_data=str(write_mixed_lengths(tmp_path / "train.jsonl", n=32)), output_dir=str(tmp_path / "run"),
                    mixed_precision="no", max_steps=2, per_device_train_batch_size=8, eval_fraction=0.0)
    with pytest.raises(RuntimeError, match="no trained weight received a gradient in the first step"):
        run(cfg)
    assert not (tmp_path / "run" / "model").exists()


def test_epoch_batches_partition_each_epoch_and_differ_between_epochs():
    n, batch, accumulation, processes = 37, 4, 2, 2  # global batch 16: 3 steps, the last wraps round
    def epoch(e: int, start: int = 0) -> list[list[list[int]]]:
        return [epoch_batches(n, e, seed=5, batch_size=batch, accumulation=accumulation, num_processes=processes,
                              process_index=r, start_step=start) for r in range(processes)]
    first = epoch(0)
    seen = [i for rank in first for micro in rank for i in micro]
    assert len(seen) == 3 * 16 and set(seen) == set(range(n))
    assert all(len(micro) == batch for rank in first for micro in rank)
    assert epoch(0) == first  # deterministic
    assert epoch(1) != first  # reshuffled each epoch
    # Resuming at step 2 gives exactly the tail of the epoch on every process.
    assert epoch(0, start=2) == [rank[2 * accumulation:] for rank in first]


def test_length_grouped_epoch_keeps_the_partition_and_cuts_padding():
    n, batch, accumulation, processes = 203, 4, 2, 2  # global batch 16: 13 steps, the last one partial + wrap
    lengths = [int(x) for x in torch.randint(5, 100, (n,), generator=torch.Generator().manual_seed(0))]
    def epoch(e: int, start: int = 0, group: int = 4) -> list[list[list[int]]]:
        return [epoch_batches(n, e, seed=5, batch_size=batch, accumulation=accumulation, num_processes=processes,
                              process_index=r, start_step=start, lengths=lengths, length_group_size=group)
                for r in range(processes)]
    def steps(ranks: list[list[list[int]]]) -> list[list[int]]:  # each optimizer step's indices in epoch order
        return [[i for m in range(accumulation) for rank in ranks for i in rank[s * accumulation + m]]
                for s in range(len(ranks[0]) // accumulation)]
    def padded_tokens(ranks) -> int:
        return sum(len(micro) * max(lengths[i] for i in micro) for rank in ranks for micro in rank)

    grouped, plain = epoch(0), epoch(0, group=1)
    assert plain == [epoch_batches(n, 0, 5, batch, accumulation, processes, r) for r in range(processes)]
    seen = [i for step in steps(grouped)[:-1] for i in step]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 12 * 16  # no repeats before the wrapping step
    assert set(seen) | set(steps(grouped)[-1]) == set(range(n))  # every example once per epoch
    assert sorted(seen + steps(grouped)[-1][:n - 12 * 16]) == list(range(n))
    # Groups of similar length: much less padding than plain shuffling (here about 1.5x fewer padded tokens).
    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)
    # Deterministic, reshuffled per epoch, and resuming at step 5 gives exactly the tail on every process.
    assert epoch(0) == grouped and epoch(1) != grouped
    assert epoch(0, start=5) == [rank[5 * accumulation:] for rank in grouped]
    # Step order inside a group is shuffled: step lengths do not simply fall within each run of 4 steps.
    step_max = [max(lengths[i] for i in step) for step in steps(grouped)[:12]]
    assert any(step_max[k] < step_max[k + 1] for k in range(11) if k % 4 != 3)


def test_sorting_within_a_step_keeps_each_step_and_cuts_padding():
    n, batch, accumulation, processes = 203, 4, 4, 2  # global batch 32: 7 steps, the last one wraps round
    lengths = [int(x) for x in torch.randint(5, 100, (n,), generator=torch.Generator().manual_seed(1))]
    def epoch(sort: bool, start: int = 0) -> list[list[list[int]]]:
        return [epoch_batches(n, 0, seed=5, batch_size=batch, accumulation=accumulation, num_processes=processes,
                              process_index=r, start_step=start, lengths=lengths, sort_within_step=sort)
                for r in range(processes)]
    def steps(ranks: list[list[list[int]]]) -> list[list[int]]:
        return [[i for m in range(accumulation) for rank in ranks for i in rank[s * accumulation + m]]
                for s in range(len(ranks[0]) // accumulation)]
    def padded_tokens(ranks) -> int:
        return sum(len(micro) * max(lengths[i] for i in micro) for rank in ranks for micro in rank)

    plain, sorted_ = epoch(False), epoch(True)
    assert plain == [epoch_batches(n, 0, 5, batch, accumulation, processes, r) for r in range(processes)]
    # Every step holds the same examples as with plain shuffling: only their micro-batches change.
    assert [sorted(step) for step in steps(sorted_)] == [sorted(step) for step in steps(plain)]
    # Micro-batch m of rank r is slice m·P + r of the step sorted longest first.
    for s, step in enumerate(steps(sorted_)):
        ordered = sorted(step, key=lambda i: -lengths[i])
        for m in range(accumulation):
            for r in range(processes):
                offset = (m * processes + r) * batch
                assert [lengths[i] for i in sorted_[r][s * accumulation + m]] == [lengths[i] for i in ordered[offset:offset + batch]]
    assert padded_tokens(sorted_) < 0.8 * padded_tokens(plain)
    assert epoch(True, start=3) == [rank[3 * accumulation:] for rank in sorted_]  # resume: the exact tail


def test_optimizer_and_rng_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_state_tree(optimizer.state_dict(), tmp_path, "optimizer")
    loaded = load_state_tree(tmp_path, "optimizer")
    assert loaded["param_groups"] == optimizer.state_dict()["param_groups"]  # tuples (betas) and int keys survive
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["state"][key][name], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]

    save_state_tree(rng_state(), tmp_path, "rng")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_state_tree(tmp_path, "rng"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_mixed_precision_auto_resolves_to_what_the_hardware_runs():
    assert resolve_mixed_precision("no") == "no"
    assert resolve_mixed_precision("fp16") == "fp16"
    assert resolve_mixed_precision("auto") in {"bf16", "no"}
    if not torch.cuda.is_available() and "avx512_bf16" not in Path("/proc/cpuinfo").read_text():
        assert resolve_mixed_precision("auto") == "no"


@pytest.mark.slow  # ~25 s of CPU: two interpreters start, then a one-process run to compare with
def test_two_processes_train_save_once_and_equal_one_process_with_their_joint_batch(tmp_path, two_ranks_env, torchrun):
    data = write_mixed_lengths(tmp_path / "train.jsonl", n=64)
    out = tmp_path / "run"
    src = str(Path(safealign.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           **two_ranks_env}
    result = torchrun(
        "-m", "safealign.cli", "sft", "--train_data", data, "--output_dir", out, "--max_steps", "4", "--save_steps", "2",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
        "--mixed_precision", "'no'", "--adam_epsilon", "1e-6", "--eval_fraction", "0.1", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    state = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["global_batch_size"] == 8  # 4 per process x 2 processes
    # Each process saved its own RNG state into the one checkpoint; no stray temporary directories.
    assert (out / "checkpoints" / "step-4" / "rng_state_rank1.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (out / "model" / "model.safetensors").is_file()
    # Two processes x 4 = one process x 8: the loss is normalised by the label tokens of both processes (each
    # step's 8 examples are sorted by length before the ranks take their halves: the same update).
    single = SFTConfig(train_data=str(data), output_dir=str(tmp_path / "single"), max_steps=4, save_steps=-1,
                       per_device_train_batch_size=8, gradient_accumulation_steps=1, logging_steps=1, mixed_precision="no", adam_epsilon=1e-6, eval_fraction=0.1)
    single_metrics = run(single)
    assert single_metrics["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-5)
    # Evaluation is sharded over the processes (the padded repeats dropped): the same 6 examples' loss.
    assert single_metrics["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    two, one = load_file(str(out / "model" / "model.safetensors")), load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=0)


def test_prompt_kind_repeats_copies_each_prompt_of_a_kind_and_names_what_is_wrong():
    prompts = [PromptRecord("a", "harmful"), PromptRecord("b", "borderline"), PromptRecord("c", None), PromptRecord("d", "benign")]
    repeated = repeat_prompts_by_kind(prompts, {"borderline": 3, "benign": 2}, "p.jsonl")
    assert [p.prompt for p in repeated] == ["a", "b", "b", "b", "c", "d", "d"]
    assert repeat_prompts_by_kind(prompts, {}, "p.jsonl") == prompts
    with pytest.raises(ConfigError, match=r"p\.jsonl.*'edgy'|'edgy'.*p\.jsonl"):
        repeat_prompts_by_kind(prompts, {"edgy": 2}, "p.jsonl")
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="whole number"):
            repeat_prompts_by_kind(prompts, {"borderline": bad}, "p.jsonl")
