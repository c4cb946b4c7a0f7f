"""Reward-model speed: safealign's loop (`training.supervised.train` + `RewardStep`) vs TRL's `RewardTrainer`.

safealign trains its score model (`build_score_model(preset, score_type="reward")`: a Llama
`*ForTokenClassification` with one label, the end score read at the last non-padding token). TRL wants a
sequence-classification model: a `LlamaForSequenceClassification` gets the same backbone and head weights
(its head has no bias: the token-classification head's bias is dropped; a constant shift of both scores
changes no Bradley-Terry difference). Both score every position and pick the last real token, in one
forward of 2B rows per batch of B pairs. The losses differ only in the small regulariser: safealign adds
η·mean(r_b², r_w²) (η = 1e-3), TRL's `center_rewards_coefficient` is left off.

Same SafeWorld helpfulness pairs (better response = chosen) tokenised by `tokenize_for_scoring`, same
batches in the same order, batch size, max length, precision and steps. Reports pairs/s and tokens/s.

    python bench/bench_rm.py                 # tiny, fp32
    python bench/bench_rm.py --preset tiny,small --steps tiny=40,small=8
"""

from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    StepClock,
    Trial,
    batch_order,
    common_args,
    load_tokenizer,
    machine_line,
    precisions,
    prepare_world,
    print_table,
    recording_first_loss,
    rss_mib,
    run_interleaved,
    safealign_options,
    steps_per_preset,
    trl_options,
    work_directory,
)

L2_COEFF = 1e-3  # safealign's default η


def tokenized_pairs(trial: Trial, tokenizer: Any) -> list:
    from safealign.data.formatting import tokenize_pairs
    from safealign.data.loading import load_preferences

    records = load_preferences(Path(trial.work_dir) / "world" / "preferences" / "train.jsonl").records
    return tokenize_pairs(tokenizer, list(records), trial.max_length)


def sequence_classifier(score_model: Any) -> Any:
    """A LlamaForSequenceClassification with the score model's backbone and head weights (no head bias)."""
    from transformers import LlamaForSequenceClassification

    backbone = score_model.backbone
    model = LlamaForSequenceClassification(copy.deepcopy(backbone.config))
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    if missing or set(unexpected) - {"score.bias"}:
        raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
    return model


def run_trial(trial: Trial) -> dict[str, Any]:
    """Worker: build the model and the trainer (not timed), train, return the clock's measurement."""
    from safealign.models.score_model import build_score_model

    tokenizer = load_tokenizer(trial)
    pairs = tokenized_pairs(trial, tokenizer)
    model = build_score_model(trial.preset, score_type="reward", tokenizer=tokenizer, seed=trial.seed)
    first_loss: list[float] = []

    if trial.framework == "safealign":
        from safealign.algorithms.reward import RewardConfig, RewardStep
        from safealign.data.collate import collate_pairs
        from safealign.training.supervised import train

        cfg = RewardConfig(model=trial.preset, l2_coeff=L2_COEFF, **safealign_options(trial))
        step = recording_first_loss(RewardStep, "loss", first_loss)(L2_COEFF)
        clock = StepClock(model)
        rss_before = rss_mib()
        train(cfg, model, step, pairs, partial(collate_pairs, pad_token_id=tokenizer.pad_token_id))
    else:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        model = sequence_classifier(model)
        order = batch_order(len(pairs), trial)
        dataset = Dataset.from_dict({
            "chosen_ids": [pairs[i].input_ids[pairs[i].better_response_id] for i in order],
            "rejected_ids": [pairs[i].input_ids[1 - pairs[i].better_response_id] for i in order],
        })
        args = RewardConfig(**trl_options(trial), center_rewards_coefficient=None, disable_dropout=True)
        trainer_class = recording_first_loss(RewardTrainer, "compute_loss", first_loss)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        if len(trainer.train_dataset) != len(dataset):
            dropped = len(dataset) - len(trainer.train_dataset)
            raise RuntimeError(f"TRL dropped {dropped} pairs longer than max_length: raise --max-length")
        clock = StepClock(trainer.model)
        rss_before = rss_mib()
        trainer.train()
    return {**clock.measure(trial.warmup), "rss_before_mib": rss_before, "first_loss": first_loss[0]}


def main() -> None:
    parser = common_args(__doc__.split("\n")[0], steps="tiny=40,small=8", batch_size=16, presets="tiny")
    args = parser.parse_args()
    presets = args.preset.split(",")
    steps = steps_per_preset(args.steps, presets)
    with work_directory(args) as work:
        prepare_world(work, examples=max(2000, 2 * max(steps.values()) * args.batch_size), seed=args.seed)

        configs = [Trial(framework="", preset=preset, precision=precision, steps=steps[preset], warmup=args.warmup,
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, work_dir=str(work),
                         out_dir=str(work / "runs" / f"rm-{preset}-{precision}"), threads=args.threads)
                   for preset in presets for precision in precisions(args)]
        probe = configs[0]
        pairs = tokenized_pairs(probe, load_tokenizer(probe))
        taken = [pairs[i] for i in batch_order(len(pairs), probe)]
        print(f"machine: {machine_line(args.threads)}")
        print(f"data: SafeWorld helpfulness pairs, {len(pairs)} (contradictory ones skipped); the timed batches average "
              f"{sum(len(ids) for p in taken for ids in p.input_ids) / (2 * len(taken)):.1f} tokens per response text")
        print(f"batch {args.batch_size} pairs ({2 * args.batch_size} texts per forward), max_length {args.max_length}, "
              f"steps {steps} ({args.warmup} warm-up not timed), {args.repeats} interleaved runs each")
        rows = run_interleaved(__file__, configs, args.repeats, "pairs", rows_per_item=2)
        print_table(rows, "pairs", "Reward model: pairs/s and non-padding tokens/s over steady-state steps (medians)")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from common import worker_main

        worker_main(run_trial)
    else:
        main()
