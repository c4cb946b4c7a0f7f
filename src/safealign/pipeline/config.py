"""The pipeline's settings: `PipelineConfig`, the size profiles, and the per-stage settings they resolve to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from safealign.config import config_field

# Profiles set sizes only; every value can still be overridden in the YAML or on the command line.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "world": {"sft_examples": 3000, "train_pairs": 2000, "test_pairs": 400, "redteam_prompts": 56},
        "sft": {"num_epochs": 1},
        # Half an epoch: the quick profile is a smoke test (a few minutes with round 2), not a calibrated run.
        "rm": {"num_epochs": 0.5},
        "cm": {"num_epochs": 0.5},
        "evaluate": {"limit": 200},
        "ppo_lag": {"max_steps": 8, "per_device_prompt_batch_size": 16},
        "ppo": {"max_steps": 8, "per_device_prompt_batch_size": 16},
        "grpo_lag": {"max_steps": 2, "per_device_prompt_batch_size": 16},
        "grpo": {"max_steps": 2, "per_device_prompt_batch_size": 16},
        "p3o_lag": {"max_steps": 2, "per_device_prompt_batch_size": 16},
        "p3o": {"max_steps": 2, "per_device_prompt_batch_size": 16},
        "shaping": {"max_steps": 4, "per_device_prompt_batch_size": 16, "nus": [1.0]},
        # Round 2 at smoke-test size: it exercises every round stage, it does not train much.
        "redteam": {"probe_limit": 64, "pairs": 100},
        "round_rm": {"max_steps": 4},
        "round_cm": {"max_steps": 4},
        "round_ppo_lag": {"max_steps": 2},
    },
    # Sized for a 2-core CPU (docs/results.md has every stage's time and what the sizes were chosen against). SFT
    # keeps 3 epochs (with 2 the policy is undertrained); the cost model saturates after 1 epoch, the reward model
    # gets 2; round 1's RL 60 rollouts of 32 prompts; the shaping sweep 40 rollouts per ν.
    "default": {
        "cm": {"num_epochs": 1},
        # Four sampled answers per test prompt: with one, a round's harmful rate moves by ±3 points from sampling alone.
        "evaluate": {"samples_per_prompt": 4},
        "ppo_lag": {"max_steps": 60},
        "ppo": {"max_steps": 60},
        # Critic-free RL: PPO-Lag's 32 prompts per step, mini-batches and epochs, 4 answers per prompt; 12 steps cost
        # about half of PPO-Lag's 60 in CPU time (a step of 128 rows is 2.2× PPO-Lag's of 32: docs/results.md).
        "grpo_lag": {"max_steps": 12},
        "grpo": {"max_steps": 12},
        # P3O: 2 answers per prompt, so 24 steps of 32 prompts give GRPO's rows per run (12 × 32 × 4).
        "p3o_lag": {"max_steps": 24},
        "p3o": {"max_steps": 24},
        "shaping": {"max_steps": 40},
        # Rounds 2 and 3 must be cheap: the value models warm start from the previous round's and see a quarter
        # epoch of all the pairs so far.
        "redteam": {"probe_limit": 256, "pairs": 1000},
        "round_rm": {"num_epochs": 0.25},
        "round_cm": {"num_epochs": 0.25},
        # The later rounds end every answer or pay for it (TRL's missing_eos_penalty): without it their policies drift
        # to answers cut at max_new_tokens, text the score models never saw. Not in round 1, where it made the policy
        # more harmful.
        "round_ppo_lag": {"max_steps": 20, "missing_eos_penalty": 1.0},
    },
}
PROFILE_ROUNDS = {"quick": 2, "default": 3}  # Safe RLHF rounds when `rounds` is 0 (the paper ran 3)
SHAPING_NUS = [0.1, 1.0, 10.0]  # the default ν sweep (small: stays harmful; large: over-refuses)
HOW_TO_RUN = ("stages", "parallel_baselines")  # settings that change what runs or how, not what a stage computes


@dataclass
class PipelineConfig:
    output_dir: str = config_field("runs/demo", help="Run directory: every stage writes a sub-directory here.")
    profile: Literal["default", "quick"] = config_field("default", help="Sizes preset: 'quick' is the smoke-test size.")
    seed: int = config_field(0, help="Seed of the world and of every stage (each stage may override its own).")
    model: str = config_field("tiny", help="Policy: a preset (tiny, small, smollm2) or a local Hugging Face model directory.")
    stages: list[str] = config_field(
        ["world", "sft", "evaluate_sft", "rm", "cm", "eval_scores", "ppo_lag", "evaluate_ppo_lag", "rounds", "ppo",
         "evaluate_ppo", "shaping", "evaluate_shaping", "compare", "report"],
        help="Stages to run, in order (skipped when their metrics.json exists; compare and report always run, they are "
             "cheap and must see every policy). `rounds` = rounds 2.. (round{k}/redteam, /rm, /cm, /eval_scores, "
             "/ppo_lag, /evaluate), `shaping` and `evaluate_shaping` = one stage per ν (shaping/nu=ν); each also a stage name. "
             "The DPO family and best-of-n (configs/methods.yaml): dpo_helpful, dpo_harmless, safedpo, bfpo, modpo, sacpo, "
             "psacpo, cdpo, rsft (each with evaluate_<name>), bon, safe_bon. Critic-free RL: grpo_lag, grpo, p3o_lag, p3o; "
             "PPO-Lag with one λ per prompt category: ppo_lag_category (each with evaluate_<name>).",
    )
    rounds: int = config_field(
        0, help="Safe RLHF rounds (the paper ran 3): round 1 = the ppo_lag stage, rounds 2.. = the rounds stage; 0 = the profile's (default 3, quick 2).")
    round_thresholds: list[float] = config_field(
        [], help="d of each round's PPO-Lag, round 1 first (it replaces ppo_lag's threshold there); [] = ppo_lag's threshold every round.")
    round_threshold_quantile: float = config_field(
        0.0, help="In (0, 1): d of rounds >= 2 = this quantile of the round's cost model's costs on the round's new answers the "
                  "crowdworkers labelled safe (ppo-lag's threshold_quantile on round{k}/redteam/pairs.jsonl), instead of a fixed d; 0 = off.")
    round_ptx_coeff: float = config_field(
        0.0, help="γ_ptx of rounds >= 2's PPO-Lag: the PTX term (the language-modelling loss on the SFT data, sft_data or "
                  "SafeWorld's) weighed by this; 0 = off. It keeps the later rounds' policies a language model of that data.")
    first_round_ptx_coeff: float = config_field(
        0.0, help="γ_ptx of round 1's PPO-Lag (the ppo_lag stage, and ppo_lag_category): the PTX term on the SFT data, as "
                  "round_ptx_coeff gives rounds >= 2 (ppo_lag's ptx_max_cost applies); 0 = off.")
    round_value_models: Literal["previous", "sft"] = config_field(
        "previous", help="Round k's reward/cost models start from round k-1's (cheap: see round_rm) or from the SFT model (the paper's retraining: give round_rm/round_cm num_epochs 2).")
    round_lambda: Literal["init", "carry"] = config_field(
        "init", help="λ at the start of round k >= 2: init = ppo_lag's lambda_init again (as separate runs of the paper), "
                     "carry = round k-1's final λ (the dual continues).")
    round_preference_data: list[str] = config_field(
        [], help="Your annotated PKU-format pairs of rounds 2, 3, ... (one file each) instead of sampled pairs labelled by SafeWorld's crowdworkers; required with your own preference_data.")
    sft_data: str = config_field("", help="Your SFT file; empty = SafeWorld's SFT corpus.")
    preference_data: str = config_field("", help="Your PKU-format preference file (train); empty = SafeWorld's pairs.")
    preference_eval_data: str = config_field(
        "", help="Held-out preference file; empty = SafeWorld's test pairs (with your preference_data: rm/cm hold out a fraction).")
    eval_prompts: str = config_field("", help="Prompt file for evaluation; empty = SafeWorld's prompts of eval_split.")
    eval_split: str = config_field(
        "test", help="SafeWorld split that evaluates the policies and scores the value models: test, or dev to choose defaults without looking at test.")
    rl_prompts: str = config_field(
        "", help="Prompts of the RL rollouts; empty = SafeWorld's train prompts (with your own data: preference_data's prompts).")
    world: dict = config_field({}, help="WorldConfig overrides (safealign world generate --help).")
    sft: dict = config_field({}, help="SFTConfig overrides (safealign sft --help).")
    rm: dict = config_field({}, help="RewardConfig overrides (safealign rm --help).")
    cm: dict = config_field({}, help="CostConfig overrides (safealign cm --help).")
    evaluate: dict = config_field({}, help="GoldEvalConfig overrides of every policy's evaluation (safealign evaluate --help).")
    eval_scores: dict = config_field({}, help="ScoreEvalConfig overrides (safealign eval-scores --help).")
    ppo_lag: dict = config_field({}, help="PPOLagConfig overrides (safealign ppo-lag --help).")
    ppo: dict = config_field({}, help="PPOConfig overrides (safealign ppo --help).")
    shaping: dict = config_field(
        {}, help="RewardShapingConfig overrides (safealign shaping --help); `nus` is the sweep, one policy per ν (default [0.1, 1, 10]).")
    redteam: dict = config_field({}, help="RedTeamConfig overrides of rounds >= 2 (safealign redteam --help): pairs, probe_limit, prompt_mix, ...")
    round_rm: dict = config_field({}, help="RewardConfig overrides of rounds >= 2, over rm's (e.g. num_epochs).")
    round_cm: dict = config_field({}, help="CostConfig overrides of rounds >= 2, over cm's (e.g. num_epochs).")
    round_ppo_lag: dict = config_field({}, help="PPOLagConfig overrides of rounds >= 2, over ppo_lag's (e.g. max_steps).")
    compare: dict = config_field({}, help="CompareConfig overrides of the compare stage (safealign evaluate --help): n_bootstrap, seed, ...")
    dpo: dict = config_field({}, help="DPOConfig overrides of every DPO-family stage (dpo_helpful, dpo_harmless, safedpo, bfpo, modpo, sacpo, cdpo; safealign dpo --help).")
    sacpo: dict = config_field({}, help="DPOConfig overrides of SACPO's second step, over dpo's (default beta 0.05: β/λ).")
    psacpo: dict = config_field({}, help="MergeConfig overrides of P-SACPO's merge (default weights [0.5, 0.5]: q = 0.5).")
    cdpo: dict = config_field({}, help="CDPOConfig overrides of C-DPO, over dpo's (safealign cdpo --help): iterations, lambda_lr, threshold, ...")
    rsft: dict = config_field({}, help="RSFTConfig overrides of rejection-sampling fine-tuning (safealign rsft --help): rounds, k, num_prompts, mode, threshold, ... With Safe RLHF's later rounds among the stages (list rsft after `rounds`), RS-FT runs one round per Safe RLHF round, round k ranking by round k's reward and cost models.")
    grpo_lag: dict = config_field({}, help="GRPOLagConfig overrides of the grpo_lag stage (safealign grpo-lag --help); its d is round 1's, the rest of ppo_lag's constraint is not inherited (one λ by default): {constraint_per_category: true, category_thresholds: {none: 10.0}, ptx_data: <SFT data>, ptx_coeff: 0.25, ptx_max_cost: 0.0} is round 1's recipe (docs/results.md).")
    grpo: dict = config_field({}, help="GRPOConfig overrides of the grpo stage (safealign grpo --help), plain GRPO: the λ = 0 baseline.")
    p3o_lag: dict = config_field({}, help="P3OLagConfig overrides of the p3o_lag stage (safealign p3o-lag --help); its d is round 1's.")
    p3o: dict = config_field({}, help="P3OConfig overrides of the p3o stage (safealign p3o --help), plain P3O: the λ = 0 baseline.")
    ppo_lag_category: dict = config_field(
        {}, help="PPOLagConfig overrides of the ppo_lag_category stage, over ppo_lag's (category_thresholds, refusal_floor, "
                 "constraint_form, ...); constraint_per_category is on; its d is round 1's.")
    bon: dict = config_field({}, help="BestOfNConfig overrides of the bon and safe_bon stages (safealign bon --help): n, threshold, ... (samples_per_prompt and limit follow evaluate's).")
    parallel_baselines: bool = config_field(
        False, help="Run the baselines (evaluate_sft, eval_scores, ppo, shaping and their evaluations) in a second process beside "
                    "the Safe RLHF lane (ppo_lag, rounds), the CPU threads split between the two: faster on a CPU "
                    "(generation uses a second thread poorly) and on a GPU that small models leave idle; both processes "
                    "hold their models on the GPU. The results are the same; its log: output_dir/logs/baselines.log.")


def stage_settings(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    """Profile values, then the user's mapping for that stage (the user wins)."""
    return {**PROFILES[cfg.profile].get(name, {}), **getattr(cfg, name)}


def num_rounds(cfg: PipelineConfig) -> int:
    return cfg.rounds or PROFILE_ROUNDS[cfg.profile]


def shaping_nus(cfg: PipelineConfig) -> list[float]:
    return [float(nu) for nu in stage_settings(cfg, "shaping").get("nus") or SHAPING_NUS]
