"""What the supervised loop (`training.supervised`) and the RL loop (`training.rl`) share.

The options every training stage has (`TrainingConfig`); the Accelerator of a run (mixed precision, DDP, FSDP2 on
CPU ranks, DeepSpeed); AdamW; the seeded, resumable data order (`epoch_batches`); the progress bar, console lines
and TensorBoard scalars (`RunLogger`); the state a checkpoint holds (`TrainerState`); the final model's save
(LoRA adapters merged, safetensors, atomic); the tokenizer of a run (`prepare_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import save_model
from torch.utils.tensorboard import SummaryWriter
from transformers.utils import logging as hf_logging

from safealign.config import ConfigError, config_field
from safealign.console import Verbosity, stderr_console
from safealign.io import atomic_path
from safealign.models.lora import adapter_of, merge_adapter
from safealign.models.presets import PRESETS
from safealign.models.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

console = stderr_console()  # stdout is the CLI's (it prints the metrics JSON)


@dataclass
class TrainingConfig:
    """Options both training loops share (supervised and RL); each stage's config inherits them (flat)."""

    output_dir: str = config_field("runs/train", help="Run directory: config.yaml, logs/, checkpoints/, model/, metrics.json.")
    seed: int = config_field(0, help="Seed of the initial weights, the data order and dropout.")
    num_epochs: float = config_field(3.0, help="Passes over the training data (fractions allowed); ignored when max_steps > 0.")
    max_steps: int = config_field(-1, help="Optimizer steps to run; -1 = num_epochs over the training data.")
    per_device_train_batch_size: int = config_field(8, help="Examples per micro-batch on each process.")
    gradient_accumulation_steps: int = config_field(1, help="Micro-batches per optimizer step (same result as one batch that many times larger).")
    learning_rate: float = config_field(1e-4, help="Peak learning rate of AdamW.")
    weight_decay: float = config_field(0.0, help="AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = config_field(0.9, help="AdamW beta1.")
    adam_beta2: float = config_field(0.95, help="AdamW beta2 (0.95 as in the Safe RLHF reference).")
    adam_epsilon: float = config_field(1e-8, help="AdamW epsilon.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = config_field("cosine", help="Learning-rate decay after the warm-up.")
    warmup_ratio: float = config_field(0.03, help="Fraction of the optimizer steps with a linear warm-up from 0.")
    max_grad_norm: float = config_field(1.0, help="Clip the global gradient norm to this (0 = no clipping; the norm is still logged).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = config_field(
        "auto", help="auto = bf16 where the hardware runs it fast (CUDA bf16, CPU with avx512_bf16/AMX), else no.")
    logging_steps: int = config_field(10, help="Log the training scalars every this many optimizer steps.")
    save_steps: int = config_field(0, help="Checkpoint every this many optimizer steps (0 = at each epoch's end, -1 = never; the final model is always saved).")
    save_total_limit: int = config_field(2, help="Keep this many newest checkpoints (0 = all).")
    resume: str = config_field("", help="'' = start fresh; 'latest' (or 'true') = newest checkpoint in output_dir; or a checkpoint directory.")
    gradient_checkpointing: bool = config_field(False, help="Recompute activations in the backward pass (less memory, ~30% slower).")
    lora_rank: int = config_field(8, help="LoRA adapters (adapter: lora; the RL stages' actor_layout / critic_layout: lora): rank r.")
    lora_alpha: float = config_field(16.0, help="LoRA adapters: α (their update is scaled by α/r).")
    lora_target_modules: list[str] = config_field(
        [], help="LoRA adapters: names of the linear layers that get one (q_proj, v_proj, ...); [] = every linear layer of "
                 "the transformer, not the heads.")


@dataclass
class TrainerState:
    """Where a run is; saved in every checkpoint as trainer_state.json."""

    global_step: int = 0  # optimizer steps done
    steps_per_epoch: int = 0
    total_steps: int = 0
    global_batch_size: int = 0
    num_train_examples: int = 0
    last_eval_step: int = -1
    last_save_step: int = -1
    window: dict[str, float] = dataclasses.field(default_factory=dict)  # sums since the last log line
    log_history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def resolve_mixed_precision(value: str) -> str:
    """'auto' -> 'bf16' on CUDA with bf16, or on a CPU with avx512_bf16/AMX; else 'no'."""
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if _cpu_has_fast_bf16() else "no"


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_only() -> bool:
    accelerator_api = getattr(torch, "accelerator", None)
    return not (accelerator_api.is_available() if accelerator_api is not None else torch.cuda.is_available())


def process_state() -> PartialState:
    """This process's place in the run (rank, world size), initialising torch.distributed under torchrun.

    On a machine without an accelerator Accelerate only starts gloo ranks when told `cpu=True`.
    """
    return PartialState(cpu=_cpu_only())


def make_accelerator(cfg: TrainingConfig, find_unused_parameters: bool = False) -> Accelerator:
    """The run's Accelerator. `find_unused_parameters`: DDP tolerates forwards that leave some trained
    parameters out of the loss (costs a graph traversal per forward; off unless a loop needs it)."""
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    # Each call starts clean even after an earlier stage in this process (another precision, which
    # Accelerate otherwise refuses, or a crash mid-accumulation). The process group (PartialState) is kept.
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    GradientState._reset_state()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              cpu=_cpu_only(), kwargs_handlers=handlers)
    _fsdp_on_cpu(accelerator)
    if accelerator.state.deepspeed_plugin is not None:  # we never prepare the train loader: tell DeepSpeed
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Honour an FSDP request (`ACCELERATE_USE_FSDP=true`, as `accelerate launch --use_fsdp` or a config with
    `distributed_type: FSDP` sets it) on gloo CPU ranks.

    Accelerate 1.x only switches to FSDP when the ranks sit on an accelerator: on CPU processes it keeps
    MULTI_CPU and silently wraps the model in DDP. FSDP2 (`fully_shard`) itself runs on CPU with gloo, so
    the state is promoted as Accelerate does on a GPU (the same plugin, read from the FSDP_* variables).
    FSDP1 is refused on CPU. Measured on two gloo ranks (tiny model, 4 steps): SFT, rm and cm train as under
    DDP (losses within 4e-6, weights within 4e-6) and the saved model reproduces the in-process evaluation;
    checkpoints are gathered and written full (`checkpoint.save_trained`), and rm stopped after step 2 and resumed
    ends bit-identical to the uninterrupted run (tests/training/test_fsdp.py).
    """
    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or not state.device.type == "cpu":
        return
    # MULTI_CPU on a first Accelerator; FSDP without a plugin on a later one in this process (kept by PartialState).
    if not (state.distributed_type == DistributedType.MULTI_CPU
            or (state.distributed_type == DistributedType.FSDP and getattr(state, "fsdp_plugin", None) is None)):
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:  # torch's FSDP1 refuses the CPU device Accelerate gives it (device_id cpu:0 vs cpu)
        raise ConfigError("FSDP on CPU processes needs FSDP2: set FSDP_VERSION=2 (accelerate launch --fsdp_version 2, "
                          "or fsdp_version: 2 in the accelerate config)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # As AcceleratorState.__init__ does: each later AcceleratorState() copies the type back from PartialState.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def checkpoint_save_steps(cfg: TrainingConfig, accelerator: Accelerator) -> int:
    """`cfg.save_steps`, or -1 (no checkpoints, only the final model; a warning says so) where resumable checkpoints
    are not implemented: DeepSpeed, FSDP1, Megatron-LM, XLA. There `resume` is refused. Under FSDP2 checkpoints are
    written full (gathered from the shards, `checkpoint.save_trained`) and resume. Shared by both loops."""
    kind = accelerator.distributed_type
    if not (kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
            or (kind == DistributedType.FSDP and not accelerator.is_fsdp2)):
        return cfg.save_steps
    if cfg.resume:
        raise ConfigError(f"resume is implemented for single-process, DDP and FSDP2 runs, not {accelerator.distributed_type}")
    if cfg.save_steps >= 0 and accelerator.is_main_process:
        console.print(f"[yellow]warning:[/] resumable checkpoints are implemented for single-process, DDP and FSDP2 runs; "
                      f"under {accelerator.distributed_type} only the final model is saved")
    return -1


def make_optimizer(cfg: TrainingConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms).

    The fused kernel (CPU and CUDA) is used when every parameter allows it: on CPU the default
    per-tensor loop took 0.10 s/step against 0.03 s fused on the small preset (bench/README.md).
    DeepSpeed brings its own optimizer implementation, so it gets the plain one to wrap.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
             and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params))
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        fused=fused,
    )


def epoch_batches(num_examples: int, epoch: int, seed: int, batch_size: int, accumulation: int,
                  num_processes: int, process_index: int, start_step: int = 0,
                  lengths: Sequence[int] | None = None, length_group_size: int = 1,
                  sort_within_step: bool = False) -> list[list[int]]:
    """This process's micro-batches (example indices) for the optimizer steps `start_step..` of `epoch`.

    Step s uses perm[s·G : (s+1)·G] (indices wrap round), G = batch_size × accumulation × num_processes;
    micro-batch m of process r is the slice at offset (m·num_processes + r)·batch_size of the step's
    examples. With `lengths`:
    - `length_group_size` > 1 first groups perm by length across steps (`group_by_length`);
    - `sort_within_step` sorts each step's examples by length (longest first) before slicing, so every
      micro-batch holds neighbours in length and pads little. The step's set of examples, and with it the
      gradient of a loss that sums over items (`Step.loss`), is the same as without sorting: a batch of
      32 run as 4 sorted micro-batches of 8 computes the same update on fewer padded tokens.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_examples, generator=generator).tolist()
    global_batch = batch_size * accumulation * num_processes
    if lengths is not None and length_group_size > 1:
        perm = group_by_length(perm, lengths, global_batch, length_group_size, generator)
    steps = math.ceil(num_examples / global_batch)
    batches = []
    for s in range(start_step, steps):
        examples = [perm[(s * global_batch + i) % num_examples] for i in range(global_batch)]
        if lengths is not None and sort_within_step:
            examples.sort(key=lambda i: -lengths[i])  # stable: deterministic on ties
        for m in range(accumulation):
            offset = (m * num_processes + process_index) * batch_size
            batches.append(examples[offset:offset + batch_size])
    return batches


def group_by_length(perm: list[int], lengths: Sequence[int], global_batch: int, group_size: int,
                    generator: torch.Generator) -> list[int]:
    """Reorder a shuffled epoch so that each optimizer step's examples have similar lengths.

    Every run of `group_size` global batches of `perm` is sorted by length and cut into global batches
    again, whose order inside the run is then shuffled (so step lengths do not cycle long → short). Padding
    per batch falls (SafeWorld, 32 per batch: 61% → 91% real tokens at group_size 8) while each example is
    still seen once per epoch and which examples meet in a step stays random up to the run. The
    epoch's last, partial batch stays last, so steps keep their `s·G` offsets.

    A loss averaged over items of equal weight (pairs: reward and cost models) is unchanged in expectation
    (SafeWorld: same gold accuracy, 1.4-1.5x faster). SFT keeps plain shuffling by default: grouped, its
    token-mean loss gave the tokens of short-example steps more weight (eval loss 0.213 vs 0.188 plain; `SFTStep`
    now corrects the weights: 0.203), and batches of one length are also batches of one kind of answer on
    SafeWorld (refusals are short): the grouped SFT policy was less helpful (1.85 vs 2.22) in 139 vs 203 s.
    """
    out: list[int] = []
    span = global_batch * group_size
    for start in range(0, len(perm), span):
        run = sorted(perm[start:start + span], key=lambda i: -lengths[i])  # stable: deterministic on ties
        batches = [run[b:b + global_batch] for b in range(0, len(run), global_batch)]
        full = [b for b in batches if len(b) == global_batch]
        order = torch.randperm(len(full), generator=generator).tolist()
        out.extend(i for k in order for i in full[k])
        out.extend(i for b in batches if len(b) < global_batch for i in b)
    return out


def save_final_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer: Any, path: Path) -> torch.nn.Module:
    """`save_pretrained` (safetensors) + tokenizer into `path`, atomically (a whole directory or nothing).

    A model with a LoRA adapter is saved twice: the adapter alone into the sibling `adapter/` (peft's files), and
    with the adapter merged into `path`. Returns the module saved (merged in place: training is over)."""
    unwrapped = accelerator.unwrap_model(model)
    adapted = adapter_of(unwrapped)
    if adapted is not None:
        if accelerator.is_main_process:
            with atomic_path(path.parent / "adapter") as tmp:
                adapted.save_pretrained(tmp)
        model = unwrapped = merge_adapter(unwrapped)
    state_dict = accelerator.get_state_dict(model)  # gathers shards under DeepSpeed ZeRO-3 / FSDP
    if accelerator.is_main_process:
        with atomic_path(path) as tmp:
            if hasattr(unwrapped, "save_pretrained"):
                bar_was_on = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise
                try:
                    unwrapped.save_pretrained(tmp, state_dict=state_dict)
                finally:
                    if bar_was_on:
                        hf_logging.enable_progress_bar()
            else:  # a plain nn.Module
                tmp.mkdir(parents=True)
                save_model(unwrapped, str(tmp / "model.safetensors"))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return unwrapped


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


class RunLogger:
    """What a run keeps and shows, the same for the supervised and the RL loop (a context manager around the loop).

    Every process appends `{"step": N, prefix + name: value, ...}` to `state.log_history` (saved in the
    checkpoints); the main process also writes each scalar to TensorBoard under output_dir/logs as
    `{group}/{name}` (group: the prefix without its "_", or "train"), prints one console line per log and
    draws the progress bar. A resumed run purges the TensorBoard events after its step.
    """

    def __init__(self, out: Path, state: TrainerState, accelerator: Accelerator, description: str) -> None:
        self.out, self.state, self.description = out, state, description
        self.is_main = accelerator.is_main_process
        self.writer = self.progress = self.task = None

    def __enter__(self) -> RunLogger:
        if self.is_main:
            self.writer = SummaryWriter(str(self.out / "logs"), purge_step=self.state.global_step or None)
            self.progress = progress_bar()
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.state.total_steps,
                                               completed=self.state.global_step, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()

    def log(self, scalars: dict[str, float], prefix: str = "", shown: Sequence[str] | None = None) -> None:
        """Log `scalars` at the current step; the console line shows the `shown` names (default: all) in that order."""
        step = self.state.global_step
        self.state.log_history.append({"step": step, **{f"{prefix}{k}": v for k, v in scalars.items()}})
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"{prefix.rstrip('_') or 'train'}/{name}", value, step)
            if Verbosity.step_lines:
                names = [k for k in shown if k in scalars] if shown is not None else list(scalars)
                line = "  ".join(f"{prefix}{k}={scalars[k]:.4g}" for k in names)
                self.progress.console.print(f"step {step}/{self.state.total_steps}  {line}", highlight=False)

    def advance(self, info: str) -> None:
        """Move the progress bar to the current step, with a short `info` text."""
        if self.progress is not None:
            self.progress.update(self.task, completed=self.state.global_step, info=info)


def continue_trainer_state(saved: TrainerState, fresh: TrainerState, resume_from: Path, accelerator: Accelerator) -> TrainerState:
    """The state to continue with: the checkpoint's progress and history, this run's sizes.

    Warns when the data size or global batch changed: the position is then kept, but the data order after
    resuming differs from an uninterrupted run. Shared by the supervised loop and the RL loop.
    """
    if (saved.global_batch_size, saved.num_train_examples) != (fresh.global_batch_size, fresh.num_train_examples):
        console.print(f"[yellow]warning:[/] {resume_from} was trained with {saved.num_train_examples} examples in global "
                      f"batches of {saved.global_batch_size}; now {fresh.num_train_examples} / {fresh.global_batch_size}: "
                      "the data order after resuming differs from an uninterrupted run")
    state = dataclasses.replace(saved, steps_per_epoch=fresh.steps_per_epoch, total_steps=fresh.total_steps,
                                global_batch_size=fresh.global_batch_size, num_train_examples=fresh.num_train_examples)
    if accelerator.is_main_process:
        console.print(f"resumed from {resume_from} at step {state.global_step}")
    return state


def prepare_tokenizer(tokenizer: str, model: str, output_dir: str, vocab_size: int, resume: str,
                      texts: Callable[[], list[str]]):
    """`tokenizer`, else the model directory's, else (a preset built from scratch) a byte-level BPE trained on
    `texts()` (the stage's training texts, formatted as the model will see them).

    The trained BPE is saved in output_dir/tokenizer by the main process and loaded by every process (so all
    ranks share one vocabulary); a resumed run reuses it.
    """
    if tokenizer or model not in PRESETS:
        return load_tokenizer(tokenizer or model)
    path = Path(output_dir) / "tokenizer"
    state = process_state()
    with state.main_process_first():
        if state.is_main_process and not (resume and path.is_dir()):
            save_tokenizer(train_tokenizer(texts(), vocab_size=vocab_size), path)
    return load_tokenizer(path)
