"""The loop that PPO, PPO-Lagrangian and reward shaping share (spec §3–§5). The maths is the algorithm's
(`ppo.PPOStep` and its subclasses); this file is the machinery around it.

One *step* is one rollout batch and the PPO updates on it:

1. prompts: step s takes its prompts the way the supervised engine takes examples (`epoch_batches`: a
   seeded permutation per epoch), so the data position follows from the step number alone;
2. rollout: `evaluation.generation.generate_tokens` samples `samples_per_prompt` responses per prompt
   from the actor (left padding, position ids from the mask, EOS kept), with a generator seeded by
   (seed, step, rank): a resumed run samples exactly what the uninterrupted one did;
3. experience, without gradients (`algorithm.make_experience`): log-probs of actor and reference, end
   scores of the frozen score models, the critics' values, per-token signals, GAE;
4. `algorithm.before_update` (PPO-Lagrangian updates λ here, once per rollout batch);
5. `ppo_epochs` passes over the rollout in shuffled mini-batches of `per_device_train_batch_size` ×
   `gradient_accumulation_steps` rows per process; each mini-batch is one optimizer step of the actor
   and of every critic (`algorithm.loss`: one backward per trained model, so that only one model's
   activations are alive at a time), plus the optional PTX loss (`ptx_coeff` × LM loss on SFT data);
6. logs every `logging_steps` (TensorBoard under output_dir/logs, console), sample responses every
   `sample_steps` (output_dir/samples.jsonl), checkpoints every `save_steps`; at the end output_dir/model
   (the actor, with the tokenizer) and metrics.json.

Checkpoints (atomic, no pickle; the layout of `training.checkpoint` with one file set per trained model):
`actor`, `{stream}_critic` weights (the trained ones) + optimizer + scheduler, `algorithm_state` (λ and its
cost window), every rank's RNG, and `trainer_state.json` (step, log history). `resume: latest` continues
exactly, in every critic layout, and under FSDP2 (full tensors on disk, as under DDP).

Critic layouts (`critic_layout`; peak memory of each: bench/bench_ppo_memory.py):
- `full` (default, the reference's): each critic a full copy of its score model with its own AdamW;
- `shared_backbone`: one value head per stream on the actor's backbone (`models.actor_critic`): one forward
  gives log-probs and both streams' values, and one optimizer step minimises L_actor + c·Σ_s L_V^s
  (c = `value_loss_coeff`), so the value loss also trains the actor's backbone. The heads are fitted by
  least squares on the first rollout before any update (`fit_value_heads`), so that V starts as a baseline;
- `lora`: each critic a LoRA adapter + head on its frozen score model (`score_model.lora_critic`); the
  frozen score is the same backbone with the adapter disabled. Checkpoints hold the adapters and heads only.
  The critic starts equal to its score model, as in `full`; a LoRA critic usually wants a larger
  `critic_learning_rate` than a full one.

The reference model and the frozen score models run in eval mode without gradients, in `frozen_dtype`
(bf16 halves their memory). Dropout is switched off in the actor, as in the critics, so that the PPO
ratio is exactly 1 before the first update. Score models must share the actor's tokenizer (they read
its token ids). Supported: one process, several with DDP (torchrun / accelerate launch), or FSDP2 (below); under
DeepSpeed or FSDP1 the stage stops with a ConfigError before loading anything.

FSDP2 (`ACCELERATE_USE_FSDP=true FSDP_VERSION=2`; full actor and critic layouts only, bf16 or fp32): Accelerate's
FSDP2 `prepare` takes one model, so `shard_models` applies torch's `fully_shard` to every model itself, frozen ones
included (each decoder block, then the root), and the optimizers are built on the shards; gradients are clipped by
`clip_gradients` (DTensor). The rollout decodes in lock-step across ranks (`generate_tokens`); every other forward
of a sharded model (log-probs, values, scores, updates, PTX) is made the same number of times on every rank, as the
per-rank row counts are equal. Checkpoints and the final actor are gathered from the shards and written full, the
files a DDP run writes (`checkpoint.save_trained`); on resume every rank reads them and keeps its shard
(`checkpoint.load_trained`). Run on two gloo CPU ranks with tiny models in fp32: PPO-Lag gave DDP's samples, J_C and
λ, and its actor within 1.8e-7; stopped after checkpoint step-2 and resumed, the uninterrupted run's λ, J_C and
actor to the last bit (tests/algorithms/test_ppo_lag.py); bf16 only as a 2-step smoke run; not yet run on GPUs.

Actor layouts (`actor_layout`): `full` (default) trains every weight of the actor next to a frozen copy, the
reference; `lora` trains a LoRA adapter on the SFT model and uses the same network with the adapter disabled as
the reference (`models.lora`): the policy's weights are held once, and `model/` is saved merged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from safealign.algorithms.losses import sft_loss
from safealign.config import ConfigError, config_field, save_config
from safealign.data.formatting import tokenize_prompt, tokenize_prompt_response
from safealign.data.loading import load_prompts, load_sft
from safealign.evaluation.generation import RolloutBatch, SamplingConfig, decode_responses, generate_tokens
from safealign.io import atomic_write_json, atomic_write_jsonl
from safealign.models.actor_critic import ActorCritic, causal_lm, ridge_solution
from safealign.models.lora import AdapterDisabledPolicy, lora_policy
from safealign.models.presets import PRESETS, build_causal_lm
from safealign.models.score_model import ScoreModel, build_score_model, load_score_model, lora_critic
from safealign.models.tokenizer import load_tokenizer
from safealign.training.checkpoint import (
    atomic_checkpoint,
    checkpoint_dir,
    load_state_tree,
    load_trained,
    resolve_resume,
    restore_rng_state,
    rotate_checkpoints,
    save_state_tree,
    save_trained,
    write_json,
)
from safealign.training.engine import (
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
class RLConfig(TrainingConfig):
    """Options of the RL loop (rollout, updates, logging); each algorithm's config adds its maths.

    A step is one rollout batch and its PPO updates: `max_steps` counts rollouts, `num_epochs` passes
    over the prompts. `per_device_train_batch_size` is the mini-batch (rows) of one update.
    """

    output_dir: str = config_field("runs/ppo", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    actor_model: str = config_field("runs/sft/model", help="Initial policy: the SFT model directory. The frozen reference is a copy of it.")
    tokenizer: str = config_field("", help="Tokenizer directory; '' = the actor's. Score models must use the same vocabulary.")
    prompt_data: str = config_field("", help="Prompts for the rollouts: a prompt file (SafeWorld prompts/train.jsonl), or an SFT/preference file's prompts.")
    max_prompt_length: int = config_field(128, help="Prompt tokens kept (the end of a longer prompt, next to the response).")
    num_epochs: float = config_field(1.0, help="Passes over the prompts (fractions allowed); ignored when max_steps > 0.")
    max_steps: int = config_field(-1, help="Steps (rollout batches, each with its PPO updates) to run; -1 = num_epochs over the prompts.")
    gradient_accumulation_steps: int = config_field(1, help="Micro-batches per PPO update (optimizer step); a mini-batch is per_device_train_batch_size × this rows.")
    per_device_eval_batch_size: int = config_field(32, help="Unused by the RL stages (kept for the shared options).")
    eval_steps: int = config_field(0, help="Unused by the RL stages (evaluate the saved actor with `safealign evaluate`).")
    eval_on_start: bool = config_field(False, help="Unused by the RL stages.")
    num_workers: int = config_field(0, help="Unused by the RL stages.")
    length_group_size: int = config_field(1, help="Unused by the RL stages (PTX batches are shuffled plainly).")
    sort_within_step: bool = config_field(False, help="Unused by the RL stages (PTX micro-batches are not sorted by length).")
    per_device_prompt_batch_size: int = config_field(
        32, help="Prompts per rollout on each process (32: the rollout of the SafeWorld results in docs/results.md and of the benchmark).")
    samples_per_prompt: int = config_field(1, help="Responses sampled per prompt (rows per rollout = prompts × this).")
    max_new_tokens: int = config_field(64, help="Most response tokens per rollout row (EOS included).")
    temperature: float = config_field(1.0, help="Sampling temperature of the rollouts (1 = the policy's own distribution, as PPO assumes).")
    top_k: int = config_field(0, help="Rollouts sample from the k most likely tokens only (0 = off).")
    top_p: float = config_field(1.0, help="Rollouts sample from the nucleus of this probability (1 = off).")
    ppo_epochs: int = config_field(1, help="Passes of PPO updates over each rollout batch (the reference's update_iters).")
    per_device_train_batch_size: int = config_field(16, help="Rollout rows per micro-batch of an update on each process.")
    learning_rate: float = config_field(
        2e-4, help="Actor learning rate. 2e-4 for the tiny preset (docs/results.md: 1e-4 / 5e-5 left 10% / 13% harmful after 60 steps); the reference's 1e-5 is for a 7B model.")
    weight_decay: float = config_field(0.01, help="Actor AdamW weight decay (reference 0.01).")
    critic_learning_rate: float = config_field(
        5e-5, help="Critic learning rate. 5e-5 suits the tiny preset; the reference's 5e-6 is for a 7B model.")
    critic_weight_decay: float = config_field(0.0, help="Critic AdamW weight decay (reference 0.0).")
    critic_lr_scheduler: Literal["cosine", "linear", "constant"] = config_field("constant", help="Critic learning-rate decay after the warm-up (reference constant).")
    ptx_data: str = config_field("", help="SFT file for the PTX loss (a language-modelling loss mixed into the actor objective); '' = none.")
    ptx_coeff: float = config_field(16.0, help="γ_ptx: weight of the PTX loss (reference 16).")
    ptx_max_length: int = config_field(256, help="Tokens per PTX example (prompt + response + EOS).")
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = config_field(
        "auto", help="dtype of the frozen reference and score models; auto = bfloat16 under bf16 mixed precision, else float32.")
    critic_layout: Literal["full", "shared_backbone", "lora"] = config_field(
        "full", help="Where the critics live: full = each a full copy of its score model (the reference's); shared_backbone = "
                     "a value head per stream on the actor's backbone (least-squares fit on the first rollout), trained with the actor "
                     "in one objective (faster, less memory; worse policies than full on SafeWorld); "
                     "lora = a LoRA adapter + head on its frozen score model (whose score is the same forward, adapter off).")
    value_loss_coeff: float = config_field(
        0.1, help="shared_backbone only: c in the one objective L_actor + c·Σ L_V, which also trains the actor's backbone "
                  "(0.1 as TRL's vf_coef: returns are several units, the surrogate's advantages about one). Separate critics "
                  "(full, lora) each minimise their own L_V with their own optimizer.")
    actor_layout: Literal["full", "lora"] = config_field(
        "full", help="What of the actor trains: full = every weight (the reference's); lora = a LoRA adapter on the SFT model, "
                     "whose adapter-disabled forward is the frozen reference (one policy backbone held, not two; "
                     "model/ is saved merged, adapter/ alone). With critic_layout lora and bf16, the layout for large models.")
    adapter: Literal["none", "lora"] = config_field("none", help="Unused by the RL stages (a LoRA actor: actor_layout; LoRA critics: critic_layout).")
    logging_steps: int = config_field(1, help="Log the scalars every this many steps (rollouts).")
    save_steps: int = config_field(50, help="Checkpoint every this many steps (0 = at each epoch's end, -1 = never; the final actor is always saved).")
    sample_steps: int = config_field(10, help="Add sample responses to output_dir/samples.jsonl every this many steps (0 = never).")
    num_logged_samples: int = config_field(4, help="Responses per sample-table entry (the first rows of the main process's rollout).")


@dataclass
class RLModels:
    """Every model of a run. `actor` and the critics are prepared by Accelerate (DDP-wrapped when several
    processes run); the reference and the score models are frozen, on the device, in eval mode. Under FSDP2 every
    one of them is sharded over the ranks (`shard_models`)."""

    actor: nn.Module  # the causal LM (a peft model in the lora actor layout); an `ActorCritic` (LM + value heads) in the shared_backbone layout
    reference: Any  # a frozen copy of the actor, or (lora actor layout) the actor with its adapter disabled
    score_models: dict[str, Any]  # "reward", "cost", ...: end scores of whole sequences (a ScoreModel, or a LoRA critic's base)
    critics: dict[str, nn.Module]  # stream -> critic ("reward", "cost"); none in the shared_backbone layout
    critic_layout: str = "full"


@dataclass
class Experience:
    """A rollout batch on this process with everything the updates need; every tensor has B rows.

    Shared keys: sequences, attention_mask, position_ids (B, P + T); response_mask, log_probs (the
    actor's at sampling time), ref_log_probs, advantages (the actor's) (B, T); ended_with_eos (B,).
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


# --------------------------------------------------------------------------------------------------
# Forward passes on a rollout (which columns hold what)
# --------------------------------------------------------------------------------------------------
def token_log_probs(model: nn.Module, batch: Experience) -> torch.Tensor:
    """log π(response token t | prompt, tokens < t) for every response column: (B, T).

    The logits at column P + t − 1 predict the token at P + t; only the last T + 1 positions go through
    the LM head (`logits_to_keep`).
    """
    num_response = batch["response_mask"].size(1)
    logits = model(input_ids=batch["sequences"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   use_cache=False, logits_to_keep=num_response + 1).logits  # size = (B, T + 1, V)
    return _response_log_probs(logits, batch)


def critic_values(critic: nn.Module, batch: Experience) -> torch.Tensor:
    """V_t: the critic's score at the state before each response token (column P + t − 1): (B, T)."""
    scores = critic(batch["sequences"], batch["attention_mask"], batch["position_ids"]).scores  # size = (B, P + T)
    return _response_values(scores, batch)


def policy_and_values(models: RLModels, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """log π of the response tokens (B, T) and each stream's values V_t (B, T): in the shared_backbone layout
    from one forward of the actor and its value heads, otherwise from the actor and each critic."""
    if models.critic_layout != "shared_backbone":
        return token_log_probs(models.actor, batch), {s: critic_values(c, batch) for s, c in models.critics.items()}
    num_response = batch["response_mask"].size(1)
    out = models.actor(batch["sequences"], batch["attention_mask"], batch["position_ids"], logits_to_keep=num_response + 1,
                       with_values=True)
    return _response_log_probs(out.logits, batch), {s: _response_values(v, batch) for s, v in out.values.items()}


def _response_log_probs(logits: torch.Tensor, batch: Experience) -> torch.Tensor:
    """From the logits of the last T + 1 positions (B, T + 1, V): log π of each response token, (B, T)."""
    from safealign.algorithms.losses import gather_log_probs

    return gather_log_probs(logits[:, :-1], batch["sequences"][:, batch.prompt_length:])  # size = (B, T)


def _response_values(scores: torch.Tensor, batch: Experience) -> torch.Tensor:
    """From per-position scores (B, P + T): the ones at the states before each response token, (B, T)."""
    start = batch.prompt_length - 1
    return scores[:, start:start + batch["response_mask"].size(1)]  # size = (B, T)


@torch.no_grad()
def fit_value_heads(models: RLModels, algorithm: "RLAlgorithm", batch: Experience, accelerator: Accelerator) -> dict[str, float]:
    """shared_backbone: fit the zero-initialised value heads on the first rollout, before any update.

    At step 0 the actor is the reference (KL_t = 0), so the return of every response token is its stream's end
    score S (γ = 1). Ridge regression of S on the actor's last hidden state at the states before the response
    tokens (`actor_critic.ridge_solution`, statistics summed over processes: identical heads on every rank).
    Returns each stream's R² of the fit on this rollout.
    """
    actor = accelerator.unwrap_model(models.actor)
    hidden = actor.lm(batch["sequences"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                      use_cache=False, output_hidden_states=True).hidden_states[-1]  # size = (B, P + T, H)
    mask = batch["response_mask"].bool()  # size = (B, T)
    states = _response_values(hidden, batch)[mask].double()  # size = (N, H): the states before the response tokens
    features = torch.cat([states, torch.ones_like(states[:, :1])], dim=1)  # size = (N, H + 1)
    ends = algorithm.stream_end_scores({name: end_scores(model, batch) for name, model in models.score_models.items()})
    streams = list(actor.value_heads)
    targets = torch.stack([ends[s].double().unsqueeze(1).expand_as(mask)[mask] for s in streams], dim=1)  # size = (N, S)
    stats = torch.cat([features.T @ features, features.T @ targets], dim=1)  # size = (H + 1, H + 1 + S)
    count = torch.tensor([float(len(features))], dtype=torch.float64, device=features.device)
    stats, count = accelerator.reduce(stats, "sum"), accelerator.reduce(count, "sum")
    solution = ridge_solution(stats[:, :features.size(1)], stats[:, features.size(1):], count.item())  # size = (H + 1, S)
    actor.set_value_heads(solution, streams)
    residual = targets - features @ solution  # size = (N, S)
    total = (targets - targets.mean(0)).pow(2).sum(0).clamp(min=1e-12)
    return {f"{s}_value_head_fit_r2": (1 - residual[:, k].pow(2).sum() / total[k]).item() for k, s in enumerate(streams)}


def end_scores(score_model: ScoreModel, batch: Experience) -> torch.Tensor:
    """Score of prompt + response (+ EOS when generated) at its last token: (B,)."""
    return score_model(batch["sequences"], batch["attention_mask"], batch["position_ids"]).end_scores


# --------------------------------------------------------------------------------------------------
# The algorithm's side of the loop
# --------------------------------------------------------------------------------------------------
class RLAlgorithm:
    """What an algorithm gives `train_rl` (see `ppo.PPOStep`, the implementation all three use)."""

    streams: tuple[str, ...] = ()

    def score_model_paths(self) -> dict[str, str]:
        """Frozen score models to load: name -> directory."""
        raise NotImplementedError

    def critic_paths(self) -> dict[str, str]:
        """Critic of each stream -> the directory it is initialised from."""
        raise NotImplementedError

    def make_experience(self, models: RLModels, batch: Experience) -> dict[str, float]:
        """Fill `batch` (no grad): log-probs, scores, values, advantages; return this process's rollout scalars."""
        raise NotImplementedError

    def before_update(self, batch: Experience, accelerator: Accelerator, step: int) -> dict[str, float]:
        """After the experience, before the updates (PPO-Lag: the λ update). Returns scalars identical on every rank."""
        return {}

    def loss(self, models: RLModels, batch: Experience, metrics: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """The PPO loss of a micro-batch (actor + critics) as terms the loop backpropagates one by one (the next
        term is computed after the previous backward); detached diagnostics go into `metrics`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------
def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout of a model (nn.Dropout modules and attention dropout rates), in place."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, 0.0)
    return model


def _frozen(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _check_vocabulary(path: str, tokenizer: Any) -> None:
    """A score model that ships a tokenizer must share the actor's vocabulary (it reads the actor's ids)."""
    if not (Path(path) / "tokenizer_config.json").is_file():
        return
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{path}: its tokenizer differs from the actor's; reward/cost models and critics must be "
                          "trained on the actor's tokenizer (e.g. from the SFT model)")


def build_models(cfg: RLConfig, algorithm: RLAlgorithm, tokenizer: Any, accelerator: Accelerator) -> RLModels:
    """The actor, its frozen reference, the frozen score models and the critics of `cfg.critic_layout`, on the
    device (the trained ones not yet prepared by Accelerate)."""
    device = accelerator.device
    if cfg.frozen_dtype == "auto":
        frozen_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    else:
        frozen_dtype = getattr(torch, cfg.frozen_dtype)
    actor = disable_dropout(build_causal_lm(cfg.actor_model, tokenizer, seed=cfg.seed))
    if cfg.actor_layout == "lora":
        actor = lora_policy(actor, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules or None, frozen_dtype).to(device)
        reference: Any = AdapterDisabledPolicy(actor)
    else:
        reference = _frozen(copy.deepcopy(actor), device, frozen_dtype)
    score_paths, critic_paths = algorithm.score_model_paths(), algorithm.critic_paths()
    score_models: dict[str, Any] = {}
    for name, path in score_paths.items():
        _check_vocabulary(path, tokenizer)
        score_models[name] = _frozen(load_score_model(path), device, frozen_dtype)
    critics: dict[str, nn.Module] = {}
    if cfg.critic_layout == "full":
        for stream, path in critic_paths.items():
            _check_vocabulary(path, tokenizer)
            critics[stream] = build_score_model(path, score_type="critic", tokenizer=tokenizer, seed=cfg.seed)
    elif cfg.critic_layout == "lora":
        for stream, path in critic_paths.items():
            if path != score_paths.get(stream):
                raise ConfigError(f"critic_layout=lora: the {stream} critic is an adapter on the frozen {stream} model, so it "
                                  f"starts from that model ({score_paths.get(stream)}), not from {path}")
            critics[stream], score_models[stream] = lora_critic(score_models[stream], cfg.lora_rank, cfg.lora_alpha,
                                                                cfg.lora_target_modules or None)
    else:
        actor = ActorCritic(actor, list(critic_paths))
    if cfg.gradient_checkpointing:
        for model in (actor, *critics.values()):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return RLModels(actor=actor, reference=reference, score_models=score_models, critics=critics,
                    critic_layout=cfg.critic_layout)


def prepare_training(cfg: RLConfig, accelerator: Accelerator, models: RLModels,
                     total_updates: int) -> dict[str, tuple[nn.Module, Any, Any]]:
    """Optimizers and schedulers of the trained models (the actor, each critic), prepared by Accelerate in
    place in `models`; returns the parts: name -> (model, optimizer, scheduler), what a checkpoint holds.

    Under FSDP2 Accelerate is not used to prepare: its FSDP2 path takes one model per `prepare` (accelerate 1.15:
    "Only one model is supported when using FSDP2") and never the frozen ones. `shard_models` shards every model
    first, and the optimizers are then built on the shards."""
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:
        shard_models(models, accelerator.mixed_precision, accelerator.device)
    warmup = math.ceil(cfg.warmup_ratio * total_updates)
    actor_optimizer = make_optimizer(cfg, models.actor)
    actor_scheduler = get_scheduler(cfg.lr_scheduler, actor_optimizer, num_warmup_steps=warmup, num_training_steps=total_updates)
    critic_cfg = dataclasses.replace(cfg, learning_rate=cfg.critic_learning_rate, weight_decay=cfg.critic_weight_decay)
    critic_optimizers = {s: make_optimizer(critic_cfg, c) for s, c in models.critics.items()}
    critic_schedulers = {s: get_scheduler(cfg.critic_lr_scheduler, o, num_warmup_steps=warmup, num_training_steps=total_updates)
                         for s, o in critic_optimizers.items()}
    streams = list(models.critics)
    if not sharded:
        prepared = accelerator.prepare(models.actor, actor_optimizer,
                                       *[x for s in streams for x in (models.critics[s], critic_optimizers[s])])
        models.actor, actor_optimizer = prepared[0], prepared[1]
        for i, s in enumerate(streams):
            models.critics[s], critic_optimizers[s] = prepared[2 + 2 * i], prepared[3 + 2 * i]
    return {"actor": (models.actor, actor_optimizer, actor_scheduler),
            **{f"{s}_critic": (models.critics[s], critic_optimizers[s], critic_schedulers[s]) for s in streams}}


def shard_models(models: RLModels, mixed_precision: str, device: torch.device) -> None:
    """FSDP2 (full sharding over every rank), in place: the trained models and the frozen ones alike.

    Each transformer block (the classes Hugging Face's `_no_split_modules` names) is one unit, the rest of the model
    (embeddings, final norm, heads) the root's: a forward all-gathers one unit's weights at a time and frees them after
    it, so a rank holds 1/world of every model plus one block. Under bf16 the trained models keep fp32 weights (and
    AdamW state), compute in bf16, reduce gradients in fp32 and return fp32 outputs, as Accelerate's autocast wrapper
    does under DDP; the frozen ones compute in their `frozen_dtype`. Must run before the optimizers exist.
    """
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    if mixed_precision == "bf16":
        trained_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        trained_policy = MixedPrecisionPolicy()  # fp32 throughout
    for model in (models.actor, *models.critics.values()):
        _shard_blocks_then_root(model.to(device), mesh, trained_policy)
    for model in (models.reference, *models.score_models.values()):
        _shard_blocks_then_root(model, mesh, MixedPrecisionPolicy())


def _shard_blocks_then_root(model: nn.Module, mesh: Any, policy: MixedPrecisionPolicy) -> None:
    block_names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    for block in [module for module in model.modules() if type(module).__name__ in block_names]:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if policy.param_dtype is not None:  # the caller gets fp32 (logits for log-softmax, values)
        policy = dataclasses.replace(policy, output_dtype=torch.float32)
    # reshard_after_forward on the root too: a frozen model has no backward that would free its root weights
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def clip_gradients(accelerator: Accelerator, model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip `model`'s gradient norm to `max_norm`; returns the norm before clipping (a plain tensor).

    Under FSDP the models are not Accelerate's (`prepare_training`), whose clip_grad_norm_ then finds no model to
    clip: torch's reduces the norm of the sharded (DTensor) gradients over the ranks, read whole with full_tensor()."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _check_sharding(cfg: RLConfig, accelerator: Accelerator) -> None:
    """Refuse what the RL loop does not run, before any model loads: DeepSpeed, FSDP1, and under FSDP2 the layouts
    that share one network between several roles (a LoRA actor or critic, value heads on the actor) or fp16."""
    kind = accelerator.distributed_type
    if kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return
    if kind != DistributedType.FSDP or not accelerator.is_fsdp2:
        # Accelerate prepares one model per DeepSpeed engine; FSDP1 is not built here.
        raise ConfigError(f"the RL stages run on one process, several with DDP, or FSDP2 (FSDP_VERSION=2), not under "
                          f"{kind.value}{'' if kind != DistributedType.FSDP else ' version 1'}. For a large model use FSDP2, or "
                          "actor_layout: lora, critic_layout: lora and mixed_precision: bf16 (one bf16 backbone per policy / "
                          "reward / cost model, the adapters trained), one model replica per GPU (README: Large models)")
    if cfg.actor_layout != "full" or cfg.critic_layout != "full":
        raise ConfigError("under FSDP2 the RL stages shard full models: actor_layout full and critic_layout full (LoRA "
                          "layouts and value heads on the actor's backbone share one network between roles, not sharded here)")
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("under FSDP2 the RL stages run in bf16 or fp32 (mixed_precision bf16 or 'no'), not fp16")


def _require_dir(path: str, what: str) -> None:
    if not path:
        raise ConfigError(f"{what} is required")
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what} '{path}' not found")


def _prompt_token_ids(cfg: RLConfig, tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    prompts = [record.prompt for record in load_prompts(cfg.prompt_data)]
    if not prompts:
        raise ConfigError(f"prompt_data {cfg.prompt_data}: no prompts")
    return prompts, [tokenize_prompt(tokenizer, p)[-cfg.max_prompt_length:] for p in prompts]


# --------------------------------------------------------------------------------------------------
# Checkpoints: several trained models, the algorithm's state
# --------------------------------------------------------------------------------------------------
def save_rl_checkpoint(path: Path, accelerator: Accelerator, parts: dict[str, tuple[nn.Module, Any, Any]],
                       algorithm_state: dict[str, Any], trainer_state: dict[str, Any]) -> None:
    """Write `{name}.safetensors` (its trained weights), `{name}_optimizer.*`, `{name}_scheduler.*` per part, the algorithm's
    state, every rank's RNG and trainer_state.json into a temporary directory, then rename it to `path`."""
    with atomic_checkpoint(path, accelerator) as tmp:
        for name, (model, optimizer, scheduler) in parts.items():
            save_trained(accelerator, model, optimizer, tmp, name, f"{name}_optimizer")  # every rank: FSDP2 gathers
            if accelerator.is_main_process:
                save_state_tree(scheduler.state_dict(), tmp, f"{name}_scheduler")
        if accelerator.is_main_process:
            save_state_tree(algorithm_state, tmp, "algorithm_state")
            write_json(tmp / "trainer_state.json", trainer_state)


def load_rl_checkpoint(path: Path, accelerator: Accelerator, parts: dict[str, tuple[nn.Module, Any, Any]]) -> tuple[dict, dict]:
    """Restore every part, this rank's RNG; return (algorithm_state, trainer_state)."""
    import json

    for name, (model, optimizer, scheduler) in parts.items():
        if not (path / f"{name}.safetensors").is_file():
            raise FileNotFoundError(f"{path} has no {name}: was it written by another algorithm?")
        load_trained(accelerator, model, optimizer, path, name, f"{name}_optimizer")
        scheduler.load_state_dict(load_state_tree(path, f"{name}_scheduler"))
    restore_rng_state(path, accelerator)
    return load_state_tree(path, "algorithm_state"), json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def train_rl(cfg: RLConfig, algorithm: RLAlgorithm) -> dict[str, Any]:
    """Run `algorithm` with the RL loop; returns the final flat metrics (also written to metrics.json)."""
    started = time.perf_counter()
    _require_dir(cfg.prompt_data, "prompt_data (a prompt file)")
    if cfg.actor_model not in PRESETS:
        _require_dir(cfg.actor_model, "actor_model (the SFT model directory)")
    elif not cfg.tokenizer:
        raise ConfigError(f"actor_model '{cfg.actor_model}' is a preset: give a tokenizer directory too")
    critic_paths = {} if cfg.critic_layout == "shared_backbone" else algorithm.critic_paths()
    for name, path in {**algorithm.score_model_paths(), **{f"{s}_critic": p for s, p in critic_paths.items()}}.items():
        _require_dir(path, f"{name} model")
    if cfg.value_loss_coeff < 0 or cfg.lora_rank < 1 or cfg.lora_alpha <= 0:
        raise ConfigError("value_loss_coeff must be >= 0, lora_rank >= 1 and lora_alpha > 0")
    if cfg.adapter != "none":
        raise ConfigError("the RL stages take actor_layout: lora (and critic_layout: lora) for adapters, not adapter")
    if cfg.actor_layout == "lora" and cfg.critic_layout == "shared_backbone":
        raise ConfigError("actor_layout=lora with critic_layout=shared_backbone is not supported: value heads on an adapted "
                          "backbone were not measured; use critic_layout full or lora")
    rows_per_rollout = cfg.per_device_prompt_batch_size * cfg.samples_per_prompt
    rows_per_update = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if rows_per_rollout % rows_per_update:
        raise ConfigError(f"rows per rollout (per_device_prompt_batch_size × samples_per_prompt = {rows_per_rollout}) must be a "
                          f"multiple of per_device_train_batch_size × gradient_accumulation_steps = {rows_per_update}")

    ptx = bool(cfg.ptx_data) and cfg.ptx_coeff > 0
    # DDP: the PTX forward of an actor with value heads leaves the heads out of its loss.
    accelerator = make_accelerator(cfg, find_unused_parameters=ptx and cfg.critic_layout == "shared_backbone")
    _check_sharding(cfg, accelerator)
    save_steps = checkpoint_save_steps(cfg, accelerator)
    set_seed(cfg.seed)
    device = accelerator.device
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.actor_model)
    prompts, prompt_ids = _prompt_token_ids(cfg, tokenizer)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, num_samples=cfg.samples_per_prompt)
    models = build_models(cfg, algorithm, tokenizer, accelerator)

    # Schedule: steps are rollouts; each makes ppo_epochs × (rows / rows_per_update) optimizer steps.
    state = TrainerState(global_batch_size=cfg.per_device_prompt_batch_size * accelerator.num_processes,
                         num_train_examples=len(prompts))
    state.steps_per_epoch = math.ceil(len(prompts) / state.global_batch_size)
    state.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * state.steps_per_epoch))
    updates_per_step = cfg.ppo_epochs * rows_per_rollout // rows_per_update
    parts = prepare_training(cfg, accelerator, models, state.total_steps * updates_per_step)
    actor, critics = models.actor, models.critics
    schedulers = {name: scheduler for name, (_, _, scheduler) in parts.items()}

    ptx_examples = []
    if ptx:
        ptx_examples = [tokenize_prompt_response(tokenizer, e.prompt, e.response, cfg.ptx_max_length) for e in load_sft(cfg.ptx_data)]
    from safealign.algorithms.sft import collate_sft

    collate_ptx = partial(collate_sft, pad_token_id=tokenizer.pad_token_id)

    # Resume.
    resume_from = resolve_resume(out, cfg.resume)
    if resume_from is not None:
        algorithm_state, saved = load_rl_checkpoint(resume_from, accelerator, parts)
        algorithm.load_state_dict(algorithm_state)
        state = continue_trainer_state(TrainerState(**saved), state, resume_from, accelerator)
    elif cfg.resume and accelerator.is_main_process:
        console.print(f"resume={cfg.resume!r}: no checkpoint in {out / 'checkpoints'}, starting fresh")

    logger = RunLogger(out, state, accelerator, "rl")
    samples_file = out / "samples.jsonl"
    sample_rows: list[dict] = []
    if accelerator.is_main_process and samples_file.is_file():  # keep what the resumed-from steps wrote
        import json

        sample_rows = [r for r in map(json.loads, samples_file.read_text(encoding="utf-8").splitlines())
                       if r["step"] <= state.global_step]

    def save() -> None:
        save_rl_checkpoint(checkpoint_dir(out, state.global_step), accelerator, parts, algorithm.state_dict(),
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
            rollout = generate_tokens(causal_lm(accelerator.unwrap_model(actor)), tokenizer, [prompt_ids[i] for i in indices],
                                      sampling, generator)
            batch = Experience.from_rollout(rollout)
            time_generation = time.perf_counter() - tick

            tick_experience = time.perf_counter()
            actor.eval()
            for critic in critics.values():
                critic.eval()
            with torch.no_grad():
                head_fit = fit_value_heads(models, algorithm, batch, accelerator) \
                    if step == 0 and cfg.critic_layout == "shared_backbone" else {}  # a resumed run loads fitted heads
                scalars = {**algorithm.make_experience(models, batch), **head_fit}
            time_experience = time.perf_counter() - tick_experience

            tick_update = time.perf_counter()
            # the rates this step's updates start with: actor_lr, {stream}_critic_lr
            learning_rates = {f"{name}_lr": scheduler.get_last_lr()[0] for name, scheduler in schedulers.items()}
            shared = algorithm.before_update(batch, accelerator, step)  # identical on every rank
            actor.train()
            for critic in critics.values():
                critic.train()
            scalars.update(_ppo_updates(cfg, accelerator, algorithm, models, batch, parts, ptx_examples, collate_ptx,
                                        step, updates_per_step))
            time_update = time.perf_counter() - tick_update
            scalars.update(learning_rates)

            if accelerator.is_main_process and cfg.sample_steps > 0 and (step + 1) % cfg.sample_steps == 0:
                sample_rows += _sample_rows(tokenizer, rollout, batch, [prompts[i] for i in indices],
                                            cfg.samples_per_prompt, cfg.num_logged_samples, step + 1)
                atomic_write_jsonl(samples_file, sample_rows)

            state.global_step += 1
            elapsed = time.perf_counter() - tick
            rows = rows_per_rollout * accelerator.num_processes
            run_samples += rows
            run_time += elapsed
            scalars.update(time_generation=time_generation, time_experience=time_experience, time_update=time_update,
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

    policy = causal_lm(accelerator.unwrap_model(actor))
    num_trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    policy = save_final_model(accelerator, policy, tokenizer, out / "model")  # merged (and adapter/) for a LoRA actor
    final: dict[str, Any] = {}
    for entry in state.log_history:  # the last value of every scalar (also when resumed)
        final.update({k: v for k, v in entry.items() if k != "step"})
    final.update(global_step=state.global_step, samples_per_second=run_samples / max(run_time, 1e-9),
                 num_parameters=sum(p.numel() for p in policy.parameters()), num_trained_actor_parameters=num_trained,
                 runtime_s=time.perf_counter() - started)
    if accelerator.is_main_process:
        atomic_write_json(out / "metrics.json", final)
    return final


_CONSOLE_KEYS = ("reward", "cost", "episode_cost", "lagrange_multiplier", "kl", "actor_loss", "reward_critic_loss",
                 "cost_critic_loss", "response_length", "samples_per_second")


def _ppo_updates(cfg: RLConfig, accelerator: Accelerator, algorithm: RLAlgorithm, models: RLModels, batch: Experience,
                 parts: dict[str, tuple[nn.Module, Any, Any]], ptx_examples: list, collate_ptx, step: int,
                 updates_per_step: int) -> dict[str, float]:
    """`ppo_epochs` shuffled passes of mini-batch updates over `batch`; returns the mean diagnostics.

    Each micro-batch's loss is its masked mean; Accelerate divides it by the accumulation steps and DDP
    averages over processes (equal row counts): the gradient is that of the mini-batch's masked mean.
    """
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + step)  # never the global RNG: exact resume
    micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    trained = [model for model, _, _ in parts.values()]
    sums: dict[str, float] = {}
    count, update = 0, 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(batch.num_rows, generator=generator)
        for start in range(0, batch.num_rows, micro):
            rows = order[start:start + micro].to(batch["sequences"].device)
            ptx_batch = None
            if ptx_examples:
                ptx_batch = _ptx_micro_batch(cfg, accelerator, ptx_examples, collate_ptx,
                                             step * updates_per_step + update, (start // micro) % accumulation)
            with accelerator.accumulate(*trained):
                metrics: dict[str, torch.Tensor] = {}
                for loss in algorithm.loss(models, batch.select(rows), metrics):  # one term per trained model
                    accelerator.backward(loss)
                if ptx_batch is not None:
                    logits = models.actor(input_ids=ptx_batch["input_ids"], attention_mask=ptx_batch["attention_mask"],
                                          use_cache=False).logits  # size = (b, L, V)
                    ptx_loss = sft_loss(logits, ptx_batch["labels"])
                    accelerator.backward(cfg.ptx_coeff * ptx_loss)
                    metrics["ptx_loss"] = ptx_loss.detach()
                if accelerator.sync_gradients:
                    for name, (model, _, _) in parts.items():
                        norm = clip_gradients(accelerator, model, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                        metrics[f"{name}_grad_norm"] = torch.as_tensor(norm).float() * accumulation  # averaged over micro-batches below
                for _, optimizer, _ in parts.values():
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                update += 1
                if not accelerator.optimizer_step_was_skipped:
                    for _, _, scheduler in parts.values():
                        scheduler.step()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            count += 1
    return {name: value / count for name, value in sums.items()}


def _ptx_micro_batch(cfg: RLConfig, accelerator: Accelerator, examples: list, collate, update: int, micro_index: int):
    """Micro-batch `micro_index` of PTX optimizer step `update` on this process (seeded order per pass)."""
    per_pass = math.ceil(len(examples) / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes))
    epoch, position = divmod(update, per_pass)
    micro_batches = epoch_batches(len(examples), epoch, cfg.seed, cfg.per_device_train_batch_size,
                                  cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index, position)
    batch = collate([examples[i] for i in micro_batches[micro_index]])
    return {k: v.to(accelerator.device) for k, v in batch.items()}


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
