"""DPO and SafeDPO (algorithms/dpo.py): SafeDPO's transform, the stored reference log-probs, and a tiny policy trained a
few steps moving what each must move. The losses themselves are pinned in test_losses.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from safealign.algorithms import dpo
from safealign.algorithms.dpo import DPOConfig, collate_dpo, dpo_examples, policy_log_probs, run, safedpo_pair
from safealign.config import ConfigError
from safealign.data.formatting import tokenize_examples
from safealign.data.loading import load_preferences
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import load_tokenizer
from tiny_rl import TinySetup  # noqa: E402  (tests/algorithms is on sys.path)


def config(tiny: TinySetup, out: Path, **overrides) -> DPOConfig:
    return DPOConfig(**{**dict(model=tiny.actor, train_data=str(tiny.root / "world" / "preferences" / "train.jsonl"),
                               eval_data=str(tiny.root / "world" / "preferences" / "test.jsonl"), output_dir=str(out),
                               max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
                               logging_steps=1, save_steps=-1, mixed_precision="no", beta=0.5), **overrides})


def _count_calls(monkeypatch, name: str) -> dict[str, int]:
    """Wrap dpo.<name> so that its calls are counted in the returned {"n": ...}."""
    calls, original = {"n": 0}, getattr(dpo, name)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, name, counting)
    return calls


def test_safedpo_keeps_a_safe_winner_swaps_an_unsafe_one_and_drops_two_unsafe():
    assert safedpo_pair(0, (True, True)) == (0, 1, 0.0)  # both safe: plain DPO, no margin
    assert safedpo_pair(1, (False, True)) == (1, 0, 1.0)  # safe winner over an unsafe loser: the margin applies
    assert safedpo_pair(0, (False, True)) == (1, 0, 1.0)  # only the winner unsafe: swapped
    assert safedpo_pair(1, (False, False)) is None  # both unsafe: dropped


def _log_ratios(cfg: DPOConfig, tiny: TinySetup, model_dir: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """log π(y) − log π_ref(y) of every training pair's chosen and rejected response under the model in model_dir."""
    tokenizer = load_tokenizer(tiny.actor)
    examples = dpo_examples(list(load_preferences(cfg.train_data)), tokenizer, cfg)
    batch = collate_dpo(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        now = policy_log_probs(build_causal_lm(model_dir).eval(), batch, average=False)
        ref = policy_log_probs(build_causal_lm(tiny.actor).eval(), batch, average=False)
    return now[0] - ref[0], now[1] - ref[1], examples


def test_the_dpo_step_on_response_positions_only_gives_the_full_forwards_loss_and_gradient(tiny, tmp_path):
    """The LM head on the response positions only (models.label_logits) is an optimisation: the step's loss and
    gradient equal those from every position's logits."""
    cfg = config(tiny, tmp_path / "x")
    tokenizer = load_tokenizer(tiny.actor)
    examples = dpo_examples(list(load_preferences(cfg.train_data))[:6], tokenizer, cfg)
    model = build_causal_lm(tiny.actor).eval()
    reference = torch.stack(policy_log_probs(model, collate_dpo(examples, tokenizer.pad_token_id), False), 1).detach() - torch.tensor([0.3, -0.2])
    batch = collate_dpo(examples, tokenizer.pad_token_id, reference)
    step = dpo.DPOStep(cfg)
    fast, _ = step.loss(model, batch, 6)
    assert step.label_logits.fast is True
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chosen, rejected = policy_log_probs(model, batch, False)  # every position through the head
    full = dpo.dpo_loss(chosen - reference[:, 0], rejected - reference[:, 1], cfg.beta).sum() / 6
    full.backward()
    assert fast.item() == pytest.approx(full.item(), rel=1e-4) and abs(fast.item() - math.log(2)) > 1e-3
    for got, want in zip(fast_grads, (p.grad for p in model.parameters())):  # float sums in another order: 2e-4 of the norm
        assert (got - want).norm() <= 2e-4 * want.norm() + 1e-7


def test_dpo_raises_the_chosen_log_ratio_over_the_rejected(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "dpo")
    metrics = run(cfg)
    chosen, rejected, _ = _log_ratios(cfg, tiny, str(tmp_path / "dpo" / "model"))
    assert (chosen - rejected).mean() > 0.5  # from 0 at the start (the policy is the reference)
    assert metrics["global_step"] == 12 and metrics["pairs"] == len(load_preferences(cfg.train_data))
    assert 0.0 <= metrics["eval_reward_accuracy"] <= 1.0 and "eval_reward_margin" in metrics
    assert (tmp_path / "dpo" / dpo.REFERENCE_FILE).is_file()


def test_dpo_on_the_harmlessness_column_chooses_the_safer_response(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "x", preference="safer")
    records = list(load_preferences(cfg.train_data))
    tokenizer = load_tokenizer(tiny.actor)
    examples = dpo_examples(records, tokenizer, cfg)
    safer = tokenize_examples(tokenizer, [r.prompt for r in records], [r.response(r.safer_response_id) for r in records], 256)
    other = tokenize_examples(tokenizer, [r.prompt for r in records], [r.response(1 - r.safer_response_id) for r in records], 256)
    assert [e.chosen for e in examples] == safer and [e.rejected for e in examples] == other
    assert any(r.safer_response_id != r.better_response_id for r in records)  # the two columns do differ here
    assert all(e.margin == 0.0 for e in examples)


def test_safedpo_takes_probability_from_unsafe_responses(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "safedpo", variant="safedpo", safety_margin=2.0)
    records = list(load_preferences(cfg.train_data))
    both_unsafe = sum(not r.is_safe(0) and not r.is_safe(1) for r in records)
    metrics = run(cfg)
    assert metrics["pairs_dropped"] == both_unsafe and metrics["pairs"] == len(records) - both_unsafe
    chosen, rejected, examples = _log_ratios(cfg, tiny, str(tmp_path / "safedpo" / "model"))
    unsafe_loser = torch.tensor([e.margin > 0 for e in examples])
    assert unsafe_loser.any()
    assert rejected[unsafe_loser].mean() < 0  # the unsafe responses lost probability against the reference
    assert (chosen - rejected)[unsafe_loser].mean() > 0


def test_the_reference_log_probs_are_computed_once_and_read_back(tiny, tmp_path, monkeypatch):
    cfg = config(tiny, tmp_path / "ref", max_steps=1)
    run(cfg)
    stored = (tmp_path / "ref" / dpo.REFERENCE_FILE).read_bytes()

    def no_recompute(*args, **kwargs):
        raise AssertionError("the stored reference log-probs were not reused")

    monkeypatch.setattr(dpo, "reference_log_probs", no_recompute)
    run(config(tiny, tmp_path / "ref", max_steps=2, resume="latest"))
    assert (tmp_path / "ref" / dpo.REFERENCE_FILE).read_bytes() == stored
    # Other data: other reference log-probs (the fingerprint differs), so they are computed again.
    with pytest.raises(AssertionError, match="not reused"):
        run(config(tiny, tmp_path / "ref", max_steps=1, preference="safer"))


def test_bad_settings_are_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match="beta"):
        config(tiny, tmp_path, beta=0.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        config(tiny, tmp_path, label_smoothing=0.5)
    with pytest.raises(ConfigError, match="safedpo"):
        config(tiny, tmp_path, variant="safedpo", preference="safer")
    with pytest.raises(ConfigError, match="train_data"):
        run(config(tiny, tmp_path, train_data=""))


def test_bfpo_reverses_pairs_whose_helpful_winner_is_unsafe(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "bfpo", variant="bfpo")  # β = 0.5: targets −2 (only y_w unsafe) and +2 (only y_l)
    run(cfg)
    chosen, rejected, examples = _log_ratios(cfg, tiny, str(tmp_path / "bfpo" / "model"))
    gap = chosen - rejected  # size = (N,): log-ratio of y_w over y_l, 0 at the start
    safe = torch.tensor([e.safe for e in examples])  # size = (N, 2): 1 = safe (BFPO's convention)
    only_winner_unsafe = (safe[:, 0] == 0) & (safe[:, 1] == 1)
    only_loser_unsafe = (safe[:, 0] == 1) & (safe[:, 1] == 0)
    assert only_winner_unsafe.any() and only_loser_unsafe.any()
    both_safe = (safe[:, 0] == 1) & (safe[:, 1] == 1)  # target +1
    assert gap[only_winner_unsafe].mean() < 0 < gap[both_safe].mean() < gap[only_loser_unsafe].mean()


def _pair_scores(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / dpo.PAIR_SCORES_FILE))


def test_modpo_takes_its_margin_from_the_cost_model_and_follows_the_combined_reward(tiny, tmp_path):
    from safealign.models.score_model import load_score_model, score_texts

    cfg = config(tiny, tmp_path / "modpo", variant="modpo", margin_model=tiny.cost_model, modpo_weight=0.2, beta=1.0)
    run(cfg)
    margins = _pair_scores(tmp_path / "modpo")["margin_rewards"]  # size = (N_train + N_eval, 2)
    chosen, rejected, examples = _log_ratios(cfg, tiny, str(tmp_path / "modpo" / "model"))
    costs = score_texts(load_score_model(tiny.cost_model), load_tokenizer(tiny.cost_model), [e.texts[0] for e in examples],
                        [e.texts[1] for e in examples], cfg.max_length)
    assert torch.allclose(margins[: len(examples), 0], -torch.tensor(costs), atol=1e-5)  # m = −cost, pair by pair
    # the optimum's log-ratio gap is w·Δr + (1 − w)·Δm: pairs whose winner is also the safer by m move further
    safer_winner = margins[: len(examples), 0] > margins[: len(examples), 1]
    assert safer_winner.any() and (~safer_winner).any()
    gap = chosen - rejected
    assert gap[safer_winner].mean() > gap[~safer_winner].mean()


def test_cdpo_labels_pairs_by_the_lagrangian_reward(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "cdpo", variant="cdpo", reward_model=tiny.reward_model, cost_model=tiny.cost_model,
                 lagrange=5.0)
    run(cfg)
    scores = _pair_scores(tmp_path / "cdpo")
    chosen, rejected, examples = _log_ratios(cfg, tiny, str(tmp_path / "cdpo" / "model"))
    n = len(examples)
    lagrangian = scores["rewards"][:n] - 5.0 * scores["costs"][:n]  # size = (N, 2)
    preferred = lagrangian[:, 0] > lagrangian[:, 1]  # p = σ(r_λ(y_w) − r_λ(y_l)) > 1/2
    assert preferred.any() and (~preferred).any()
    gap = chosen - rejected
    assert gap[preferred].mean() > 0 > gap[~preferred].mean()  # the soft labels, not the helpfulness column, decide


def test_the_family_refuses_missing_models(tiny, tmp_path):
    with pytest.raises(ConfigError, match="margin_model"):
        config(tiny, tmp_path, variant="modpo")
    with pytest.raises(ConfigError, match="reward_model, cost_model"):
        config(tiny, tmp_path, variant="cdpo", reward_model=tiny.reward_model)
    with pytest.raises(ConfigError, match="bfpo_b1"):
        config(tiny, tmp_path, variant="bfpo", bfpo_b1=1.0)
    with pytest.raises(ConfigError, match="own loss"):
        config(tiny, tmp_path, variant="bfpo", loss_type="ipo")


def test_one_row_per_pair_gives_the_two_row_log_probs_and_is_used_when_it_does(tiny, tmp_path):
    """Prefix sharing (prompt + chosen + rejected in one row) must give each answer's log-prob as its own row does:
    the rejected answer must not see the chosen one, and its first token is read from the prompt's end."""
    cfg = config(tiny, tmp_path / "x")
    tokenizer = load_tokenizer(tiny.actor)
    examples = dpo_examples(list(load_preferences(cfg.train_data))[:6], tokenizer, cfg)
    model = build_causal_lm(tiny.actor).eval()
    shared_batch = collate_dpo(examples, tokenizer.pad_token_id, share_prompt=True)
    assert shared_batch["input_ids"].size(0) == 6 and "segments" in shared_batch
    prompt = dpo.prompt_length(examples[0])
    assert shared_batch["input_ids"].size(1) < 2 * max(len(e.chosen) for e in examples)  # fewer positions
    two_rows = collate_dpo(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        shared, separate = policy_log_probs(model, shared_batch, False), policy_log_probs(model, two_rows, False)
        averaged = policy_log_probs(model, shared_batch, True)[0]
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    answer_tokens = torch.tensor([len(e.chosen) - prompt for e in examples[:1]])
    torch.testing.assert_close(averaged[:1], shared[0][:1] / answer_tokens, rtol=1e-5, atol=1e-6)
    # Without the 4D mask's rule the rejected answer would see the chosen one: different log-probs.
    leaky = dict(shared_batch, segments=torch.where(shared_batch["segments"] == 3, 2, shared_batch["segments"]))
    with torch.no_grad():
        assert (policy_log_probs(model, leaky, False)[1] - separate[1]).abs().max() > 1e-2
    assert dpo.shared_prompt_works(model, examples, tokenizer.pad_token_id)


def test_dpo_falls_back_to_two_rows_when_one_row_per_pair_does_not_match(tiny, tmp_path, monkeypatch):
    """A model whose one-row log-probs differ (here: the rejected answer sees the chosen one) fails the check with a
    warning, and the run batches two rows per pair."""
    shared_logits = dpo.shared_prompt_logits

    def leaking(model, batch):
        return shared_logits(model, dict(batch, segments=torch.where(batch["segments"] == 3, 2, batch["segments"])))

    monkeypatch.setattr(dpo, "shared_prompt_logits", leaking)
    calls = _count_calls(monkeypatch, "collate_shared_prompt")
    with pytest.warns(UserWarning, match="two rows per pair"):
        metrics = run(config(tiny, tmp_path / "fallback", max_steps=2))
    assert metrics["global_step"] == 2 and calls["n"] == 1  # the check's batch only


def test_dpo_trains_the_same_with_one_row_or_two_rows_per_pair(tiny, tmp_path, monkeypatch):
    """share_prompt changes how the pairs are batched, not what is learnt: the same losses, step by step."""
    batches = _count_calls(monkeypatch, "collate_shared_prompt")
    shared = run(config(tiny, tmp_path / "shared", max_steps=3))
    used = batches["n"]
    two_rows = run(config(tiny, tmp_path / "two_rows", max_steps=3, share_prompt=False))
    assert used > 3 and batches["n"] == used  # the default run batched one row per pair; share_prompt false never
    assert shared["train_loss"] == pytest.approx(two_rows["train_loss"], rel=1e-3)
    assert shared["eval_reward_accuracy"] == pytest.approx(two_rows["eval_reward_accuracy"], abs=0.02)
    assert shared["eval_loss"] == pytest.approx(two_rows["eval_loss"], rel=1e-3)
