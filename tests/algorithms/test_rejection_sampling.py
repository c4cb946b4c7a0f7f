"""RS-FT (algorithms/rejection_sampling.py): the archive keeps each prompt's best answer over the rounds, the safety
gate keeps unsafe bests out of the training data, and two rounds on a tiny policy fine-tune on what was kept."""

from __future__ import annotations

import json

import pytest

from safealign.algorithms import rejection_sampling
from safealign.algorithms.rejection_sampling import RSFTConfig, run, training_rows, update_archive
from safealign.config import ConfigError
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer


def _cfg(tiny, out, **overrides) -> RSFTConfig:
    return RSFTConfig(**{**dict(model=tiny.actor, reward_model=tiny.reward_model, cost_model=tiny.cost_model,
                                prompts=tiny.prompts, output_dir=str(out), num_prompts=4, k=2, rounds=2, max_new_tokens=8,
                                max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                save_steps=-1, mixed_precision="no", threshold=0.0), **overrides})


def test_the_archive_keeps_the_best_answer_of_every_round(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path)
    archive: dict = {}
    row = lambda response, reward, cost: {"prompt": "p", "response": response, "reward": reward, "cost": cost,  # noqa: E731
                                          "no_safe_candidate": cost > 0}
    assert update_archive(archive, [row("unsafe", 5.0, 1.0)], cfg) == 1
    assert training_rows(archive, cfg) == []  # the gate: an unsafe best is never trained on
    assert update_archive(archive, [row("safe", 0.5, -1.0)], cfg) == 1  # any safe answer beats an unsafe one
    assert update_archive(archive, [row("safe, worse", 0.2, -3.0)], cfg) == 0  # a lower reward does not replace it
    assert training_rows(archive, cfg) == [{"prompt": "p", "response": "safe"}]
    assert update_archive(archive, [row("  ", 9.0, -9.0)], cfg) == 0  # an empty answer is never kept (SFT refuses it)
    by_reward = _cfg(tiny, tmp_path, mode="reward")
    archive = {}
    update_archive(archive, [row("unsafe", 5.0, 1.0)], by_reward)
    assert training_rows(archive, by_reward) == [{"prompt": "p", "response": "unsafe"}]


def test_two_rounds_fine_tune_on_the_kept_answers_and_a_restart_skips_them(tiny, tmp_path, monkeypatch):
    cfg = _cfg(tiny, tmp_path / "rsft", threshold=100.0)  # every answer within the bound: both rounds train
    metrics = run(cfg)
    log = json.loads((tmp_path / "rsft" / "rounds.json").read_text())
    assert [e["round"] for e in log] == [1, 2] and all(e["no_safe_share"] == 0.0 for e in log)
    archive = [json.loads(line) for line in (tmp_path / "rsft" / "archive.jsonl").read_text().splitlines()]
    data = [json.loads(line) for line in (tmp_path / "rsft" / "round-2" / "data.jsonl").read_text().splitlines()]
    assert len(archive) == 4 and [d["response"] for d in data] == [a["response"] for a in archive]
    assert metrics["global_step"] == 2 and metrics["round2/training_rows"] == 4
    assert str(tmp_path / "rsft" / "round-1" / "model") in (tmp_path / "rsft" / "round-2" / "config.yaml").read_text()
    last = (tmp_path / "rsft" / "round-2" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "rsft" / "model" / "model.safetensors").read_bytes() == last
    monkeypatch.setattr(rejection_sampling, "sample_round", lambda *a, **k: pytest.fail("a finished round ran again"))
    assert run(cfg)["round2/training_rows"] == 4


def test_each_round_ranks_by_its_own_models_and_rescores_the_archive_when_they_change(tiny, tmp_path, monkeypatch):
    """RS-FT on Safe RLHF's round engine: round 2's models (here the cost model stands in as round 2's reward model)
    score the answers kept from round 1 again, so that the archive compares like with like. Round 2's own candidates
    are made the worst possible: the archive keeps round 1's answers, with round 2's scores."""
    cfg = _cfg(tiny, tmp_path / "rsft", threshold=100.0, round_reward_models=[tiny.reward_model, tiny.cost_model],
               round_cost_models=[tiny.cost_model, tiny.cost_model])
    sample_round = rejection_sampling.sample_round
    chosen: dict = {}

    def worst_in_round_2(cfg, policy, prompts, t):
        if t == 1:
            rows = sample_round(cfg, policy, prompts, t)
            chosen.update({row["prompt"]: row["response"] for row in rows})
            return rows
        return [{"prompt": p, "response": "x", "reward": -1e9, "cost": 0.0, "no_safe_candidate": False} for p in prompts]

    monkeypatch.setattr(rejection_sampling, "sample_round", worst_in_round_2)
    run(cfg)
    log = json.loads((tmp_path / "rsft" / "rounds.json").read_text())
    assert [e["archive_rescored"] for e in log] == [0.0, 1.0]
    archive = [json.loads(line) for line in (tmp_path / "rsft" / "archive.jsonl").read_text().splitlines()]
    by_round2 = score_texts(load_score_model(tiny.cost_model), load_tokenizer(tiny.cost_model),
                            [a["prompt"] for a in archive], [a["response"] for a in archive], cfg.max_length)
    assert [a["response"] for a in archive] == [chosen[a["prompt"]] for a in archive]  # round 1's answers
    assert [a["reward"] for a in archive] == pytest.approx(by_round2, abs=1e-5)
    assert [a["reward"] for a in archive] == pytest.approx([a["cost"] for a in archive], abs=1e-5)
    with pytest.raises(ConfigError, match="one per round"):
        _cfg(tiny, tmp_path, round_reward_models=[tiny.reward_model])


def test_a_gate_that_keeps_nothing_and_a_missing_cost_model_are_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="nothing to train on"):
        run(_cfg(tiny, tmp_path / "none", threshold=-1e9, rounds=1))
    with pytest.raises(ConfigError, match="cost_model"):
        _cfg(tiny, tmp_path, cost_model="")
    with pytest.raises(ConfigError, match="not read"):  # an SFT key that would be silently ignored
        run(_cfg(tiny, tmp_path / "sft_data", train_data=tiny.prompts))
