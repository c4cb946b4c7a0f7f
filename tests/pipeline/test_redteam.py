"""The data step of Safe RLHF rounds (safealign.pipeline.redteam): pool quotas and prompt choice, unsafe prompts gathered
by a cost model, pairs sampled from the policy and annotated by SafeWorld's crowdworkers on their own label
stream, all pairs so far accumulated, your own annotations instead. Tiny untrained models, 8 new tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from safealign.config import ConfigError
from safealign.data.loading import load_preferences, load_prompts
from safealign.data.safeworld import (
    WorldConfig,
    generate_world,
    judge_harm,
    prompt_instances,
    sample_response,
    world_annotators,
    world_texts,
    write_world,
)
from safealign.models.presets import build_causal_lm
from safealign.models.score_model import build_score_model, load_score_model, save_score_model
from safealign.models.tokenizer import load_tokenizer, train_tokenizer
from safealign.pipeline.prompt_pools import choose_pair_prompts, pool_quotas, prompt_pools
from safealign.pipeline.redteam import RedTeamConfig, annotate_pairs, labelled_answer_rows, probe_policy, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small SafeWorld, an untrained tiny policy on its BPE, and cost models that score every text +1 or -1."""
    root = tmp_path_factory.mktemp("rounds")
    world = generate_world(WorldConfig(sft_examples=40, train_pairs=12, test_pairs=4, test_harmful=14, test_benign=10,
                                       test_borderline=6, redteam_prompts=14))
    write_world(world, root / "world")
    tokenizer = train_tokenizer(list(world_texts(world))[:1500], vocab_size=400)
    build_causal_lm("tiny", tokenizer, seed=0).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    for bias in (1.0, -1.0):
        cost_model = build_score_model("tiny", score_type="cost", tokenizer=tokenizer, seed=2)
        with torch.no_grad():
            cost_model.backbone.score.weight.zero_()
            cost_model.backbone.score.bias.fill_(bias)
        save_score_model(cost_model, root / f"cost_{bias:+g}", tokenizer)
    return root


def config(tiny: Path, out: Path, **overrides) -> RedTeamConfig:
    world = tiny / "world"
    return RedTeamConfig(**{**dict(
        policy=str(tiny / "policy"), cost_model=str(tiny / "cost_+1"), probe_prompts=str(world / "prompts" / "train.jsonl"),
        redteam_prompts=str(world / "prompts" / "redteam.jsonl"), rl_prompts=str(world / "prompts" / "train.jsonl"),
        previous_preferences=str(world / "preferences" / "train.jsonl"), world=str(world), output_dir=str(out),
        probe_limit=10, pairs=12, max_new_tokens=8, batch_size=16, device="cpu", progress=False), **overrides})


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- choosing the new pairs' prompts ----------------------------------------------------------------
def test_pool_quotas_follow_the_mix_and_give_an_empty_pools_share_to_the_others():
    mix = {"unsafe": 0.3, "redteam": 0.2, "solved": 0.2, "benign": 0.3}
    assert pool_quotas({"unsafe": 5, "redteam": 5, "solved": 5, "benign": 5}, mix, 10) == \
        {"unsafe": 3, "redteam": 2, "solved": 2, "benign": 3}
    # No unsafe prompt found (a safe policy): its 30% goes to the other pools in proportion (2:2:3).
    quotas = pool_quotas({"unsafe": 0, "redteam": 5, "solved": 5, "benign": 5}, mix, 70)
    assert quotas == {"redteam": 20, "solved": 20, "benign": 30}
    assert sum(pool_quotas({"unsafe": 1, "redteam": 1, "solved": 1, "benign": 1}, mix, 7).values()) == 7
    # At most 4 pairs per prompt: 2 unsafe prompts take 8 of their 30; the other 22 go to the rest as 2:2:3.
    assert pool_quotas({"unsafe": 2, "redteam": 50, "solved": 50, "benign": 50}, mix, 100, max_per_prompt=4) == \
        {"unsafe": 8, "redteam": 26, "solved": 26, "benign": 40}
    assert pool_quotas({"unsafe": 1, "benign": 2}, mix, 100, max_per_prompt=4) == {"unsafe": 4, "benign": 8}  # all full
    with pytest.raises(ConfigError, match="no prompts"):
        pool_quotas({"unsafe": 0, "redteam": 0, "solved": 3, "benign": 3}, {"unsafe": 1.0}, 4)


def test_choose_pair_prompts_uses_every_prompt_once_before_any_twice_and_is_seeded():
    pools = {"unsafe": [{"prompt": f"u{i}"} for i in range(3)], "benign": [{"prompt": f"b{i}"} for i in range(4)]}
    chosen = choose_pair_prompts(pools, {"unsafe": 0.5, "benign": 0.5}, 8, random.Random(0))
    unsafe = [row["prompt"] for row, pool in chosen if pool == "unsafe"]
    benign = [row["prompt"] for row, pool in chosen if pool == "benign"]
    assert len(unsafe) == 4 and set(unsafe[:3]) == {"u0", "u1", "u2"}  # all three once, then one again
    assert sorted(benign) == ["b0", "b1", "b2", "b3"]
    assert chosen == choose_pair_prompts(pools, {"unsafe": 0.5, "benign": 0.5}, 8, random.Random(0))


def test_prompt_pools_split_probed_prompts_by_the_cost_models_verdict_and_kind():
    probed = [{"prompt": "a", "kind": "harmful", "unsafe": True}, {"prompt": "b", "kind": "harmful", "unsafe": False},
              {"prompt": "c", "kind": "borderline", "unsafe": True}, {"prompt": "d", "kind": "benign", "unsafe": False}]
    redteam = [{"prompt": "r", "kind": "harmful", "unsafe": False}]
    all_prompts = probed + [{"prompt": "e", "kind": "benign"}, {"prompt": "f", "kind": "harmful"}]
    pools = {name: [r["prompt"] for r in rows] for name, rows in prompt_pools(probed, redteam, all_prompts).items()}
    assert pools == {"unsafe": ["a", "c"], "redteam": ["r"], "solved": ["b"], "benign": ["c", "d", "e"]}


# --- gathering with a cost model, annotating ----------------------------------------------------------
def test_probe_gathers_prompts_by_the_cost_models_sign_and_records_the_gold_verdict(tiny, tmp_path):
    tokenizer = load_tokenizer(tiny / "policy")
    policy = build_causal_lm(tiny / "policy").eval()
    prompts = lines(tiny / "world" / "prompts" / "train.jsonl")[:6]
    for bias, unsafe in ((1.0, True), (-1.0, False)):
        cost_model = load_score_model(tiny / f"cost_{bias:+g}").eval()
        rows = probe_policy(policy, tokenizer, cost_model, tokenizer, prompts, config(tiny, tmp_path), seed=0)
        assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
        assert all(r["unsafe"] is unsafe and r["cost"] == pytest.approx(bias) for r in rows)
        assert all(isinstance(r["gold_safe"], bool) and isinstance(r["response"], str) for r in rows)


def test_annotation_labels_like_the_worlds_crowdworkers_reproducibly_per_stream():
    prompt = next(iter(prompt_instances("harmful").values()))[0]  # {prompt, kind, category, domain}
    rng = random.Random(0)
    compliance = sample_response(prompt["prompt"], "compliance", rng, 3)
    refusal = sample_response(prompt["prompt"], "refusal", rng)
    exact = WorldConfig(annotator_noise=0.0, label_flip_rate=0.0)
    row = annotate_pairs([(prompt, "unsafe", compliance, refusal)], exact, "round2", source="policy:test")[0]
    assert (row["safer_response_id"], row["is_response_0_safe"], row["is_response_1_safe"]) == (1, False, True)
    assert row["better_response_id"] == 0  # compliance is the more helpful answer: the paper's tension
    assert (row["prompt_pool"], row["prompt_category"], row["response_0_source"]) == ("unsafe", prompt["category"], "policy:test")
    # The world's noisy annotators: the same stream repeats its labels, another stream draws new ones.
    pairs = [(prompt, "unsafe", sample_response(prompt["prompt"], "compliance", rng, 2),
              sample_response(prompt["prompt"], "redirection", rng, 1)) for _ in range(40)]

    def labels(stream: str) -> list[tuple[int, str]]:
        return [(r["better_response_id"], r["annotator_ids"][0]) for r in annotate_pairs(pairs, WorldConfig(), stream, "x")]

    assert labels("round2") == labels("round2") and labels("round2") != labels("round3")


def test_one_answer_is_labelled_by_the_crowdworkers_majority_and_reproducibly():
    prompt = next(iter(prompt_instances("harmful").values()))[0]
    rng = random.Random(0)
    compliance = sample_response(prompt["prompt"], "compliance", rng, 3)
    refusal = sample_response(prompt["prompt"], "refusal", rng)
    exact = world_annotators(WorldConfig(annotator_noise=0.0, label_flip_rate=0.0, severe_miss_rate=0.0,
                                         subtle_miss_rate=0.0), "probe")
    unsafe, safe = exact.label_safety(prompt["prompt"], compliance), exact.label_safety(prompt["prompt"], refusal)
    assert (unsafe["is_safe"], safe["is_safe"]) == (False, True)
    assert unsafe["harm_category"][prompt["category"]] and unsafe["severity_level"] >= 1
    assert not any(safe["harm_category"].values()) and safe["severity_level"] == 0
    assert len(unsafe["safe_votes"]) == len(unsafe["annotator_ids"]) == 3 and not any(unsafe["safe_votes"])
    # Noisy crowdworkers: the majority of three flipped votes can call the compliance safe; a stream repeats itself.
    noisy = [world_annotators(WorldConfig(label_flip_rate=0.4), "probe").label_safety(prompt["prompt"], compliance)
             for _ in range(2)]
    assert noisy[0] == noisy[1]


def test_labelled_answers_become_one_answer_rows_that_only_the_sign_term_can_learn_from():
    probed = [{"prompt": "p1", "response": "a", "kind": "harmful", "category": "violence",
               "label": {"is_safe": False, "harm_category": {"violence": True}, "severity_level": 2,
                         "annotator_ids": ["x"], "safe_votes": [False]}},
              {"prompt": "p2", "response": "", "label": {"is_safe": True}},  # empty: no PKU row
              {"prompt": "p3", "response": "b", "cost": 1.0}]  # not labelled: left out
    rows = labelled_answer_rows(probed, "policy:test")
    assert len(rows) == 1
    row = rows[0]
    assert row["response_0"] == row["response_1"] == "a" and row["prompt_pool"] == "labelled_answer"
    assert (row["is_response_0_safe"], row["is_response_1_safe"], row["response_0_severity_level"]) == (False, False, 2)


# --- the stage ----------------------------------------------------------------------------------------
def test_run_writes_the_rounds_pairs_accumulates_all_pairs_and_extends_the_rl_prompts(tiny, tmp_path):
    out = tmp_path / "round2" / "redteam"
    cfg = config(tiny, out, preferences_out=str(tmp_path / "round2" / "preferences.jsonl"))
    metrics = run(cfg)

    probe = lines(out / "probe.jsonl")
    assert len(probe) == 10 + 14 and metrics["probe_prompts"] == 10 and metrics["redteam_prompts"] == 14
    assert metrics["probe_unsafe_rate"] == 1.0 and metrics["unsafe_prompts"] == 10  # cost +1: everything unsafe
    gathered = {r["prompt"] for r in lines(out / "prompts.jsonl")}
    assert gathered == {r["prompt"] for r in probe}  # unsolved probe prompts + every red-team prompt
    pairs = load_preferences(out / "pairs.jsonl", on_contradiction="skip")  # PKU format
    raw = lines(out / "pairs.jsonl")
    assert len(raw) == 12 and metrics["pairs"] == 12
    assert metrics["pairs_unsafe"] + metrics["pairs_redteam"] + metrics["pairs_benign"] == 12
    assert metrics["pairs_solved"] == 0  # cost +1: no harmful prompt was answered safely
    assert {r["prompt_pool"] for r in raw} == {"unsafe", "redteam", "benign"}
    assert all(r["prompt_pool"] != "benign" or r["prompt_kind"] in ("benign", "borderline") for r in raw)

    previous = load_preferences(tiny / "world" / "preferences" / "train.jsonl")
    everything = load_preferences(tmp_path / "round2" / "preferences.jsonl")
    assert len(everything) == len(previous) + len(pairs) == metrics["preferences_total"]
    assert [r.prompt for r in everything][:len(previous)] == [r.prompt for r in previous]  # earlier rounds first
    assert [r.response_0 for r in everything][len(previous):] == [r.response_0 for r in pairs]  # then the new ones

    rl = [r.prompt for r in load_prompts(out / "rl_prompts.jsonl")]
    base = [r.prompt for r in load_prompts(tiny / "world" / "prompts" / "train.jsonl")]
    assert rl[:len(base)] == base and set(rl) == set(base) | gathered
    assert (out / "metrics.json").is_file() and (out / "config.yaml").is_file()

    # Reproducible: the same round again gives the same pairs and labels; another round's stream does not.
    again = tmp_path / "again"
    run(config(tiny, again))
    assert (again / "pairs.jsonl").read_text() == (out / "pairs.jsonl").read_text()
    other = tmp_path / "round3"
    run(config(tiny, other, stream="round3"))
    assert (other / "pairs.jsonl").read_text() != (out / "pairs.jsonl").read_text()


def test_crowdworkers_can_judge_the_probe_and_their_labelled_answers_weigh_in_training(tiny, tmp_path):
    out = tmp_path / "round2" / "redteam"
    # The cost model says every answer is safe (cost -1); the crowdworkers decide instead.
    metrics = run(config(tiny, out, cost_model=str(tiny / "cost_-1"), probe_judge="annotators", labelled_answers_weight=3,
                         preferences_out=str(tmp_path / "round2" / "preferences.jsonl")))
    probe = lines(out / "probe.jsonl")
    assert all(r["unsafe"] == (not r["label"]["is_safe"]) for r in probe)
    assert metrics["probe_cost_unsafe_rate"] == 0.0 and metrics["probe_judge"] == "annotators"
    assert metrics["unsafe_prompts"] == sum(r["unsafe"] for r in probe[:10])
    answers = [r for r in lines(out / "pairs.jsonl") if r["prompt_pool"] == "labelled_answer"]
    assert len(answers) == metrics["labelled_answers"] == sum(bool(r["response"]) for r in probe)
    assert all(r["response_0"] == r["response_1"] for r in answers)
    train = lines(out / "train_preferences.jsonl")
    everything = lines(tmp_path / "round2" / "preferences.jsonl")
    previous = lines(tiny / "world" / "preferences" / "train.jsonl")
    assert len(everything) == len(previous) + metrics["pairs"] + len(answers) == metrics["preferences_total"]
    assert len(train) == len(previous) + metrics["pairs"] + 3 * len(answers)
    assert len(load_preferences(out / "train_preferences.jsonl")) == len(train)  # valid PKU rows, none contradictory
    # The crowdworkers' labels of the round's answers against the gold judge (each one-answer row counted once).
    rows = lines(out / "pairs.jsonl")
    answers = [(r["prompt"], r[f"response_{i}"], not r[f"is_response_{i}_safe"])
               for r in rows for i in ((0,) if r["prompt_pool"] == "labelled_answer" else (0, 1))]
    gold = [not judge_harm(p, a).is_safe for p, a, _ in answers]
    assert metrics["new_answers_unsafe_rate_gold"] == pytest.approx(sum(gold) / len(gold))
    flagged = [g for (_, _, label), g in zip(answers, gold) if label]
    assert metrics["label_unsafe_precision_gold"] == (pytest.approx(sum(flagged) / len(flagged)) if flagged else None)
    with pytest.raises(ConfigError, match="labelled_answers_weight"):
        config(tiny, out, labelled_answers_weight=1)  # the labels come from the crowdworkers


def test_a_safe_policy_gives_no_unsafe_prompts_and_the_solved_pool_takes_its_share(tiny, tmp_path):
    metrics = run(config(tiny, tmp_path / "out", cost_model=str(tiny / "cost_-1"), rl_prompts="", previous_preferences=""))
    assert metrics["unsafe_prompts"] == 0 and metrics["pairs_unsafe"] == 0
    assert metrics["pairs_solved"] > 0 and metrics["gathered_prompts"] == 14  # the red-team prompts only
    assert metrics["preferences_total"] == metrics["pairs"] - metrics["contradictory_pairs"]
    assert not (tmp_path / "out" / "rl_prompts.jsonl").exists()


def test_pairs_with_an_empty_answer_are_left_out_and_counted(tiny, tmp_path, monkeypatch):
    import safealign.pipeline.redteam as rounds

    sample = rounds.sample_pairs

    def with_an_empty_answer(*args, **kwargs):
        sampled = sample(*args, **kwargs)
        row, pool, _, response_1 = sampled[0]
        return [(row, pool, "", response_1)] + sampled[1:]  # the policy said EOS first

    monkeypatch.setattr(rounds, "sample_pairs", with_an_empty_answer)
    metrics = run(config(tiny, tmp_path / "out", previous_preferences=""))
    assert metrics["empty_pairs_dropped"] == 1 and metrics["pairs"] == 11
    assert len(load_preferences(tmp_path / "out" / "pairs.jsonl", on_contradiction="skip")) + metrics["contradictory_pairs"] == 11


def test_your_own_annotations_replace_sampling_and_need_no_world(tiny, tmp_path):
    mine = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"question {i}", "response_0": "yes", "response_1": "no", "better_response_id": i % 2,
             "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": True} for i in range(3)]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    metrics = run(RedTeamConfig(annotations=str(mine), previous_preferences=str(mine), output_dir=str(out),
                                progress=False, new_pairs_weight=3))
    assert metrics["pairs"] == 3 and metrics["preferences_total"] == 6 and metrics["gathered_prompts"] == 3
    assert len(load_preferences(out / "preferences.jsonl")) == 6  # every pair once
    # What the round's value models train on: the earlier pairs once, this round's three times.
    train = [(r.prompt, r.better_response_id) for r in load_preferences(out / "train_preferences.jsonl")]
    assert train == [(f"question {i}", i % 2) for i in range(3)] * 4
    with pytest.raises(ConfigError, match="new_pairs_weight"):
        RedTeamConfig(new_pairs_weight=0)


def test_config_rejects_unknown_pools_and_missing_inputs(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown pool"):
        RedTeamConfig(prompt_mix={"unsafe": 1.0, "jailbreak": 1.0})
    with pytest.raises(ConfigError, match="world"):
        run(config(tiny, tmp_path / "a", world=""))
    with pytest.raises(FileNotFoundError, match="policy"):
        run(config(tiny, tmp_path / "b", policy=str(tmp_path / "missing")))
