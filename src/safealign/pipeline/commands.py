"""The command table: every command of safealign as data, one row per command.

Each row names the module whose function (`run`) it calls with its config class. The module is imported when the
command runs, not before, so that `safealign --help` starts at once (the stage modules import torch); `Command.load`
is the one place that imports them. A new method needs one row here (its command) and, to run inside the pipeline,
one `Stage` in `pipeline.stages.plan`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Command:
    """One command: `safealign <name>` (or, with `cli` False, a stage of the pipeline only)."""

    name: str
    module: str  # the module holding the config class and the function
    config: str  # the config class's name
    summary: str
    function: str = "run"
    cli: bool = True

    def load(self) -> tuple[type, Callable[[Any], dict[str, Any]]]:
        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.function)


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("world generate", "safealign.data.safeworld.generate", "WorldConfig",
            "Generate SafeWorld (prompts, SFT corpus, annotated preference pairs) as PKU-format files."),
    Command("sft", "safealign.algorithms.sft", "SFTConfig", "Supervised fine-tuning of the policy (loss on response tokens)."),
    Command("rm", "safealign.algorithms.reward", "RewardConfig", "Train the reward model (helpfulness, Bradley-Terry)."),
    Command("cm", "safealign.algorithms.cost", "CostConfig", "Train the cost model (harmlessness, Bradley-Terry + safety sign)."),
    Command("eval-scores", "safealign.evaluation.scores", "ScoreEvalConfig",
            "Evaluate a reward/cost model on a preference file (accuracies, gold agreement on SafeWorld, figures)."),
    Command("evaluate", "safealign.evaluation.compare", "CompareConfig",
            "Generate with a policy (--model) and judge it, or compare a set of models (--models): gold and model "
            "judges, Elo, win rates, arena."),
    Command("calibrate-judge", "safealign.evaluation.judge_calibration", "JudgeCalibrationConfig",
            "Measure an LLM judge against human labels (PyRIT's scorer evaluations): AUROC, accuracy at a threshold fitted "
            "on one half and reported on the other, refusal detection beside string matching; writes calibration.json."),
    Command("real-prompts", "safealign.data.real_splits", "RealPromptsConfig",
            "Split the real prompt sets (make real-assets) into training and held-out prompt files: harmful prompts "
            "across benchmarks, near-duplicates of a held-out prompt left out of training."),
    Command("annotate", "safealign.pipeline.ai_annotation", "AnnotateConfig",
            "RLAIF's data: sample two answers per prompt from a policy and label each pair with an AI annotator (helpful, "
            "harmless, safe; soft labels kept, cached) as PKU-format rows."),
    Command("bon", "safealign.evaluation.best_of_n", "BestOfNConfig",
            "Best-of-n at inference: sample n answers, let the reward (and cost) model choose one (reward, safe or "
            "lagrangian), judge the chosen answers; KL bound and estimate over n."),
    Command("dpo", "safealign.algorithms.dpo", "DPOConfig",
            "DPO of the policy on one preference column (helpful or harmless), or a safety-aware variant (SafeDPO, BFPO, "
            "MODPO, C-DPO's step); no rollouts. SACPO: two dpo runs."),
    Command("cdpo", "safealign.algorithms.cdpo", "CDPOConfig",
            "C-DPO: DPO on soft labels from reward − λ·cost, λ updated by dual ascent on the policy's sampled cost."),
    Command("rsft", "safealign.algorithms.rejection_sampling", "RSFTConfig",
            "Rejection-sampling fine-tuning (Llama 2): sample k, keep the best (safe-gated by the cost model), fine-tune "
            "on the best so far; in rounds."),
    Command("merge", "safealign.models.merge", "MergeConfig",
            "Linear merge of policies' weights (P-SACPO: the helpful and the SACPO policy, ratio q)."),
    Command("ppo", "safealign.algorithms.ppo", "PPOConfig", "RLHF: PPO of the policy on the reward model."),
    Command("ppo-lag", "safealign.algorithms.ppo_lag", "PPOLagConfig", "Safe RLHF: PPO-Lagrangian on the reward and cost models."),
    Command("grpo", "safealign.algorithms.grpo", "GRPOConfig",
            "Critic-free RLHF: GRPO (or RLOO) of the policy on the reward model, k answers per prompt as each other's baseline."),
    Command("grpo-lag", "safealign.algorithms.grpo_lag", "GRPOLagConfig",
            "Safe RLHF without critics: GRPO on reward and cost advantages normalised per stream, weighed by PPO-Lag's λ."),
    Command("p3o", "safealign.algorithms.p3o", "P3OConfig",
            "Critic-free pairwise RLHF: P3O of the policy on the reward model, the clipped policy gradient on the "
            "difference of two answers' KL-regularised rewards."),
    Command("p3o-lag", "safealign.algorithms.p3o_lag", "P3OLagConfig",
            "Safe P3O: P3O on the pair's difference of (reward − λ·cost)/(1 + λ), λ PPO-Lag's."),
    Command("shaping", "safealign.algorithms.reward_shaping", "RewardShapingConfig",
            "Baseline: PPO on the shaped reward R - nu*C (nu fixed, or a sweep)."),
    Command("redteam", "safealign.pipeline.redteam", "RedTeamConfig",
            "One red-teaming round's data: probe a policy, gather unsafe prompts, sample and annotate new pairs (SafeWorld)."),
    Command("compare", "safealign.evaluation.compare", "RunComparisonConfig",
            "Compare every evaluated policy of a pipeline run directory (Elo, win rates, arena) into eval/compare/.",
            function="run_comparison"),
    Command("report", "safealign.evaluation.report", "ReportConfig",
            "Render a run directory as report.html (self-contained), report.md and report.json."),
    Command("pipeline", "safealign.pipeline.runner", "PipelineConfig",
            "The main job: SafeWorld -> SFT -> reward + cost models -> Safe RLHF and baselines -> evaluation, in one run directory."),
    Command("rlaif", "safealign.pipeline.rlaif", "RLAIFConfig",
            "Safe RLHF from AI feedback on real text: real prompts -> a calibrated AI annotator labels the starting "
            "policy's answer pairs -> reward and cost models -> PPO-Lagrangian (LoRA) -> both policies judged on held-out "
            "benchmarks (configs/rlaif.yaml)."),
    Command("seeds", "safealign.pipeline.seeds", "SeedsConfig",
            "The pipeline once per seed (--seeds \"[0, 1, 2]\", --jobs at once), then the summary over the runs (seeds.html)."),
    Command("aggregate", "safealign.evaluation.aggregate", "AggregateConfig",
            "Summarise finished pipeline runs (e.g. one per seed): claims counted over runs, numbers as mean ± std (seeds.html)."),
    # A policy's gold evaluation as a pipeline stage (on the command line it is `safealign evaluate --model`).
    Command("evaluate-policy", "safealign.evaluation.gold", "GoldEvalConfig", "Sample a policy and judge it.", cli=False),
    Command("evaluate-real", "safealign.evaluation.real_text", "GoldEvalConfig",
            "Sample a policy on real prompts and judge it with an LLM judge.", cli=False),
]}
