"""Reward model: Bradley-Terry on the helpfulness preference (docs/maths.md §2), initialised from the SFT model.

    L_R = mean_B[ −log σ(r_b − r_w) ] + η · mean(r_b², r_w²)        (`losses.reward_loss`)

With annotators who disagree (`labels: soft | dawid-skene`, `label_smoothing`: data/label_aggregation.py) the label is
q = P(response_0 more helpful) and the loss its cross-entropy, −q·log σ(r_0 − r_1) − (1 − q)·log σ(r_1 − r_0)
(`losses.soft_reward_loss`).

`head: mean_variance` (DPL, Siththaranjan et al. 2024) gives each response a reward N(μ, σ²): the score model has a
second output, σ = softplus(·), and P(response_0 preferred) = Φ(z) ≈ σ(√(2π)·z), z = (μ_0 − μ_1)/√(σ_0² + σ_1²)
(`losses.mean_variance_reward_loss`, hard or soft labels). μ is the score the RL stages read; σ says where the
annotators disagree (eval_std_* in the metrics).

Pairs, batching (both responses in one forward), the loop and the saved score model are shared with the cost model
(`preference_model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from safealign.algorithms.losses import mean_variance_reward_loss, reward_loss, soft_reward_loss
from safealign.algorithms.preference_model import PairStep, PreferenceModelConfig, pick, train_preference_model
from safealign.config import config_field


@dataclass
class RewardConfig(PreferenceModelConfig):
    """Reward model on `better_response_id`. Defaults suit the tiny preset's SFT model on SafeWorld."""

    output_dir: str = config_field("runs/rm", help="Run directory: config.yaml, logs/, checkpoints/, model/ (a reward score model), metrics.json.")
    num_epochs: float = config_field(2.0, help="Passes over the training pairs (fractions allowed); ignored when max_steps > 0.")
    learning_rate: float = config_field(5e-4, help="Peak learning rate of AdamW (5e-4 for the tiny preset; ~1e-5 for a pretrained model).")
    head: Literal["scalar", "mean_variance"] = config_field(
        "scalar", help="scalar: one reward per response (Bradley-Terry); mean_variance: a mean and a σ per response (DPL's "
                       "distributional reward model: contested pairs can be fitted by σ; the mean is the reward).")


class RewardStep(PairStep):
    """Bradley-Terry on the more helpful response; logs accuracy, mean better/worse scores, score std."""

    def __init__(self, l2_coeff: float = 1e-3, head: str = "scalar") -> None:
        self.l2_coeff, self.head = l2_coeff, head
        self.outputs = 2 if head == "mean_variance" else 1

    def loss(self, model, batch, num_items):
        scores, stds = self.pair_outputs(model, batch)  # size = (B, 2) each (stds None for a scalar head)
        better = pick(scores, batch["better_response_id"])  # size = (B,)
        worse = pick(scores, 1 - batch["better_response_id"])  # size = (B,)
        share = len(better) / num_items  # this micro-batch's share of the step's pairs
        # soft labels (labels: soft / dawid-skene, label_smoothing), else the majority label as q ∈ {0, 1}
        first_better = batch["targets"][:, 0] if "targets" in batch else (batch["better_response_id"] == 0).float()
        if stds is not None:
            loss = mean_variance_reward_loss(scores, stds, first_better, self.l2_coeff) * share
        elif "targets" in batch:
            loss = soft_reward_loss(scores, first_better, self.l2_coeff) * share
        else:
            loss = reward_loss(better, worse, self.l2_coeff) * share
        detached = scores.detach()
        logged = {
            "accuracy": (better > worse).float().sum() / num_items,
            "better_score": better.detach().sum() / num_items,
            "worse_score": worse.detach().sum() / num_items,
            "score_std": detached.std() * share,  # within each micro-batch, averaged
        }
        if stds is not None:
            logged["predicted_std"] = stds.detach().mean() * share
        return loss, logged

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        table = self.score_table(model, loader, accelerator)
        better = pick(table["scores"], table["better_response_id"])  # size = (N,)
        worse = pick(table["scores"], 1 - table["better_response_id"])  # size = (N,)
        extra = {}
        if "stds" in table:
            first_better = (table["better_response_id"] == 0).float()
            extra = {"mean_variance_loss": mean_variance_reward_loss(table["scores"], table["stds"], first_better,
                                                                     self.l2_coeff).item(),
                     "predicted_std": table["stds"].mean().item()}
        return {
            **extra,
            "loss": reward_loss(better, worse, self.l2_coeff).item(),
            "accuracy": (better > worse).float().mean().item(),
            "better_score": better.mean().item(),
            "worse_score": worse.mean().item(),
            "score_mean": table["scores"].mean().item(),
            "score_std": table["scores"].std().item(),
        }


def run(cfg: RewardConfig) -> dict[str, Any]:
    """Train the reward model; returns flat metrics (eval_accuracy, eval_loss, ...)."""
    return train_preference_model(cfg, "reward", RewardStep(cfg.l2_coeff, cfg.head))
