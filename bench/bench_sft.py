"""SFT speed: safealign's training loop (`training.supervised.train` + `SFTStep`) vs TRL's `SFTTrainer`.

Same initial weights (`build_causal_lm(preset, tokenizer, seed)`), same SafeWorld SFT examples tokenised by
`tokenize_prompt_response` (labels on the response and EOS only; TRL gets them as a pre-tokenised `labels`
column), same batches in the same order, batch size, max length, precision and number of steps. Reports
non-padding tokens/s and examples/s over steady-state optimizer steps, peak RSS, and safealign/TRL.

    python bench/bench_sft.py                                  # tiny and small, fp32 (a few minutes)
    python bench/bench_sft.py --bf16 --preset tiny --steps 60  # bf16 autocast rows as well
    python bench/bench_sft.py --trl-loss-type nll              # TRL with full logits, as safealign computes them
"""

from __future__ import annotations

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


def tokenized_examples(trial: Trial, tokenizer: Any) -> list:
    from safealign.data.formatting import tokenize_prompt_response
    from safealign.data.loading import load_sft

    examples = load_sft(Path(trial.work_dir) / "world" / "sft" / "train.jsonl")
    return [tokenize_prompt_response(tokenizer, e.prompt, e.response, trial.max_length) for e in examples]


def run_trial(trial: Trial) -> dict[str, Any]:
    """Worker: build the model and the trainer (not timed), train, return the clock's measurement."""
    from safealign.models.presets import build_causal_lm

    tokenizer = load_tokenizer(trial)
    data = tokenized_examples(trial, tokenizer)
    model = build_causal_lm(trial.preset, tokenizer, seed=trial.seed)
    first_loss: list[float] = []  # loss of the first step: same weights, batch and labels -> same value

    if trial.framework == "safealign":
        from safealign.algorithms.sft import SFTConfig, SFTStep
        from safealign.data.collate import collate_sft
        from safealign.training.supervised import train

        cfg = SFTConfig(model=trial.preset, **safealign_options(trial))
        step = recording_first_loss(SFTStep, "loss", first_loss)()
        clock = StepClock(model)
        rss_before = rss_mib()
        train(cfg, model, step, data, partial(collate_sft, pad_token_id=tokenizer.pad_token_id))
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        order = batch_order(len(data), trial)
        dataset = Dataset.from_dict({"input_ids": [data[i].input_ids for i in order],
                                     "labels": [data[i].labels for i in order]})  # labels used as they are
        args = SFTConfig(**trl_options(trial), loss_type=trial.options["trl_loss_type"])
        trainer_class = recording_first_loss(SFTTrainer, "compute_loss", first_loss)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        clock = StepClock(trainer.model)
        rss_before = rss_mib()
        trainer.train()
    return {**clock.measure(trial.warmup), "rss_before_mib": rss_before, "first_loss": first_loss[0]}


def main() -> None:
    parser = common_args(__doc__.split("\n")[0], steps="tiny=40,small=8", batch_size=16, presets="tiny,small")
    parser.add_argument("--trl-loss-type", default="chunked_nll", choices=["chunked_nll", "nll"],
                        help="TRL's SFT loss: chunked_nll (its default: LM head on label positions only) "
                             "or nll (full logits, as safealign).")
    args = parser.parse_args()
    presets = args.preset.split(",")
    steps = steps_per_preset(args.steps, presets)
    with work_directory(args) as work:
        prepare_world(work, examples=max(2000, max(steps.values()) * args.batch_size), seed=args.seed)

        configs = [Trial(framework="", preset=preset, precision=precision, steps=steps[preset], warmup=args.warmup,
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, work_dir=str(work),
                         out_dir=str(work / "runs" / f"sft-{preset}-{precision}"), threads=args.threads,
                         options={"trl_loss_type": args.trl_loss_type})
                   for preset in presets for precision in precisions(args)]
        probe = configs[0]
        data = tokenized_examples(probe, load_tokenizer(probe))
        taken = [data[i] for i in batch_order(len(data), probe)]
        tokens = sum(len(e) for e in taken)
        labels = sum(sum(label != -100 for label in e.labels[1:]) for e in taken)
        print(f"machine: {machine_line(args.threads)}")
        print(f"data: SafeWorld SFT, {len(data)} examples, vocab {len(load_tokenizer(probe))}; the timed batches average "
              f"{tokens / len(taken):.1f} tokens per example, {labels / tokens:.0%} of them labelled (response + EOS)")
        print(f"batch {args.batch_size}, max_length {args.max_length}, steps {steps} ({args.warmup} warm-up not timed), "
              f"{args.repeats} interleaved runs each, TRL loss_type={args.trl_loss_type}")
        rows = run_interleaved(__file__, configs, args.repeats, "examples")
        print_table(rows, "examples", "SFT: non-padding tokens/s and examples/s over steady-state steps (medians)")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from common import worker_main

        worker_main(run_trial)
    else:
        main()
