"""RL speed: safealign's PPO-Lagrangian and PPO (`training.rl.train_rl`) vs TRL 1.12's `PPOTrainer`.

One step = one rollout of 32 prompts (64 new tokens each, temperature 1, no top-k/top-p) and one PPO
epoch over it in 2 mini-batches of 16 rows (2 optimizer steps). The three runs use the same models:
- the actor: `build_causal_lm(preset, tokenizer, seed)` (random init: rows rarely sample EOS, so every
  row generates the full 64 tokens in both frameworks), its frozen reference a copy;
- reward model (and for PPO-Lag the cost model): a safealign score model of the preset; TRL gets it as a
  `LlamaForSequenceClassification` with the same backbone and head (`bench_rm.sequence_classifier`);
- critics: initialised from the reward (cost) model, as both frameworks do by default.
What each step computes:
- safealign PPO-Lag: generate; actor + reference log-probs, reward + cost end scores, reward + cost critic
  values (6 forwards); 2 × (actor, reward critic, cost critic forward/backward) and 3 optimizers.
- safealign PPO: the same with one stream (4 forwards in the experience, actor + 1 critic updated).
- TRL PPO: generate (keeping the sampling logits: no actor forward afterwards); reference, value and reward
  forwards; 2 × (policy + value forward/backward in one optimizer).
So PPO-Lag does strictly more work than TRL PPO (a cost model and a second critic): the issue's goal is
PPO-Lag at >= 1.3x TRL PPO's samples/s.

Timing: each run is a fresh child process; a wrapper stamps the start of every rollout (safealign's
`generate_tokens`, TRL's `batch_generation`), steps `warmup .. steps-2` are timed start to start (set-up
and the first steps excluded). The split of a step into generation / experience (no-grad forwards and
GAE) / update (forward + backward + optimizer) is stamped the same way in both (end of generation, first
forward with gradients). Runs are interleaved (rotating order); numbers are medians over repeats; the
ratios are medians of per-round ratios. Peak memory: peak RSS of the run's process (and its growth during
training).

    python bench/bench_ppo.py --threads 1                         # tiny and small, fp32
    python bench/bench_ppo.py --preset tiny --steps 10 --repeats 5 --threads 1
    python bench/bench_ppo.py --preset tiny --critic-layout shared_backbone      # value heads on the actor
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Trial,
    common_args,
    load_tokenizer,
    machine_line,
    precisions,
    prepare_world,
    rss_mib,
    run_in_child,
    steps_per_preset,
    work_directory,
)

FRAMEWORKS = ("safealign-ppo_lag", "safealign-ppo", "trl-ppo")
PROMPTS, TRAIN_BATCH, NEW_TOKENS, LR, CRITIC_LR = 32, 16, 64, 1e-5, 5e-6


class PhaseClock:
    """Stamps (wall, CPU) times at each rollout's start and end and at the first forward with gradients
    of each step. CPU time (process_time: all threads of the process) is less sensitive to other jobs."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, float]] = []
        self.generated: list[tuple[float, float]] = []
        self.updating: list[tuple[float, float]] = []
        self.hooked = False

    @staticmethod
    def now() -> tuple[float, float]:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # CUDA runs asynchronously: stamp a phase boundary once its kernels are done
        return time.perf_counter(), time.process_time()

    def wrap_generation(self, fn):
        def wrapped(*args, **kwargs):
            self.starts.append(self.now())
            out = fn(*args, **kwargs)
            self.generated.append(self.now())
            return out

        return wrapped

    def hook(self, model) -> None:
        """Forward pre-hook: the first grad-enabled forward after a rollout starts the update phase."""
        import torch

        def pre_hook(module, args, kwargs):
            if torch.is_grad_enabled() and len(self.updating) < len(self.starts):
                self.updating.append(self.now())

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def measure(self, warmup: int) -> dict[str, float]:
        n = len(self.starts)
        if n < warmup + 2:
            raise RuntimeError(f"{n} rollouts; need at least warmup + 2 = {warmup + 2}")
        steps = range(warmup, n - 1)
        result: dict[str, float] = {"steps": len(steps)}
        for clock, prefix in ((0, ""), (1, "cpu_")):
            result[prefix + "seconds"] = self.starts[-1][clock] - self.starts[warmup][clock]
            result[prefix + "generation"] = sum(self.generated[i][clock] - self.starts[i][clock] for i in steps)
            result[prefix + "experience"] = sum(self.updating[i][clock] - self.generated[i][clock] for i in steps)
            result[prefix + "update"] = sum(self.starts[i + 1][clock] - self.updating[i][clock] for i in steps)
        return result


def phases(row: dict[str, Any], prefix: str) -> str:
    """Seconds per step in generation / experience / update: CPU time on a CPU (steadier on a shared machine),
    wall time on a GPU (where the CPU mostly waits for kernels)."""
    return " / ".join(f"{row[prefix + phase]:.2f}" for phase in ("generation", "experience", "update"))


def prepare_models(work: Path, preset: str, seed: int) -> None:
    """work/models/<preset>/{actor, reward, cost}: the same initial weights for every run. A pretrained preset
    (smollm2) brings its own weights and tokenizer; its reward and cost models get seeded random heads."""
    from safealign.models.presets import PRETRAINED, build_causal_lm, resolve_pretrained
    from safealign.models.score_model import build_score_model, save_score_model
    from safealign.models.tokenizer import load_tokenizer as load

    out = work / "models" / preset
    if (out / "cost").is_dir():
        return
    tokenizer = load(resolve_pretrained(preset) if preset in PRETRAINED else work / "tokenizer")
    actor = build_causal_lm(preset, tokenizer, seed=seed)
    actor.save_pretrained(out / "actor")
    tokenizer.save_pretrained(out / "actor")
    for offset, name in enumerate(("reward", "cost"), start=1):
        save_score_model(build_score_model(preset, score_type=name, tokenizer=tokenizer, seed=seed + offset),
                         out / name, tokenizer)


def run_safealign(trial: Trial, models: Path, clock: PhaseClock) -> dict[str, Any]:
    import safealign.training.rl as rl
    import safealign.training.rl_setup as rl_setup
    from safealign.algorithms import ppo, ppo_lag

    options = dict(
        output_dir=trial.out_dir, actor_model=str(models / "actor"), reward_model=str(models / "reward"),
        prompt_data=str(Path(trial.work_dir) / "world" / "prompts" / "train.jsonl"), seed=trial.seed,
        max_steps=trial.steps, per_device_prompt_batch_size=PROMPTS, per_device_train_batch_size=TRAIN_BATCH,
        max_new_tokens=NEW_TOKENS, ppo_epochs=1, learning_rate=LR, critic_learning_rate=CRITIC_LR,
        mixed_precision="bf16" if trial.precision == "bf16" else "no", logging_steps=1, save_steps=-1,
        sample_steps=0, warmup_ratio=0.0, **trial.options.get("config", {}))  # e.g. critic_layout (bench_ppo_memory.py)
    rl.generate_tokens = clock.wrap_generation(rl.generate_tokens)
    original_build = rl_setup.build_causal_lm

    def build_and_hook(*args, **kwargs):  # the actor: the first model built
        model = original_build(*args, **kwargs)
        if not clock.hooked:
            clock.hook(model)
            clock.hooked = True
        return model

    rl_setup.build_causal_lm = build_and_hook
    rss_before = rss_mib()
    if trial.framework == "safealign-ppo_lag":
        metrics = ppo_lag.run(ppo_lag.PPOLagConfig(**options, cost_model=str(models / "cost")))
    else:
        metrics = ppo.run(ppo.PPOConfig(**options))
    return {"rss_before_mib": rss_before, "response_length": metrics["response_length"]}


def run_trl(trial: Trial, models: Path, clock: PhaseClock) -> dict[str, Any]:
    import torch
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from bench_rm import sequence_classifier
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from safealign.data.formatting import tokenize_prompt
    from safealign.data.loading import load_prompts
    from safealign.models.score_model import load_score_model

    tokenizer = load_tokenizer(trial)
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    prompts = [r.prompt for r in load_prompts(Path(trial.work_dir) / "world" / "prompts" / "train.jsonl")]
    dataset = Dataset.from_dict({"input_ids": [tokenize_prompt(tokenizer, p) for p in prompts[:PROMPTS * trial.steps * 2]]})
    policy = AutoModelForCausalLM.from_pretrained(models / "actor")
    reference = copy.deepcopy(policy)
    reward = sequence_classifier(load_score_model(models / "reward"))
    value = sequence_classifier(load_score_model(models / "reward"))
    args = PPOConfig(
        output_dir=trial.out_dir, seed=trial.seed, per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=1,
        num_mini_batches=PROMPTS // TRAIN_BATCH, num_ppo_epochs=1, total_episodes=PROMPTS * trial.steps,
        local_rollout_forward_batch_size=PROMPTS, response_length=NEW_TOKENS, stop_token="eos", temperature=1.0,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, kl_coef=0.02, num_sample_generations=0,
        bf16=trial.precision == "bf16", fp16=False, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, gradient_checkpointing=False)
    trl_ppo.batch_generation = clock.wrap_generation(trl_ppo.batch_generation)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward,
                         train_dataset=dataset, value_model=value)
    clock.hook(policy)
    rss_before = rss_mib()
    trainer.train()
    return {"rss_before_mib": rss_before}


def run_trial(trial: Trial) -> dict[str, Any]:
    """Worker: one run of one framework; returns the clock's measurement."""
    models = Path(trial.work_dir) / "models" / trial.preset
    clock = PhaseClock()
    extra = (run_trl if trial.framework == "trl-ppo" else run_safealign)(trial, models, clock)
    return {**clock.measure(trial.warmup), **extra, "rows_per_step": PROMPTS}


def main() -> None:
    parser = common_args(__doc__.split("\n")[0], steps="tiny=8,small=4", batch_size=PROMPTS, presets="tiny,small")
    parser.set_defaults(warmup=2)
    parser.add_argument("--critic-layout", default="full", choices=["full", "shared_backbone", "lora"],
                        help="safealign's critic layout (RLConfig.critic_layout); TRL always has its separate value model.")
    args = parser.parse_args()
    if args.batch_size != PROMPTS:
        raise SystemExit(f"the issue fixes the rollout at {PROMPTS} prompts")
    presets = args.preset.split(",")
    steps = steps_per_preset(args.steps, presets)
    with work_directory(args) as work:
        prepare_world(work, examples=2000, seed=args.seed)
        for preset in presets:
            prepare_models(work, preset, args.seed)
        print(f"machine: {machine_line(args.threads)}")
        print(f"safealign critic layout: {args.critic_layout}")
        print(f"rollout {PROMPTS} prompts x {NEW_TOKENS} new tokens, 1 PPO epoch in mini-batches of {TRAIN_BATCH}; "
              f"steps {steps} ({args.warmup} warm-up not timed); {args.repeats} interleaved rounds")
        rows = []
        for preset in presets:
            for precision in precisions(args):
                base = Trial(framework="", preset=preset, precision=precision, steps=steps[preset], warmup=args.warmup,
                             batch_size=PROMPTS, max_length=0, seed=args.seed, work_dir=str(work),
                             out_dir=str(work / "runs" / f"ppo-{preset}-{precision}"), threads=args.threads,
                             options={"config": {"critic_layout": args.critic_layout}})
                results: dict[str, list[dict]] = {f: [] for f in FRAMEWORKS}
                for r in range(args.repeats):
                    order = FRAMEWORKS[r % 3:] + FRAMEWORKS[:r % 3]
                    for framework in order:
                        trial = dataclasses.replace(base, framework=framework, out_dir=f"{base.out_dir}/{framework}-{r}")
                        res = run_in_child(__file__, trial)
                        results[framework].append(res)
                        s = res["seconds"] / res["steps"]
                        print(f"  {preset:5s} {precision} {framework:17s} round {r + 1}/{args.repeats}: "
                              f"{PROMPTS / s:6.2f} samples/s  {s:.3f} s/step (generation {res['generation'] / res['steps']:.3f}, "
                              f"experience {res['experience'] / res['steps']:.3f}, update {res['update'] / res['steps']:.3f}); "
                              f"CPU {res['cpu_seconds'] / res['steps']:.3f} s/step (generation {res['cpu_generation'] / res['steps']:.3f}, "
                              f"experience {res['cpu_experience'] / res['steps']:.3f}, update {res['cpu_update'] / res['steps']:.3f})",
                              flush=True)
                for framework, runs in results.items():
                    ratio = cpu_ratio = None
                    if framework != "trl-ppo":
                        ratio = statistics.median(t["seconds"] / t["steps"] / (a["seconds"] / a["steps"])
                                                  for a, t in zip(runs, results["trl-ppo"]))
                        cpu_ratio = statistics.median(t["cpu_seconds"] / t["steps"] / (a["cpu_seconds"] / a["steps"])
                                                      for a, t in zip(runs, results["trl-ppo"]))
                    rows.append({"preset": preset, "precision": precision, "framework": framework, "ratio": ratio,
                                 "cpu_ratio": cpu_ratio,
                                 **{k: statistics.median(x[k] / x["steps"] for x in runs)
                                    for k in ("seconds", "cpu_seconds", "generation", "experience", "update",
                                              "cpu_generation", "cpu_experience", "cpu_update")},
                                 "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in runs),
                                 "growth_mib": statistics.median(x["peak_rss_mib"] - x["rss_before_mib"] for x in runs),
                                 "peak_cuda_mib": (statistics.median(x["peak_cuda_mib"] for x in runs)
                                                   if all("peak_cuda_mib" in x for x in runs) else None)})
        print("\nPPO step: samples/s over steady-state steps (medians); speed ratios vs TRL PPO (> 1: faster), "
              "medians of per-round ratios, by wall time and by CPU time\n")
        cuda = all(row["peak_cuda_mib"] is not None for row in rows)
        phase_clock = "wall" if cuda else "CPU"
        print(f"| preset | precision | framework | samples/s | s/step | CPU s/step | {phase_clock} s: generation / experience "
              "/ update | peak RSS MiB | RSS growth MiB | speed vs TRL PPO (wall) | (CPU) |" + (" peak CUDA MiB |" if cuda else ""))
        print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
        for row in rows:
            ratio = f"**{row['ratio']:.2f}×**" if row["ratio"] is not None else ""
            cpu_ratio = f"{row['cpu_ratio']:.2f}×" if row["cpu_ratio"] is not None else ""
            print(f"| {row['preset']} | {row['precision']} | {row['framework']} | {PROMPTS / row['seconds']:.2f} "
                  f"| {row['seconds']:.3f} | {row['cpu_seconds']:.3f} | {phases(row, 'cpu_' if not cuda else '')} "
                  f"| {row['peak_rss_mib']:,.0f} | {row['growth_mib']:,.0f} | {ratio} | {cpu_ratio} |"
                  + (f" {row['peak_cuda_mib']:,.0f} |" if cuda else ""))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from common import worker_main

        worker_main(run_trial)
    else:
        main()
