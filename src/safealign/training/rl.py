"""The RL loop that PPO, PPO-Lagrangian and reward shaping share (docs/maths.md §3–§5). The maths of each update and
the order of its parts are the algorithm's (`algorithms/ppo.py`, `algorithms/ppo_lag.py`, ...); this file is the
machinery around them.

One *step* is one rollout batch and the algorithm's update on it:

1. prompts: step s takes its prompts the way the supervised loop takes examples (`epoch_batches`: a
   seeded permutation per epoch), so the data position follows from the step number alone;
2. rollout: `models.generation.generate_tokens` samples `samples_per_prompt` responses per prompt
   from the actor (left padding, position ids from the mask, EOS kept), with a generator seeded by
   (seed, step, rank): a resumed run samples exactly what the uninterrupted one did;
3. `algorithm.train_step(run, batch, step)`: the whole update, in the algorithm's file: the experience without
   gradients (log-probs, scores, values, advantages), any multiplier update, and the optimizer steps, which go
   through `RLRun.update`: `ppo_epochs` passes over the rollout in shuffled mini-batches (P3O: of whole pairs) of
   `per_device_train_batch_size` × `gradient_accumulation_steps` rows per process, each mini-batch one optimizer
   step of every trained model, the loss given by the algorithm as terms backpropagated one by one (one model's
   activations alive at a time), with a PTX micro-batch (`ptx_data`) for the algorithm to use;
4. logs every `logging_steps` (TensorBoard under output_dir/logs, console), sample responses every
   `sample_steps` (output_dir/samples.jsonl), checkpoints every `save_steps`; at the end output_dir/model
   (the actor, with the tokenizer) and metrics.json.

Checkpoints (atomic, no pickle; `checkpoint.save_parts_checkpoint`): `actor`, `{stream}_critic` weights (the
trained ones) + optimizer + scheduler, `algorithm_state` (λ and its cost window), every rank's RNG, and
`trainer_state.json` (step, log history). `resume: latest` continues exactly, in every layout, and under FSDP2 (full
tensors on disk, as under DDP). The models, layouts and sharding: `training.rl_setup`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from safealign.config import save_config
from safealign.data.collate import collate_sft
from safealign.data.schema import PromptRecord
from safealign.io import atomic_write_json, atomic_write_jsonl
from safealign.models.actor_critic import causal_lm
from safealign.models.generation import RolloutBatch, SamplingConfig, decode_responses, generate_tokens
from safealign.models.tokenizer import load_tokenizer
from safealign.training.checkpoint import (
    checkpoint_dir,
    load_parts_checkpoint,
    resolve_resume,
    rotate_checkpoints,
    save_parts_checkpoint,
)
from safealign.training.common import (
    RunLogger,
    TrainerState,
    checkpoint_save_steps,
    console,
    continue_trainer_state,
    epoch_batches,
    make_accelerator,
    save_final_model,
)
from safealign.training.rl_setup import (
    RLConfig,
    RLModels,
    build_models,
    check_paths,
    check_sharding,
    clip_gradients,
    prepare_training,
    prompt_token_ids,
    ptx_examples,
)

Parts = dict[str, tuple[nn.Module, Any, Any]]  # name -> (trained model, its optimizer, its scheduler)
Losses = Callable[[RLModels, "Experience", "dict[str, torch.Tensor] | None", "dict[str, torch.Tensor]"], Iterator[torch.Tensor]]


@dataclass
class Experience:
    """A rollout batch on this process with everything the updates need; every tensor has B rows.

    Shared keys: sequences, attention_mask, position_ids (B, P + T); response_mask, log_probs (the
    actor's at sampling time), ref_log_probs, advantages (the actor's) (B, T); ended_with_eos (B,); prompt_index
    (B,), each row's prompt in the run's prompt list (set by the loop).
    The algorithm adds per-stream tensors ({stream}_values, _returns, _advantages (B, T)) and the
    score models' end scores (scores_{name} (B,)).
    """

    tensors: dict[str, torch.Tensor]
    prompt_length: int  # P: responses start at this column

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value

    @property
    def num_rows(self) -> int:
        return len(self.tensors["sequences"])

    def select(self, rows: torch.Tensor) -> Experience:
        return Experience({k: v[rows] for k, v in self.tensors.items()}, self.prompt_length)

    @classmethod
    def from_rollout(cls, rollout: RolloutBatch) -> Experience:
        return cls({"sequences": rollout.sequences, "attention_mask": rollout.attention_mask,
                    "position_ids": rollout.position_ids, "response_mask": rollout.response_mask,
                    "ended_with_eos": rollout.ended_with_eos}, rollout.prompt_length)



class RLAlgorithm:
    """What an algorithm gives `train_rl`: the models it needs and its whole update of one rollout batch."""

    streams: tuple[str, ...] = ()

    def score_model_paths(self) -> dict[str, str]:
        """Frozen score models to load: name -> directory."""
        raise NotImplementedError

    def critic_paths(self) -> dict[str, str]:
        """Critic of each stream -> the directory it is initialised from ({} for a critic-free method)."""
        raise NotImplementedError

    def start(self, prompts: list[PromptRecord]) -> None:
        """The run's prompts, before training or a resume (a row's prompt is prompts[batch["prompt_index"]])."""

    def train_step(self, run: RLRun, batch: Experience, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """The update of one rollout batch (models in eval mode on entry): returns this process's scalars (averaged
        over processes by the loop) and scalars already identical on every rank (λ, J_C)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class RLRun:
    """What an algorithm's `train_step` works with: the run's config, Accelerator, models and their optimizers, and
    `update`, the optimizer steps over a rollout batch."""

    cfg: RLConfig
    accelerator: Accelerator
    models: RLModels
    parts: Parts  # what a checkpoint holds: the actor, each critic
    ptx_examples: list  # tokenised SFT examples of the PTX loss ([] when off)
    pad_token_id: int
    updates_per_step: int  # optimizer steps per rollout batch (every step the same number)

    def update(self, batch: Experience, step: int, losses: Losses, group_size: int = 1) -> dict[str, float]:
        """`ppo_epochs` shuffled passes of mini-batch updates over `batch`; returns the mean diagnostics.

        `losses(models, micro_batch, ptx_batch, metrics)` yields the micro-batch's loss as terms, each backpropagated
        before the next is computed (one model's activations alive at a time); `ptx_batch` is this micro-batch's share
        of the PTX data (None without `ptx_data`), detached diagnostics go into `metrics`. Each term is a masked mean:
        Accelerate divides it by the accumulation steps and DDP averages over processes (equal row counts), so the
        gradient is that of the mini-batch's masked mean. `group_size` > 1 (P3O: 2) keeps each group of that many
        consecutive rows (the answers of one prompt) together, in order, in one micro-batch (`shuffled_rows`).
        """
        cfg, accelerator, models = self.cfg, self.accelerator, self.models
        if cfg.per_device_train_batch_size % group_size or batch.num_rows % group_size:
            raise ValueError(f"a micro-batch of {cfg.per_device_train_batch_size} rows out of {batch.num_rows} cannot hold "
                             f"whole groups of {group_size} rows")
        started = time.perf_counter()
        models.actor.train()
        for critic in models.critics.values():
            critic.train()
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # never the global RNG: exact resume
        micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        trained = [model for model, _, _ in self.parts.values()]
        sums: dict[str, float] = {}
        count, update = 0, 0
        for _ in range(cfg.ppo_epochs):
            order = shuffled_rows(batch.num_rows, group_size, generator)
            for start in range(0, batch.num_rows, micro):
                rows = order[start:start + micro].to(batch["sequences"].device)
                ptx_batch = None
                if self.ptx_examples:
                    ptx_batch = self._ptx_micro_batch(step * self.updates_per_step + update, (start // micro) % accumulation)
                with accelerator.accumulate(*trained):
                    metrics: dict[str, torch.Tensor] = {}
                    for loss in losses(models, batch.select(rows), ptx_batch, metrics):
                        accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        for name, (model, _, _) in self.parts.items():
                            norm = clip_gradients(accelerator, model, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                            metrics[f"{name}_grad_norm"] = torch.as_tensor(norm).float() * accumulation  # averaged below
                    for _, optimizer, _ in self.parts.values():
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    update += 1
                    if not accelerator.optimizer_step_was_skipped:
                        for _, _, scheduler in self.parts.values():
                            scheduler.step()
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                count += 1
        return {**{name: value / count for name, value in sums.items()}, "time_update": time.perf_counter() - started}

    def _ptx_micro_batch(self, update: int, micro_index: int) -> dict[str, torch.Tensor]:
        """Micro-batch `micro_index` of PTX optimizer step `update` on this process (seeded order per pass)."""
        cfg, accelerator, examples = self.cfg, self.accelerator, self.ptx_examples
        per_pass = math.ceil(len(examples) / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                                              * accelerator.num_processes))
        epoch, position = divmod(update, per_pass)
        micro_batches = epoch_batches(len(examples), epoch, cfg.seed, cfg.per_device_train_batch_size,
                                      cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index,
                                      position)
        batch = collate_sft([examples[i] for i in micro_batches[micro_index]], self.pad_token_id)
        return {k: v.to(accelerator.device) for k, v in batch.items()}


def shuffled_rows(num_rows: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of the rows in which each group of `group_size` consecutive rows stays together and in order:
    the groups are permuted, then expanded to their rows. (num_rows,). Group size 1 is exactly
    torch.randperm(num_rows, generator=generator), the draw PPO and GRPO have always made."""
    if group_size == 1:
        return torch.randperm(num_rows, generator=generator)
    groups = torch.randperm(num_rows // group_size, generator=generator)  # size = (G,)
    return (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()  # size = (G · group_size,)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def train_rl(cfg: RLConfig, algorithm: RLAlgorithm) -> dict[str, Any]:
    """Run `algorithm` with the RL loop; returns the final flat metrics (also written to metrics.json)."""
    started = time.perf_counter()
    score_paths = algorithm.score_model_paths()
    critic_paths = {} if cfg.critic_layout == "shared_backbone" else algorithm.critic_paths()
    check_paths(cfg, score_paths, critic_paths)
    rows_per_rollout = cfg.per_device_prompt_batch_size * cfg.samples_per_prompt
    rows_per_update = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps

    use_ptx = bool(cfg.ptx_data) and cfg.ptx_coeff > 0
    # DDP: the PTX forward of an actor with value heads leaves the heads out of its loss.
    accelerator = make_accelerator(cfg, find_unused_parameters=use_ptx and cfg.critic_layout == "shared_backbone")
    check_sharding(cfg, accelerator)
    save_steps = checkpoint_save_steps(cfg, accelerator)
    set_seed(cfg.seed)
    device = accelerator.device
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.actor_model)
    prompts, prompt_ids = prompt_token_ids(cfg, tokenizer)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, num_samples=cfg.samples_per_prompt)
    # Before the models load: with ptx_max_cost a copy of the cost model scores the PTX rows.
    ptx, ptx_kept = ptx_examples(cfg, tokenizer, score_paths.get("cost", ""), device) if use_ptx else ([], {})
    if ptx_kept and accelerator.is_main_process:
        console.print(f"PTX: {ptx_kept['ptx_rows_kept']:.0f} of {ptx_kept['ptx_rows']:.0f} rows of {cfg.ptx_data} have "
                      f"cost <= {cfg.ptx_max_cost}")
    # shared_backbone: the value heads sit on the actor, one per stream (they load no directory)
    models = build_models(cfg, score_paths, algorithm.critic_paths(), tokenizer, accelerator)

    # Schedule: steps are rollouts; each makes ppo_epochs × (rows / rows_per_update) optimizer steps.
    state = TrainerState(global_batch_size=cfg.per_device_prompt_batch_size * accelerator.num_processes,
                         num_train_examples=len(prompts))
    state.steps_per_epoch = math.ceil(len(prompts) / state.global_batch_size)
    state.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * state.steps_per_epoch))
    updates_per_step = cfg.ppo_epochs * rows_per_rollout // rows_per_update
    parts = prepare_training(cfg, accelerator, models, state.total_steps * updates_per_step)
    schedulers = {name: scheduler for name, (_, _, scheduler) in parts.items()}
    run = RLRun(cfg, accelerator, models, parts, ptx, tokenizer.pad_token_id, updates_per_step)

    algorithm.start(prompts)
    # Resume.
    resume_from = resolve_resume(out, cfg.resume)
    if resume_from is not None:
        algorithm_state, saved = load_parts_checkpoint(resume_from, accelerator, parts)
        algorithm.load_state_dict(algorithm_state)
        state = continue_trainer_state(TrainerState(**saved), state, resume_from, accelerator)
    elif cfg.resume and accelerator.is_main_process:
        console.print(f"resume={cfg.resume!r}: no checkpoint in {out / 'checkpoints'}, starting fresh")

    logger = RunLogger(out, state, accelerator, "rl")
    samples_file = out / "samples.jsonl"
    sample_rows: list[dict] = []
    if accelerator.is_main_process and samples_file.is_file():  # keep what the resumed-from steps wrote
        sample_rows = [r for r in map(json.loads, samples_file.read_text(encoding="utf-8").splitlines())
                       if r["step"] <= state.global_step]

    def save() -> None:
        save_parts_checkpoint(checkpoint_dir(out, state.global_step), accelerator, parts, algorithm.state_dict(),
                              dataclasses.asdict(state))
        if accelerator.is_main_process:
            rotate_checkpoints(out, cfg.save_total_limit)
        state.last_save_step = state.global_step

    run_samples, run_time = 0, 0.0
    with logger:
        while state.global_step < state.total_steps:
            step = state.global_step
            epoch, position = divmod(step, state.steps_per_epoch)
            tick = time.perf_counter()
            indices = epoch_batches(len(prompts), epoch, cfg.seed, cfg.per_device_prompt_batch_size, 1,
                                    accelerator.num_processes, accelerator.process_index, position)[0]
            generator = torch.Generator(device=device).manual_seed(
                (cfg.seed * 1_000_003 + step) * 4099 + accelerator.process_index)
            rollout = generate_tokens(causal_lm(accelerator.unwrap_model(models.actor)), tokenizer,
                                      [prompt_ids[i] for i in indices], sampling, generator)
            batch = Experience.from_rollout(rollout)
            batch["prompt_index"] = torch.tensor(indices, device=device).repeat_interleave(cfg.samples_per_prompt)  # (B,)
            time_generation = time.perf_counter() - tick

            # the rates this step's updates start with: actor_lr, {stream}_critic_lr
            learning_rates = {f"{name}_lr": scheduler.get_last_lr()[0] for name, scheduler in schedulers.items()}
            models.actor.eval()
            for critic in models.critics.values():
                critic.eval()
            scalars, shared = algorithm.train_step(run, batch, step)
            scalars.update(learning_rates)

            if accelerator.is_main_process and cfg.sample_steps > 0 and (step + 1) % cfg.sample_steps == 0:
                sample_rows += _sample_rows(tokenizer, rollout, batch, [prompts[i].prompt for i in indices],
                                            cfg.samples_per_prompt, cfg.num_logged_samples, step + 1)
                atomic_write_jsonl(samples_file, sample_rows)

            state.global_step += 1
            elapsed = time.perf_counter() - tick
            rows = rows_per_rollout * accelerator.num_processes
            run_samples += rows
            run_time += elapsed
            scalars.update(time_generation=time_generation,
                           time_experience=elapsed - time_generation - scalars.get("time_update", 0.0),
                           time_step=elapsed, samples_per_second=rows / max(elapsed, 1e-9))
            names = sorted(scalars)
            reduced = accelerator.reduce(torch.tensor([scalars[n] for n in names], dtype=torch.float64, device=device), "mean")
            logged = {**dict(zip(names, reduced.tolist())), **shared, "epoch": state.global_step / state.steps_per_epoch}
            if state.global_step % max(cfg.logging_steps, 1) == 0 or state.global_step == state.total_steps:
                logger.log(logged, shown=_CONSOLE_KEYS)
            end_of_epoch = state.global_step % state.steps_per_epoch == 0
            if (save_steps > 0 and state.global_step % save_steps == 0) or (save_steps == 0 and end_of_epoch):
                save()
            logger.advance("  ".join(f"{k} {logged[k]:.3g}" for k in ("reward", "cost", "lagrange_multiplier") if k in logged))
        if save_steps >= 0 and state.last_save_step != state.global_step:
            save()

    policy = causal_lm(accelerator.unwrap_model(models.actor))
    num_trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    policy = save_final_model(accelerator, policy, tokenizer, out / "model")  # merged (and adapter/) for a LoRA actor
    final: dict[str, Any] = {}
    for entry in state.log_history:  # the last value of every scalar (also when resumed)
        final.update({k: v for k, v in entry.items() if k != "step"})
    final.update(global_step=state.global_step, samples_per_second=run_samples / max(run_time, 1e-9),
                 num_parameters=sum(p.numel() for p in policy.parameters()), num_trained_actor_parameters=num_trained,
                 runtime_s=time.perf_counter() - started, **ptx_kept)
    if accelerator.is_main_process:
        atomic_write_json(out / "metrics.json", final)
    return final


_CONSOLE_KEYS = ("reward", "cost", "episode_cost", "lagrange_multiplier", "kl", "actor_loss", "reward_critic_loss",
                 "cost_critic_loss", "response_length", "samples_per_second")


def _sample_rows(tokenizer: Any, rollout: RolloutBatch, batch: Experience, prompts: list[str], samples_per_prompt: int,
                 count: int, step: int) -> list[dict[str, Any]]:
    """The first `count` rows of the rollout: prompt, response, the score models' end scores, length."""
    texts = decode_responses(tokenizer, rollout)
    lengths = rollout.response_lengths.tolist()
    scores = {k.removeprefix("scores_"): v.tolist() for k, v in batch.tensors.items() if k.startswith("scores_")}
    rows = []
    for i in range(min(count, len(texts))):
        rows.append({"step": step, "prompt": prompts[i // samples_per_prompt], "response": texts[i],
                     **{name: values[i] for name, values in scores.items()},
                     "response_tokens": lengths[i], "ended_with_eos": bool(rollout.ended_with_eos[i])})
    return rows
