"""Labels from annotators who disagree: vote shares by hand, Dawid–Skene recovering who is reliable, label smoothing,
rows without votes, malformed votes named by field."""

from __future__ import annotations

import random

import pytest

from safealign.data.label_aggregation import PairTargets, dawid_skene, hard_targets, label_targets
from safealign.data.schema import DataError, PreferenceRecord


def record(better=0, safer=1, safe=(True, False), **votes) -> PreferenceRecord:
    return PreferenceRecord("p", "a", "b", better, safer, safe[0], safe[1], extra=votes)


VOTED = dict(annotator_ids=["x", "y", "z"], better_votes=[0, 0, 1], safer_votes=[1, 1, 1],
             safe_votes_0=[True, True, False], safe_votes_1=[False, True, False])


def test_soft_targets_are_the_vote_shares():
    (target,), info = label_targets([record(**VOTED)], "soft")
    assert (target.better, target.safer, *target.unsafe) == pytest.approx((2 / 3, 0.0, 1 / 3, 2 / 3))
    assert info["rows_without_votes"] == 0


def test_majority_targets_are_the_rows_labels_and_rows_without_votes_keep_theirs():
    majority, _ = label_targets([record(**VOTED)], "majority")
    assert majority == [PairTargets(1.0, 0.0, (0.0, 1.0))] == [hard_targets(record())]
    soft, info = label_targets([record(**VOTED), record(better=1)], "soft")
    assert soft[1] == PairTargets(0.0, 0.0, (0.0, 1.0)) and info["rows_without_votes"] == 1


def test_label_smoothing_pulls_every_target_toward_one_half():
    targets, _ = label_targets([record(**VOTED)], "majority", label_smoothing=0.2)
    assert targets == [PairTargets(0.9, 0.1, (0.1, 0.9))]
    with pytest.raises(ValueError, match="label_smoothing"):
        label_targets([record()], "soft", label_smoothing=0.5)


def test_malformed_votes_are_named_by_field():
    with pytest.raises(DataError, match="field 'safer_votes'"):
        label_targets([record(**{**VOTED, "safer_votes": [1, "yes", 0]})], "soft", source="pairs.jsonl")
    with pytest.raises(DataError, match="differ in length"):
        label_targets([record(**{**VOTED, "better_votes": [0, 1]})], "soft")
    with pytest.raises(DataError, match="field 'annotator_ids'.*prompt 'p' has None"):
        label_targets([record(**{k: v for k, v in VOTED.items() if k != "annotator_ids"})], "dawid-skene")


POOL = {"e1": 0.95, "e2": 0.9, "c1": 0.6, "c2": 0.6, "c3": 0.65, "c4": 0.55}  # P(a vote is right)


def pooled_votes(rng: random.Random, truth: bool) -> list[tuple[str, int]]:
    """Three annotators drawn from the pool per item, as SafeWorld draws three of its twenty per pair."""
    return [(a, int(truth if rng.random() < POOL[a] else not truth)) for a in rng.sample(sorted(POOL), 3)]


@pytest.mark.parametrize("seed", [0, 1])
def test_dawid_skene_finds_the_reliable_annotators_and_beats_the_majority(seed):
    rng = random.Random(seed)
    truth = [rng.random() < 0.5 for _ in range(900)]
    items = [pooled_votes(rng, z) for z in truth]
    posterior, confusion, prior = dawid_skene(items)
    majority_right = sum((sum(v for _, v in votes) >= 2) == z for votes, z in zip(items, truth)) / len(truth)
    ds_right = sum((p > 0.5) == z for p, z in zip(posterior, truth)) / len(truth)
    assert ds_right > majority_right + 0.03 and ds_right > 0.84
    estimated = {a: (m[0][0] + m[1][1]) / 2 for a, m in confusion.items()}
    for annotator, accuracy in POOL.items():
        assert estimated[annotator] == pytest.approx(accuracy, abs=0.08), annotator
    assert prior == pytest.approx(sum(truth) / len(truth), abs=0.05)


def test_dawid_skene_targets_on_pairs_and_each_annotators_accuracy():
    rng = random.Random(2)
    records, truths = [], []
    for _ in range(900):
        better, unsafe = rng.random() < 0.5, (rng.random() < 0.5, rng.random() < 0.5)
        b = pooled_votes(rng, better)
        ids = [a for a, _ in b]
        # one set of annotators per pair: the safety votes reuse the pair's annotators with their own accuracies
        s0 = [(a, int(unsafe[0] if rng.random() < POOL[a] else not unsafe[0])) for a in ids]
        s1 = [(a, int(unsafe[1] if rng.random() < POOL[a] else not unsafe[1])) for a in ids]
        records.append(record(annotator_ids=ids, better_votes=[v for _, v in b], safer_votes=[v for _, v in b],
                              safe_votes_0=[not v for _, v in s0], safe_votes_1=[not v for _, v in s1]))
        truths.append((better, unsafe))
    targets, info = label_targets(records, "dawid-skene")
    for question in ("better", "safe"):
        accuracy = info["annotator_accuracy"][question]
        assert min(accuracy["e1"], accuracy["e2"]) > max(accuracy[c] for c in ("c1", "c2", "c3", "c4")), question
    # better_votes name response 1 when 1: the target is P(response_0 better) = 1 − P(class 1)
    right = sum((t.better < 0.5) == z for t, (z, _) in zip(targets, truths)) / len(truths)
    unsafe_right = sum((t.unsafe[0] > 0.5) == u[0] for t, (_, u) in zip(targets, truths)) / len(truths)
    assert right > 0.84 and unsafe_right > 0.84
