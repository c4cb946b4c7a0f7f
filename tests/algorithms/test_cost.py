"""Cost model on a tiny SafeWorld: which response is the less safe one, signs, learning, the classifier ablation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import safealign.algorithms.cost as cost_module
from safealign.algorithms.cost import CostConfig, CostStep, run
from safealign.algorithms.losses import cost_loss, soft_cost_loss
from safealign.config import ConfigError
from safealign.data.augment import splice_unsafe_pairs
from safealign.data.loading import load_preferences
from safealign.data.safeworld import judge_harm
from safealign.evaluation.scores import ScoreEvalConfig
from safealign.evaluation.scores import run as eval_scores
from safealign.models.category_head import load_category_head, prompt_category_labels
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world(world_backbone) -> dict[str, Path]:
    """A small SafeWorld and an untrained `tiny` backbone saved as a directory (tests/conftest.py)."""
    return world_backbone("cm", seed=1, train_pairs=400, test_pairs=160)


def config(world, name: str, **overrides) -> CostConfig:
    settings = dict(per_device_train_batch_size=16, logging_steps=5, save_steps=-1, mixed_precision="no") | overrides
    return CostConfig(model=str(world["backbone"]), train_data=str(world["train"]), eval_data=str(world["test"]),
                      output_dir=str(world["root"] / name), **settings)


class FixedScores(torch.nn.Module):
    """A stand-in score model: the end score of row k is scores[k] (rows: response_0 of each pair, then response_1)."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(end_scores=self.scores * 1.0)


def test_cost_step_takes_the_unchosen_response_as_the_less_safe_with_label_signs():
    # Pair 0: safer = 1, response 0 unsafe, 1 safe. Pair 1: safer = 0, both labelled unsafe.
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "better_response_id": torch.tensor([0, 0]), "safer_response_id": torch.tensor([1, 0]),
             "is_safe": torch.tensor([[False, True], [False, False]])}
    model = FixedScores([2.0, 0.5, -1.0, 3.0])  # c(p0 r0), c(p1 r0), c(p0 r1), c(p1 r1)
    loss, logged = CostStep(l2_coeff=1e-3).loss(model, batch, torch.tensor(2.0))
    unsafer, safer = torch.tensor([2.0, 3.0]), torch.tensor([-1.0, 0.5])
    expected = cost_loss(unsafer, safer, torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0]), 1e-3)
    torch.testing.assert_close(loss, expected)
    assert logged["ranking_accuracy"].item() == 1.0
    assert logged["sign_accuracy"].item() == 1.0  # every sign right: +, -, + (labelled unsafe), + (labelled unsafe)
    classifier, _ = CostStep(l2_coeff=1e-3, use_pairwise=False).loss(model, batch, torch.tensor(2.0))
    torch.testing.assert_close(classifier, cost_loss(unsafer, safer, torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0]),
                                                     1e-3, use_pairwise=False))


def test_cost_step_with_soft_labels_is_the_soft_cost_loss():
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "better_response_id": torch.tensor([0, 0]), "safer_response_id": torch.tensor([1, 0]),
             "is_safe": torch.tensor([[False, True], [False, False]]),
             "targets": torch.tensor([[1.0, 1 / 3, 2 / 3, 0.0], [1.0, 1.0, 1.0, 2 / 3]])}  # 2-of-3 votes
    model = FixedScores([2.0, 0.5, -1.0, 3.0])
    loss, _ = CostStep(l2_coeff=1e-3).loss(model, batch, torch.tensor(2.0))
    costs = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    torch.testing.assert_close(loss, soft_cost_loss(costs, batch["targets"][:, 1], batch["targets"][:, 2:], 1e-3))


def test_dawid_skene_labels_train_a_cost_model_and_report_each_annotators_reliability(world):
    metrics = run(config(world, "ds", max_steps=3, labels="dawid-skene", eval_on_start=True))
    assert metrics["labels/labels"] == "dawid-skene" and metrics["labels/rows_without_votes"] == 0
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    accuracy = json.loads((world["root"] / "ds" / "annotators.json").read_text())
    assert set(accuracy) == {"better", "safer", "safe"} and len(accuracy["safe"]) > 3
    assert all(0 < a < 1 for a in accuracy["safe"].values())


def test_cost_training_learns_the_safety_sign(world):
    # the head on this small world's 371 prompts needs more regularisation than the default (chosen on SafeWorld's)
    cfg = config(world, "run", max_steps=40, eval_on_start=True, category_head=True, category_head_l2=1e-4)
    metrics = run(cfg)
    assert metrics["eval_sign_accuracy"] >= 0.8, metrics
    assert metrics["eval_ranking_accuracy"] > metrics["initial_eval_ranking_accuracy"], metrics
    assert metrics["eval_loss"] < metrics["initial_eval_loss"], metrics
    assert metrics["eval_cost_mean_labelled_unsafe"] > 0 > metrics["eval_cost_mean_labelled_safe"]
    # Against SafeWorld's gold harm judge (evaluation's job): signs, and ranking on pairs with one harmful response.
    gold = eval_scores(ScoreEvalConfig(cost_model=str(Path(cfg.output_dir) / "model"), data=cfg.eval_data,
                                       output_dir=str(Path(cfg.output_dir) / "scores")))
    assert gold["gold_sign_accuracy"] >= 0.8 and 0.9 < gold["annotator_gold_sign_accuracy"] <= 1.0
    assert gold["gold_ranking_accuracy"] >= 0.85, gold
    model = load_score_model(Path(cfg.output_dir) / "model")
    assert model.score_type == "cost"
    assert json.loads((Path(cfg.output_dir) / "metrics.json").read_text()) == metrics
    # The category head beside it: which harm category a held-out prompt asks about, better than saying "none" always.
    head = load_category_head(Path(cfg.output_dir) / "model")
    _, _, labels = prompt_category_labels(load_preferences(cfg.eval_data).records)
    no_category = (labels.sum(1) == 0).double().mean().item()
    assert head is not None and len(head.categories) >= 5
    assert metrics["category_head_eval_prompt_category_accuracy"] > no_category + 0.04, (metrics, no_category)
    assert metrics["category_head_eval_f1"] > 0.25 and metrics["category_head_train_f1"] > 0.5, metrics


def test_classifier_variant_trains_on_the_sign_terms_only(world, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_pairwise", args[5] if len(args) > 5 else True))
        return cost_loss(*args, **kwargs)

    monkeypatch.setattr(cost_module, "cost_loss", spy)
    metrics = run(config(world, "classifier", max_steps=2, variant="classifier"))
    assert metrics["global_step"] == 2
    assert seen and not any(seen)


def test_spliced_pairs_teach_the_cost_model_that_harm_inside_safe_text_is_unsafe(world):
    """Same steps and seed, with and without spliced training pairs: on held-out spliced responses (a safe
    answer with a sentence of an unsafe one inside), the spliced model scores more of them unsafe, and its
    held-out sign accuracy on ordinary pairs stays high. The held-out pairs are never spliced."""
    # 120 steps: at 40 the tiny models' flagged shares were noise on SafeWorld 2's crowdworker labels (0.40 vs 0.00,
    # 0.04 vs 0.04, 0.51 vs 0.80 for world seeds 1, 2, 3); at 120, 0.13 vs 0.64, 0.02 vs 0.52, 0.11 vs 0.53.
    plain = run(config(world, "plain", max_steps=120, eval_steps=-1, per_device_train_batch_size=8))
    spliced = run(config(world, "spliced", max_steps=120, eval_steps=-1, per_device_train_batch_size=8,
                             splice_fraction=1.0))
    assert plain["added_train_pairs"] == 0 < spliced["added_train_pairs"]
    assert spliced["train_pairs"] == plain["train_pairs"] + spliced["added_train_pairs"]
    assert spliced["eval_pairs"] == plain["eval_pairs"]
    assert spliced["eval_sign_accuracy"] >= 0.8, spliced

    held_out = [r for r in splice_unsafe_pairs(load_preferences(world["test"]).records, 1.0, seed=7)
                if not judge_harm(r.prompt, r.response_1).is_safe]  # gold-unsafe spliced answers only
    assert len(held_out) >= 20
    tokenizer = load_tokenizer(world["backbone"])
    flagged = {}
    for name in ("plain", "spliced"):
        model = load_score_model(world["root"] / name / "model")
        costs = score_texts(model, tokenizer, [r.prompt for r in held_out], [r.response_1 for r in held_out], 256)
        flagged[name] = sum(c > 0 for c in costs) / len(costs)
    assert flagged["spliced"] >= flagged["plain"] + 0.25, flagged  # measured: 0.64 vs 0.13 of 47 answers


def test_splice_fraction_out_of_range_is_a_config_error(world):
    with pytest.raises(ConfigError, match="splice_fraction"):
        run(config(world, "bad", max_steps=1, splice_fraction=2.0))
