"""The training loop that every supervised stage shares (SFT, reward model, cost model, DPO).

An algorithm supplies a `Step` (its loss on one micro-batch, how many items a batch holds, how to
evaluate); `train` does everything else, identically for all of them:

- Accelerate: the same code on one CPU, several processes (DDP, gloo on CPU), DeepSpeed or FSDP.
- Data order: a permutation per epoch from `seed + epoch`; optimizer step s of an epoch takes the
  examples perm[s·G : (s+1)·G] (G = per-device batch × accumulation × processes, wrapping round at the
  end of the epoch), so the data position is exactly resumable from the global step alone.
- Gradient accumulation with the loss normalised by the number of items (label tokens for SFT) in the
  *whole* optimizer step, over all micro-batches and processes: accumulation gives exactly the gradient
  of one big batch.
- Clipping, the LR schedule (cosine/linear/constant with warm-up), a rich progress bar, TensorBoard
  scalars under `output_dir/logs`, periodic evaluation and atomic checkpoints (`checkpoint.py`; full tensors under
  FSDP2 too), exact resume, `config.yaml` at the start, `model/` and `metrics.json` at the end (main process writes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, send_to_device, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from safealign.config import ConfigError, config_field, save_config
from safealign.console import stderr_console
from safealign.io import atomic_path, atomic_write_json
from safealign.models.lora import adapter_of, add_lora, merge_adapter
from safealign.training.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)

console = stderr_console()  # stdout is the CLI's (it prints the metrics JSON)


@dataclass
class TrainingConfig:
    """Options of the shared training loop; each stage's config inherits them (flat)."""

    output_dir: str = config_field("runs/train", help="Run directory: config.yaml, logs/, checkpoints/, model/, metrics.json.")
    seed: int = config_field(0, help="Seed of the initial weights, the data order and dropout.")
    num_epochs: float = config_field(3.0, help="Passes over the training data (fractions allowed); ignored when max_steps > 0.")
    max_steps: int = config_field(-1, help="Optimizer steps to run; -1 = num_epochs over the training data.")
    per_device_train_batch_size: int = config_field(8, help="Examples per micro-batch on each process.")
    per_device_eval_batch_size: int = config_field(32, help="Examples per evaluation batch on each process.")
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
    eval_steps: int = config_field(0, help="Evaluate every this many optimizer steps (0 = at each epoch's end, -1 = only at the end).")
    eval_on_start: bool = config_field(False, help="Also evaluate the initial model (reported as initial_eval_*).")
    save_steps: int = config_field(0, help="Checkpoint every this many optimizer steps (0 = at each epoch's end, -1 = never; the final model is always saved).")
    save_total_limit: int = config_field(2, help="Keep this many newest checkpoints (0 = all).")
    resume: str = config_field("", help="'' = start fresh; 'latest' (or 'true') = newest checkpoint in output_dir; or a checkpoint directory.")
    gradient_checkpointing: bool = config_field(False, help="Recompute activations in the backward pass (less memory, ~30% slower).")
    adapter: Literal["none", "lora"] = config_field(
        "none", help="What trains: none = every weight; lora = a LoRA adapter on the frozen weights (a score model's head "
                     "trains in full), saved merged into model/ and alone into adapter/ (one replica per process: not under DeepSpeed/FSDP).")
    lora_rank: int = config_field(8, help="LoRA adapters (adapter: lora; the RL stages' actor_layout / critic_layout: lora): rank r.")
    lora_alpha: float = config_field(16.0, help="LoRA adapters: α (their update is scaled by α/r).")
    lora_target_modules: list[str] = config_field(
        [], help="LoRA adapters: names of the linear layers that get one (q_proj, v_proj, ...); [] = every linear layer of "
                 "the transformer, not the heads.")
    num_workers: int = config_field(0, help="DataLoader worker processes for collation.")
    length_group_size: int = config_field(
        1, help="Group examples of similar length: each run of this many optimizer steps' examples is sorted by length "
                "before batching (less padding); 1 = plain shuffling (SFT's default: grouped batches of one length are of one kind of answer).")
    sort_within_step: bool = config_field(
        True, help="Sort each optimizer step's examples by length before cutting them into micro-batches (less padding when "
                   "gradient_accumulation_steps > 1 or under several processes; the step's examples, hence its gradient, are unchanged).")


class Step:
    """What an algorithm gives the loop. Subclass it and implement `loss` (and usually `evaluate`).

    `loss` returns this micro-batch's *share* of the optimizer step's mean: the sum over its items
    divided by `num_items`, the item count of the whole step (all micro-batches, all processes). Its
    extra metrics follow the same rule (e.g. `correct.sum() / num_items` for an accuracy), so that the
    loop can sum them into exact step values. A loss written as a batch mean converts with
    `mean * count_items(batch) / num_items`.
    """

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], num_items: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def count_items(self, batch: dict[str, Any]) -> int:
        """Items the loss averages over (label tokens for SFT, pairs for a reward model). Default: rows."""
        return len(next(iter(batch.values())))

    def count_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens processed (for tokens/s): the sum of every `*attention_mask` tensor in the batch."""
        return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))

    def example_length(self, example: Any) -> int | None:
        """Padded length this training example brings to a batch (for `length_group_size`); None = unknown."""
        return None

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        """Metrics on the evaluation set (called under `torch.no_grad()`, model in eval mode).

        `loader` is prepared by Accelerate (each process sees its shard; the last batch is padded with
        repeats): reduce per-example values with `accelerator.gather_for_metrics`, which drops them.
        """
        return {}


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


# --------------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------------
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
    from accelerate.utils import FullyShardedDataParallelPlugin

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
                from safetensors.torch import save_model

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
            from torch.utils.tensorboard import SummaryWriter  # imported late: pulls in tensorboard

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


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def train(
    cfg: TrainingConfig,
    model: torch.nn.Module,
    step: Step,
    train_dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, Any]],
    eval_dataset: Sequence[Any] | None = None,
    tokenizer: Any = None,
) -> dict[str, float]:
    """Train `model` with `step` on `train_dataset`; return the final flat metrics (also in metrics.json)."""
    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    num_processes, accumulation = accelerator.num_processes, cfg.gradient_accumulation_steps
    state = TrainerState(global_batch_size=cfg.per_device_train_batch_size * accumulation * num_processes,
                         num_train_examples=len(train_dataset))
    if state.num_train_examples == 0:
        raise ValueError("the training set is empty")
    state.steps_per_epoch = math.ceil(state.num_train_examples / state.global_batch_size)
    state.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * state.steps_per_epoch))

    if cfg.length_group_size < 1:
        raise ConfigError(f"length_group_size must be >= 1, got {cfg.length_group_size}")
    lengths = None
    sort_within_step = cfg.sort_within_step and accumulation * num_processes > 1
    if cfg.length_group_size > 1 or sort_within_step:
        lengths = [step.example_length(example) for example in train_dataset]
        if any(length is None for length in lengths):
            lengths = None
            if accelerator.is_main_process and cfg.length_group_size > 1:
                console.print(f"[yellow]warning:[/] length_group_size={cfg.length_group_size}: {type(step).__name__} "
                              "does not tell example lengths (Step.example_length); shuffling plainly")
    num_parameters = sum(p.numel() for p in model.parameters())  # before any adapter: the saved (merged) model's count
    if cfg.adapter == "lora":
        if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ConfigError(f"adapter: lora keeps one replica per process (DDP), not under {accelerator.distributed_type.value}")
        if cfg.lora_rank < 1 or cfg.lora_alpha <= 0:
            raise ConfigError(f"adapter: lora needs lora_rank >= 1 and lora_alpha > 0, got {cfg.lora_rank} and {cfg.lora_alpha}")
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules or None)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_trained_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(cfg, model)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * state.total_steps),
                              num_training_steps=state.total_steps)  # stepped by us once per optimizer step
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None
    if eval_dataset is not None and len(eval_dataset) > 0:
        eval_loader = accelerator.prepare(DataLoader(
            eval_dataset, batch_size=cfg.per_device_eval_batch_size, shuffle=False, collate_fn=collate_fn,
            num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed)))

    save_steps = checkpoint_save_steps(cfg, accelerator)
    resume_from = resolve_resume(out, cfg.resume)
    if resume_from is not None:
        saved = TrainerState(**load_checkpoint(resume_from, accelerator, model, optimizer, scheduler))
        state = continue_trainer_state(saved, state, resume_from, accelerator)
    elif cfg.resume and accelerator.is_main_process:
        console.print(f"resume={cfg.resume!r}: no checkpoint in {out / 'checkpoints'}, starting fresh")

    logger = RunLogger(out, state, accelerator, "train")

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in step.evaluate(model, eval_loader, accelerator).items()}
        model.train()
        state.last_eval_step = state.global_step
        logger.log(metrics, "eval_")

    def save() -> None:
        save_checkpoint(checkpoint_dir(out, state.global_step), accelerator, model, optimizer, scheduler, dataclasses.asdict(state))
        if accelerator.is_main_process:
            rotate_checkpoints(out, cfg.save_total_limit)
        state.last_save_step = state.global_step

    run_tokens, run_train_time = 0.0, 0.0
    run_steps = 0  # optimizer steps taken by this process run (after a resume too)
    with logger:
        if eval_loader is not None and cfg.eval_on_start and state.global_step == 0:
            evaluate()
        model.train()
        while state.global_step < state.total_steps:
            epoch, first = divmod(state.global_step, state.steps_per_epoch)
            loader = DataLoader(
                train_dataset, collate_fn=collate_fn, num_workers=cfg.num_workers,
                batch_sampler=epoch_batches(state.num_train_examples, epoch, cfg.seed, cfg.per_device_train_batch_size,
                                            accumulation, num_processes, accelerator.process_index, first,
                                            lengths, cfg.length_group_size, sort_within_step),
                generator=torch.Generator().manual_seed(cfg.seed + epoch),  # never draw from the global RNG
            )
            micro_batches = iter(loader)
            for _ in range(first, state.steps_per_epoch):
                if state.global_step >= state.total_steps:
                    break
                tick = time.perf_counter()
                batches = [send_to_device(next(micro_batches), accelerator.device) for _ in range(accumulation)]
                scalars = _optimizer_step(accelerator, model, optimizer, scheduler, step, batches, cfg.max_grad_norm,
                                          check_gradients=run_steps == 0)
                run_steps += 1
                state.global_step += 1
                elapsed = time.perf_counter() - tick
                run_tokens += scalars["tokens"]
                run_train_time += elapsed
                for name, value in {**scalars, "time": elapsed, "steps": 1.0}.items():
                    state.window[name] = state.window.get(name, 0.0) + value
                end_of_epoch = state.global_step % state.steps_per_epoch == 0
                if state.global_step % max(cfg.logging_steps, 1) == 0 or state.global_step == state.total_steps:
                    window, state.window = state.window, {}
                    n = window.pop("steps")
                    tokens, seconds = window.pop("tokens"), window.pop("time")
                    window.pop("lr")
                    logged = {k: v / n for k, v in window.items()}
                    logged.update(lr=scalars["lr"], epoch=state.global_step / state.steps_per_epoch,
                                  tokens_per_second=tokens / max(seconds, 1e-9))
                    logger.log(logged)
                if eval_loader is not None and ((cfg.eval_steps > 0 and state.global_step % cfg.eval_steps == 0)
                                                or (cfg.eval_steps == 0 and end_of_epoch)):
                    evaluate()
                if (save_steps > 0 and state.global_step % save_steps == 0) or (save_steps == 0 and end_of_epoch):
                    save()
                logger.advance(f"loss {scalars['loss']:.4f}")
        if eval_loader is not None and state.last_eval_step != state.global_step:
            evaluate()
        if save_steps >= 0 and state.last_save_step != state.global_step:
            save()

    save_final_model(accelerator, model, tokenizer, out / "model")
    final: dict[str, float] = {"train_loss": float("nan")}
    for entry in state.log_history:  # the last logged loss and eval metrics (a resumed run's history included)
        for key, value in entry.items():
            if key == "loss":
                final["train_loss"] = value
            elif key.startswith("eval_"):  # the evaluation before training is reported as initial_eval_*
                final[f"initial_{key}" if entry["step"] == 0 else key] = value
    final.update(
        global_step=state.global_step,
        epoch=state.global_step / state.steps_per_epoch,
        tokens_per_second=run_tokens / max(run_train_time, 1e-9),
        num_parameters=num_parameters,
        num_trained_parameters=num_trained_parameters,
        runtime_s=time.perf_counter() - started,
    )
    if accelerator.is_main_process:
        atomic_write_json(out / "metrics.json", final)
    return final


def _optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler, step: Step,
                    batches: list[dict[str, Any]], max_grad_norm: float, check_gradients: bool = False) -> dict[str, float]:
    """One optimizer step over this process's micro-batches; returns step scalars reduced over processes.

    `check_gradients` (the run's first step): stop if no trained weight got a gradient. A wrapper that loses the
    graph trains nothing and says nothing: FSDP2 on torch < 2.13 did so with a dataclass output (score_model.py).
    """
    device = accelerator.device
    counts = torch.tensor([sum(step.count_items(b) for b in batches), sum(step.count_tokens(b) for b in batches)],
                          dtype=torch.float64, device=device)
    num_items, num_tokens = accelerator.reduce(counts, "sum").unbind()  # whole step: all micro-batches, all processes
    num_items = num_items.to(torch.float32)
    # Accelerate divides the loss by the accumulation steps and DDP averages gradients over processes:
    # undo both so the gradient is Σ(item losses) / num_items over the whole step.
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    for batch in batches:
        with accelerator.accumulate(model):
            loss, metrics = step.loss(model, batch, num_items)
            accelerator.backward(loss * scale)
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if accelerator.sync_gradients:
                if check_gradients and accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed keeps its own
                    if all(p.grad is None for p in model.parameters() if p.requires_grad):
                        raise RuntimeError(f"no trained weight received a gradient in the first step ({accelerator.distributed_type.value}): "
                                           "the loss is not connected to the model's weights, so training would change nothing")
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow
        scheduler.step()
    names = list(sums)
    reduced = accelerator.reduce(torch.stack([sums[n] for n in names]), "sum").tolist()
    scalars = dict(zip(names, reduced))
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    scalars.update(tokens=float(num_tokens), lr=float(lr))
    return scalars
