"""What an RL run holds and how it is built: its options (`RLConfig`), its models (`RLModels`) in one of the
actor and critic layouts, their optimizers, and FSDP2 sharding. The loop that uses them is `training.rl`.

Critic layouts (`critic_layout`; peak memory of each: bench/bench_ppo_memory.py):
- `full` (default, the reference's): each critic a full copy of its score model with its own AdamW;
- `shared_backbone`: one value head per stream on the actor's backbone (`models.actor_critic`): one forward
  gives log-probs and both streams' values, and one optimizer step minimises L_actor + c·Σ_s L_V^s
  (c = `value_loss_coeff`), so the value loss also trains the actor's backbone. The heads are fitted by
  least squares on the first rollout before any update (`ppo.fit_value_heads`), so that V starts as a baseline;
- `lora`: each critic a LoRA adapter + head on its frozen score model (`lora.lora_critic`); the frozen score is the
  same backbone with the adapter disabled. Checkpoints hold the adapters and heads only. The critic starts equal
  to its score model, as in `full`; a LoRA critic usually wants a larger `critic_learning_rate` than a full one.

Actor layouts (`actor_layout`): `full` (default) trains every weight of the actor next to a frozen copy, the
reference; `lora` trains a LoRA adapter on the SFT model and uses the same network with the adapter disabled as
the reference (`models.lora`): the policy's weights are held once, and `model/` is saved merged.

The reference model and the frozen score models run in eval mode without gradients, in `frozen_dtype`
(bf16 halves their memory). Dropout is switched off in the actor, as in the critics, so that the PPO
ratio is exactly 1 before the first update. Score models must share the actor's tokenizer (they read
its token ids). Supported: one process, several with DDP (torchrun / accelerate launch), or FSDP2 (below); under
DeepSpeed or FSDP1 the stage stops with a ConfigError before loading anything.

FSDP2 (`ACCELERATE_USE_FSDP=true FSDP_VERSION=2`; full actor and critic layouts only, bf16 or fp32): Accelerate's
FSDP2 `prepare` takes one model, so `shard_models` applies torch's `fully_shard` to every model itself, frozen ones
included (each decoder block, then the root), and the optimizers are built on the shards; gradients are clipped by
`clip_gradients` (DTensor). The rollout decodes in lock-step across ranks (`models.generation`); every other forward
of a sharded model (log-probs, values, scores, updates, PTX) is made the same number of times on every rank, as the
per-rank row counts are equal. Checkpoints and the final actor are gathered from the shards and written full, the
files a DDP run writes (`checkpoint.save_trained`); on resume every rank reads them and keeps its shard
(`checkpoint.load_trained`). Run on two gloo CPU ranks with tiny models in fp32: PPO-Lag gave DDP's samples, J_C and
λ, and its actor within 1.8e-7; stopped after checkpoint step-2 and resumed, the uninterrupted run's λ, J_C and
actor to the last bit (tests/algorithms/test_ppo_lag.py); bf16 only as a 2-step smoke run; not yet run on GPUs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from safealign.config import ConfigError, config_field
from safealign.data.formatting import TokenizedExample, tokenize_examples, tokenize_prompts
from safealign.data.loading import load_prompts, load_sft
from safealign.data.schema import PromptRecord
from safealign.models.actor_critic import ActorCritic
from safealign.models.lora import AdapterDisabledPolicy, lora_critic, lora_policy
from safealign.models.presets import PRESETS, build_causal_lm
from safealign.models.score_model import build_score_model, load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.training.common import TrainingConfig, make_optimizer


@dataclass
class RLConfig(TrainingConfig):
    """Options of the RL loop (rollout, updates, layouts, logging); each algorithm's config adds its maths.

    A step is one rollout batch and its PPO updates: `max_steps` counts rollouts, `num_epochs` passes
    over the prompts. `per_device_train_batch_size` is the mini-batch (rows) of one update.
    """

    output_dir: str = config_field("runs/ppo", help="Run directory: config.yaml, logs/, samples.jsonl, checkpoints/, model/ (the actor), metrics.json.")
    actor_model: str = config_field("runs/sft/model", help="Initial policy: the SFT model directory. The frozen reference is a copy of it.")
    tokenizer: str = config_field("", help="Tokenizer directory; '' = the actor's. Score models must use the same vocabulary.")
    prompt_data: str = config_field("", help="Prompts for the rollouts: a prompt file (SafeWorld prompts/train.jsonl), or an SFT/preference file's prompts.")
    prompt_kind_repeats: dict[str, int] = config_field(
        {}, help="Each prompt of a kind (the prompt file's `kind`) this many times among the rollout prompts, e.g. "
                 "{borderline: 4}: more rollouts of a rare kind (SafeWorld's train prompts are 6% borderline). {} = once each.")
    max_prompt_length: int = config_field(128, help="Prompt tokens kept (the end of a longer prompt, next to the response).")
    num_epochs: float = config_field(1.0, help="Passes over the prompts (fractions allowed); ignored when max_steps > 0.")
    max_steps: int = config_field(-1, help="Steps (rollout batches, each with its PPO updates) to run; -1 = num_epochs over the prompts.")
    gradient_accumulation_steps: int = config_field(1, help="Micro-batches per PPO update (optimizer step); a mini-batch is per_device_train_batch_size × this rows.")
    per_device_prompt_batch_size: int = config_field(
        32, help="Prompts per rollout on each process.")
    samples_per_prompt: int = config_field(1, help="Responses sampled per prompt (rows per rollout = prompts × this).")
    max_new_tokens: int = config_field(64, help="Most response tokens per rollout row (EOS included).")
    temperature: float = config_field(1.0, help="Sampling temperature of the rollouts (1 = the policy's own distribution, as PPO assumes).")
    top_k: int = config_field(0, help="Rollouts sample from the k most likely tokens only (0 = off).")
    top_p: float = config_field(1.0, help="Rollouts sample from the nucleus of this probability (1 = off).")
    ppo_epochs: int = config_field(1, help="Passes of PPO updates over each rollout batch (the reference's update_iters).")
    per_device_train_batch_size: int = config_field(16, help="Rollout rows per micro-batch of an update on each process.")
    learning_rate: float = config_field(
        2e-4, help="Actor learning rate (2e-4 suits the tiny preset; the reference's 1e-5 is for a 7B model).")
    weight_decay: float = config_field(0.01, help="Actor AdamW weight decay (reference 0.01).")
    critic_learning_rate: float = config_field(
        5e-5, help="Critic learning rate. 5e-5 suits the tiny preset; the reference's 5e-6 is for a 7B model.")
    critic_weight_decay: float = config_field(0.0, help="Critic AdamW weight decay (reference 0.0).")
    critic_lr_scheduler: Literal["cosine", "linear", "constant"] = config_field("constant", help="Critic learning-rate decay after the warm-up (reference constant).")
    ptx_data: str = config_field("", help="SFT file for the PTX loss (a language-modelling loss mixed into the actor objective); '' = none.")
    ptx_coeff: float = config_field(16.0, help="γ_ptx: weight of the PTX loss (reference 16).")
    ptx_max_length: int = config_field(256, help="Tokens per PTX example (prompt + response + EOS).")
    ptx_max_cost: float | None = config_field(
        None, help="Keep only the PTX rows whose cost, by the run's cost model (its own units: > 0 = unsafe), is at most this; "
                   "the rows are scored once, before training. An SFT corpus that complies with harmful requests (SafeWorld's "
                   "does, half the time) then stops pulling the policy back toward those answers. null = every row.")
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = config_field(
        "auto", help="dtype of the frozen reference and score models; auto = bfloat16 under bf16 mixed precision, else float32.")
    critic_layout: Literal["full", "shared_backbone", "lora"] = config_field(
        "full", help="Where the critics live: full = each a full copy of its score model (the reference's); shared_backbone = "
                     "a value head per stream on the actor's backbone (least-squares fit on the first rollout), trained with the actor "
                     "in one objective (faster, less memory; the value loss also moves the policy); "
                     "lora = a LoRA adapter + head on its frozen score model (whose score is the same forward, adapter off).")
    value_loss_coeff: float = config_field(
        0.1, help="shared_backbone only: c in the one objective L_actor + c·Σ L_V, which also trains the actor's backbone "
                  "(0.1 as TRL's vf_coef: returns are several units, the surrogate's advantages about one). Separate critics "
                  "(full, lora) each minimise their own L_V with their own optimizer.")
    actor_layout: Literal["full", "lora"] = config_field(
        "full", help="What of the actor trains: full = every weight (the reference's); lora = a LoRA adapter on the SFT model, "
                     "whose adapter-disabled forward is the frozen reference (one policy backbone held, not two; "
                     "model/ is saved merged, adapter/ alone). With critic_layout lora and bf16, the layout for large models.")
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


def build_models(cfg: RLConfig, score_paths: dict[str, str], critic_paths: dict[str, str], tokenizer: Any,
                 accelerator: Accelerator) -> RLModels:
    """The actor, its frozen reference, the frozen score models (name -> directory) and the critics of
    `cfg.critic_layout` (stream -> the directory it starts from), on the device (the trained ones not yet prepared
    by Accelerate)."""
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


def check_sharding(cfg: RLConfig, accelerator: Accelerator) -> None:
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
                          "reward / cost model, the adapters trained), one model replica per GPU (docs/large-models.md)")
    if cfg.actor_layout != "full" or cfg.critic_layout != "full":
        raise ConfigError("under FSDP2 the RL stages shard full models: actor_layout full and critic_layout full (LoRA "
                          "layouts and value heads on the actor's backbone share one network between roles, not sharded here)")
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("under FSDP2 the RL stages run in bf16 or fp32 (mixed_precision bf16 or 'no'), not fp16")


def require_dir(path: str, what: str) -> None:
    if not path:
        raise ConfigError(f"{what} is required")
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what} '{path}' not found")


def check_paths(cfg: RLConfig, score_paths: dict[str, str], critic_paths: dict[str, str]) -> None:
    """Fail before any model loads when a directory is missing or the layouts cannot work together."""
    require_dir(cfg.prompt_data, "prompt_data (a prompt file)")
    if cfg.actor_model not in PRESETS:
        require_dir(cfg.actor_model, "actor_model (the SFT model directory)")
    elif not cfg.tokenizer:
        raise ConfigError(f"actor_model '{cfg.actor_model}' is a preset: give a tokenizer directory too")
    for name, path in {**score_paths, **{f"{s}_critic": p for s, p in critic_paths.items()}}.items():
        require_dir(path, f"{name} model")
    if cfg.value_loss_coeff < 0 or cfg.lora_rank < 1 or cfg.lora_alpha <= 0:
        raise ConfigError("value_loss_coeff must be >= 0, lora_rank >= 1 and lora_alpha > 0")
    if cfg.actor_layout == "lora" and cfg.critic_layout == "shared_backbone":
        raise ConfigError("actor_layout=lora with critic_layout=shared_backbone is not supported: value heads on an adapted "
                          "backbone were not measured; use critic_layout full or lora")
    if cfg.ptx_max_cost is not None and "cost" not in score_paths:
        raise ConfigError("ptx_max_cost filters the PTX rows by the cost model: this algorithm has none (use ppo-lag, "
                          "grpo-lag or p3o-lag, or set ptx_max_cost to null)")
    rows_per_rollout = cfg.per_device_prompt_batch_size * cfg.samples_per_prompt
    rows_per_update = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if rows_per_rollout % rows_per_update:
        raise ConfigError(f"rows per rollout (per_device_prompt_batch_size × samples_per_prompt = {rows_per_rollout}) must be a "
                          f"multiple of per_device_train_batch_size × gradient_accumulation_steps = {rows_per_update}")


def ptx_examples(cfg: RLConfig, tokenizer: Any, cost_model_path: str, device: torch.device
                 ) -> tuple[list[TokenizedExample], dict[str, float]]:
    """The tokenised PTX rows and what was kept: every row of `ptx_data`, or (with `ptx_max_cost`) the rows whose
    cost by the cost model at `cost_model_path` is at most that value, scored once with a copy loaded here (in
    float32, freed before training; each process scores every row, so all keep the same ones)."""
    rows = load_sft(cfg.ptx_data)
    if cfg.ptx_max_cost is None:
        return tokenize_examples(tokenizer, [e.prompt for e in rows], [e.response for e in rows], cfg.ptx_max_length), {}
    cost_model = load_score_model(cost_model_path).to(device)
    costs = score_texts(cost_model, tokenizer, [e.prompt for e in rows], [e.response for e in rows], cfg.ptx_max_length)
    del cost_model
    kept = [e for e, cost in zip(rows, costs) if cost <= cfg.ptx_max_cost]
    if not kept:
        raise ConfigError(f"ptx_max_cost={cfg.ptx_max_cost}: the cost model scores every one of the {len(rows)} rows of "
                          f"ptx_data {cfg.ptx_data} above it (lowest cost {min(costs):.3g})")
    examples = tokenize_examples(tokenizer, [e.prompt for e in kept], [e.response for e in kept], cfg.ptx_max_length)
    return examples, {"ptx_rows": float(len(rows)), "ptx_rows_kept": float(len(kept))}


def prompt_token_ids(cfg: RLConfig, tokenizer: Any) -> tuple[list[PromptRecord], list[list[int]]]:
    """The rollout prompts (with their kind and category, when the file has them) and their token ids (the end of a
    prompt longer than max_prompt_length)."""
    prompts = load_prompts(cfg.prompt_data)
    if not prompts:
        raise ConfigError(f"prompt_data {cfg.prompt_data}: no prompts")
    prompts = repeat_prompts_by_kind(prompts, cfg.prompt_kind_repeats, cfg.prompt_data)
    return prompts, [ids[-cfg.max_prompt_length:] for ids in tokenize_prompts(tokenizer, [p.prompt for p in prompts])]


def repeat_prompts_by_kind(prompts: list[PromptRecord], repeats: dict[str, int], source: str) -> list[PromptRecord]:
    """Each prompt `repeats[kind]` times in a row (once for a kind not named): the epoch's shuffle spreads the copies, so
    a rare kind gets proportionally more rollouts (and its constraint, e.g. the over-refusal guard, more observations)."""
    kinds = sorted({p.kind for p in prompts if p.kind})
    for kind, times in repeats.items():
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ConfigError(f"prompt_kind_repeats: '{kind}' must be a whole number >= 1, got {times!r}")
        if kind not in kinds:
            raise ConfigError(f"prompt_kind_repeats names kind '{kind}', which no prompt of {source} has (its kinds: "
                              f"{kinds or 'none: the file has no `kind` field'})")
    return [p for p in prompts for _ in range(repeats.get(p.kind or "", 1))]
