"""What the reward and the cost model share (`reward.py`, `cost.py` import it), written once:

- `PreferenceModelConfig`: the options of both (backbone, data, max_length, η, contradictions);
- the pair dataset: each pair tokenised as prompt + response_i + EOS for i = 0, 1 (`data.formatting.tokenize_pairs`),
  ONE batch of 2B rows (the B response_0 rows, then the B response_1 rows), right-padded together
  (`data.collate.collate_pairs`), so that both responses of every pair are scored in a single forward
  (`PairStep.pair_scores`);
- `train_preference_model`: load and split the data, build the score model, run the supervised loop
  (`training.supervised.train`), save it as a score model (`output_dir/model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from accelerate import PartialState

from safealign.config import ConfigError, config_field
from safealign.data.collate import collate_pairs
from safealign.data.formatting import TokenizedPair, tokenize_pairs, training_text
from safealign.data.label_aggregation import LabelMode, hard_targets, label_targets
from safealign.data.loading import PreferenceDataset, load_preferences, split_eval
from safealign.data.schema import PreferenceRecord
from safealign.io import atomic_write_json
from safealign.models.lora import require_pretrained_base
from safealign.models.presets import PRESETS, PRETRAINED, looks_local
from safealign.models.score_model import ScoreType, build_score_model
from safealign.training.common import prepare_tokenizer
from safealign.training.supervised import Step, SupervisedConfig, train


@dataclass
class PreferenceModelConfig(SupervisedConfig):
    """Options shared by the reward and cost models (trained on PKU-format preference pairs)."""

    model: str = config_field("runs/sft/model", help="Backbone: the SFT model directory (as in the paper), a preset (tiny, small: from scratch) or a HF model directory.")
    tokenizer: str = config_field("", help="Tokenizer directory; '' = the model directory's, or for a preset a BPE trained on train_data.")
    vocab_size: int = config_field(2048, help="Vocabulary of the BPE trained for a preset.")
    train_data: str = config_field("", help="Preference pairs (PKU-SafeRLHF format): a JSONL/JSON/Parquet/CSV file or a datasets directory.")
    eval_data: str = config_field("", help="Held-out preference pairs; '' = hold out eval_fraction of train_data.")
    eval_fraction: float = config_field(0.1, help="Fraction of train_data held out for evaluation when eval_data is empty (0 = none).")
    max_length: int = config_field(256, help="Tokens per scored text (prompt + response + EOS); longer ones lose the prompt's start.")
    l2_coeff: float = config_field(1e-3, help="η: L2 regulariser on the end scores, η·mean(score²) (reference 1e-3).")
    on_contradiction: Literal["skip", "error"] = config_field("skip", help="Pairs whose safer response is labelled unsafe and the other safe: skip (counted) or error.")
    per_device_train_batch_size: int = config_field(32, help="Pairs per micro-batch on each process (2× that many texts per forward).")
    per_device_eval_batch_size: int = config_field(64, help="Pairs per evaluation batch on each process.")
    labels: LabelMode = config_field(
        "majority", help="The training targets when several annotators voted (rows with better_votes, safer_votes, "
                         "safe_votes_0/1, annotator_ids; SafeWorld writes them): majority (the row's labels), soft (vote "
                         "shares in the loss), dawid-skene (posteriors with per-annotator reliability by EM). Held-out "
                         "pairs keep their labels.")
    label_smoothing: float = config_field(
        0.0, help="ε: every training target pulled toward 1/2, q ← (1 − ε)q + ε/2 (label-smoothed Bradley-Terry).")
    length_group_size: int = config_field(
        8, help="Group pairs of similar length: each run of this many steps' pairs is sorted by length before batching "
                "(less padding; the loss is a mean over pairs, so no pair weighs more); 1 = plain shuffling.")


def pick(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """scores (B, 2), index (B,) in {0, 1} -> scores[b, index[b]], size (B,)."""
    return scores.gather(1, index.long().unsqueeze(1)).squeeze(1)


class PairStep(Step):
    """Scores both responses of each pair in one forward; the loss averages over pairs."""

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["better_response_id"])

    def example_length(self, example: TokenizedPair) -> int:
        return max(len(ids) for ids in example.input_ids)  # both rows pad to the batch's longest

    outputs = 1  # the score model's outputs per token (2: a mean-variance reward model)

    @staticmethod
    def pair_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """End scores of the 2B rows of `collate_pairs`, as (B, 2): column i = response_i."""
        return PairStep.pair_outputs(model, batch)[0]

    @staticmethod
    def pair_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """End scores (B, 2) and, for a mean-variance reward model, end σ (B, 2); column i = response_i."""
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        stds = getattr(output, "end_stds", None)  # a scalar head has none
        stds = None if stds is None else stds.view(2, -1).T  # size = (B, 2)
        return output.end_scores.view(2, -1).T, stds  # size = (B, 2)

    def score_table(self, model: torch.nn.Module, loader, accelerator) -> dict[str, torch.Tensor]:
        """Scores and labels of the whole evaluation set, gathered over processes (padding repeats dropped)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in loader:
            scores, stds = self.pair_outputs(model, batch)  # size = (B, 2) each
            gathered = accelerator.gather_for_metrics({
                "scores": scores,
                **({} if stds is None else {"stds": stds}),
                "better_response_id": batch["better_response_id"],  # size = (B,)
                "safer_response_id": batch["safer_response_id"],  # size = (B,)
                "is_safe": batch["is_safe"],  # size = (B, 2)
            })
            for name, value in gathered.items():
                parts.setdefault(name, []).append(value.cpu())
        return {name: torch.cat(values) for name, values in parts.items()}


def _require_backbone(name: str) -> None:
    if name in PRESETS or name in PRETRAINED or Path(name).expanduser().exists():
        return
    if looks_local(name):
        raise FileNotFoundError(f"model '{name}' not found: give the SFT model directory (e.g. runs/sft/model) "
                                f"or a preset ({', '.join(PRESETS)})")


def load_pair_splits(cfg: PreferenceModelConfig) -> tuple[PreferenceDataset, PreferenceDataset | None, list, list]:
    """(train set, eval set or None, train records, held-out records): eval_data, or eval_fraction of train_data held
    out with cfg.seed (the same split on every call)."""
    train_set = load_preferences(cfg.train_data, on_contradiction=cfg.on_contradiction)
    eval_set = load_preferences(cfg.eval_data, on_contradiction=cfg.on_contradiction) if cfg.eval_data else None
    if eval_set is not None:
        return train_set, eval_set, list(train_set.records), list(eval_set.records)
    train_records, eval_records = split_eval(list(train_set.records), cfg.eval_fraction, cfg.seed)
    return train_set, None, train_records, eval_records


def train_preference_model(
    cfg: PreferenceModelConfig,
    score_type: ScoreType,
    step: PairStep,
    extra_train_pairs: Callable[[list[PreferenceRecord]], list[PreferenceRecord]] | None = None,
) -> dict[str, Any]:
    """Train a reward or cost model with `step` on cfg's pairs; returns (and writes) the flat metrics.

    `extra_train_pairs(train_records)` adds pairs to the training set only (the cost model's spliced pairs);
    the held-out pairs stay as given. The saved model (`output_dir/model`) is a score model; its agreement with
    SafeWorld's gold judges is measured by `safealign eval-scores` (evaluation), not here.
    """
    stage = "rm" if score_type == "reward" else "cm"
    if not cfg.train_data:
        raise ConfigError(f"{stage}: train_data is required (a PKU-format preference file)")
    if cfg.l2_coeff < 0:
        raise ConfigError(f"{stage}: l2_coeff must be >= 0, got {cfg.l2_coeff}")
    _require_backbone(cfg.model)
    if cfg.adapter == "lora":
        require_pretrained_base(cfg.model, stage)
    train_set, eval_set, train_records, eval_records = load_pair_splits(cfg)
    added = extra_train_pairs(train_records) if extra_train_pairs is not None else []
    train_records = train_records + added
    tokenizer = prepare_tokenizer(cfg.tokenizer, cfg.model, cfg.output_dir, cfg.vocab_size, cfg.resume,
                                  lambda: [training_text(r.prompt, r.response(i)) for r in train_records for i in (0, 1)])
    model = build_score_model(cfg.model, score_type=score_type, tokenizer=tokenizer, seed=cfg.seed, outputs=step.outputs)
    collate = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
    targets, label_info = None, {}
    if cfg.labels != "majority" or cfg.label_smoothing:
        # soft targets for the annotated pairs; the added (spliced) pairs have no votes: their own labels
        try:
            voted, label_info = label_targets(train_records[:len(train_records) - len(added)], cfg.labels,
                                              cfg.label_smoothing, cfg.train_data)
        except ValueError as err:
            raise ConfigError(f"{stage}: {err}") from None
        targets = voted + [hard_targets(r).smoothed(cfg.label_smoothing) for r in added]
    metrics = train(cfg, model, step, tokenize_pairs(tokenizer, train_records, cfg.max_length, targets), collate,
                    tokenize_pairs(tokenizer, eval_records, cfg.max_length) or None, tokenizer)

    metrics.update({f"labels/{k}": v for k, v in label_info.items() if not isinstance(v, dict)})
    if label_info.get("annotator_accuracy") and PartialState().is_main_process:
        atomic_write_json(Path(cfg.output_dir) / "annotators.json", label_info["annotator_accuracy"])
    metrics.update(train_pairs=len(train_records), eval_pairs=len(eval_records), added_train_pairs=len(added),
                   contradictory_train_skipped=train_set.num_contradictory_skipped,
                   contradictory_eval_skipped=eval_set.num_contradictory_skipped if eval_set else 0)
    if PartialState().is_main_process:
        atomic_write_json(Path(cfg.output_dir) / "metrics.json", metrics)
    return metrics
