"""The training loop that every supervised stage shares (SFT, the reward and the cost model).

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from safealign.config import ConfigError, config_field, save_config
from safealign.io import atomic_write_json
from safealign.models.lora import add_lora
from safealign.training.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from safealign.training.common import (
    RunLogger,
    TrainerState,
    TrainingConfig,
    checkpoint_save_steps,
    console,
    continue_trainer_state,
    epoch_batches,
    make_accelerator,
    make_optimizer,
    save_final_model,
)


@dataclass
class SupervisedConfig(TrainingConfig):
    """Options of the supervised loop (SFT, reward and cost models): evaluation, data loading, adapters."""

    per_device_eval_batch_size: int = config_field(32, help="Examples per evaluation batch on each process.")
    eval_steps: int = config_field(0, help="Evaluate every this many optimizer steps (0 = at each epoch's end, -1 = only at the end).")
    eval_on_start: bool = config_field(False, help="Also evaluate the initial model (reported as initial_eval_*).")
    adapter: Literal["none", "lora"] = config_field(
        "none", help="What trains: none = every weight; lora = a LoRA adapter on the frozen weights (a score model's head "
                     "trains in full), saved merged into model/ and alone into adapter/ (one replica per process: not under DeepSpeed/FSDP).")
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


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def train(
    cfg: SupervisedConfig,
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
