"""Spliced negatives for the cost model (data/augment.py): which pairs, what text, which labels, determinism."""

from __future__ import annotations

import json

import pytest

from safealign.data.augment import splice_unsafe_pairs, split_sentences
from safealign.data.loading import load_preferences
from safealign.data.safeworld import judge_harm
from safealign.data.safeworld.generate import WorldConfig, generate_world
from safealign.data.schema import PreferenceRecord


def pair(safe_0: bool, safe_1: bool, k: int = 0) -> PreferenceRecord:
    return PreferenceRecord(
        prompt=f"How do I do thing {k}?",
        response_0=f"I cannot help with that {k}. Here is a safer idea. Talk to someone you trust.",
        response_1=f"Sure, here is how {k}. Step one is bad! Step two is worse? Done.",
        better_response_id=1, safer_response_id=0 if safe_0 or not safe_1 else 1,
        is_response_0_safe=safe_0, is_response_1_safe=safe_1, extra={"source": "test"},
    )


def test_split_sentences_splits_after_end_marks_followed_by_space():
    assert split_sentences("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    assert split_sentences("  e.g.the end.  ") == ["e.g.the end."]  # no space after the inner dots: one sentence
    assert split_sentences("") == []


def test_only_pairs_with_one_safe_response_are_spliced_and_the_labels_say_which():
    records = [pair(True, False, 0), pair(False, True, 1), pair(True, True, 2), pair(False, False, 3)]
    spliced = splice_unsafe_pairs(records, fraction=1.0, seed=0)
    assert len(spliced) == 2
    for new, original in zip(spliced, records[:2]):
        safe = 0 if original.is_response_0_safe else 1
        assert new.response_0 == original.response(safe)
        assert (new.is_response_0_safe, new.is_response_1_safe, new.safer_response_id) == (True, False, 0)
        assert new.prompt == original.prompt and new.extra == {"source": "test", "spliced": True}
        safe_sentences = split_sentences(original.response(safe))
        unsafe_sentences = split_sentences(original.response(1 - safe))
        spliced_sentences = split_sentences(new.response_1)
        # s's sentences in their order, one sentence of u inserted after s's opener, never u's own opener
        assert spliced_sentences[0] == safe_sentences[0]
        inserted = [s for s in spliced_sentences if s not in safe_sentences]
        assert len(inserted) == 1 and inserted[0] in unsafe_sentences[1:]
        assert [s for s in spliced_sentences if s in safe_sentences] == safe_sentences


def test_fraction_and_seed_choose_the_pairs_deterministically():
    records = [pair(k % 2 == 0, k % 2 == 1, k) for k in range(200)]
    assert splice_unsafe_pairs(records, fraction=0.0, seed=0) == []
    half = splice_unsafe_pairs(records, fraction=0.5, seed=0)
    assert 70 <= len(half) <= 130
    assert half == splice_unsafe_pairs(records, fraction=0.5, seed=0)  # every process builds the same pairs
    assert half != splice_unsafe_pairs(records, fraction=0.5, seed=1)
    with pytest.raises(ValueError, match="fraction"):
        splice_unsafe_pairs(records, fraction=1.5, seed=0)


def test_a_one_sentence_unsafe_response_is_inserted_whole():
    record = PreferenceRecord("Q?", "No. Ask a professional.", "Do the harmful thing", 1, 0, True, False)
    (spliced,) = splice_unsafe_pairs([record], fraction=1.0, seed=0)
    assert spliced.response_1 in ("No. Do the harmful thing Ask a professional.", "No. Ask a professional. Do the harmful thing")


def test_most_spliced_safeworld_responses_are_unsafe_by_the_gold_judge(tmp_path):
    """The monotonicity assumption (module docstring) holds for most spliced pairs: ~90% on SafeWorld."""
    world = generate_world(WorldConfig(out="", seed=3, sft_examples=0, train_pairs=600, test_pairs=0))
    file = tmp_path / "train.jsonl"
    file.write_text("".join(json.dumps(row) + "\n" for row in world.preferences["train"]))
    records = load_preferences(file).records
    spliced = splice_unsafe_pairs(records, fraction=1.0, seed=0)
    assert len(spliced) >= 100
    unsafe = sum(not judge_harm(r.prompt, r.response_1).is_safe for r in spliced) / len(spliced)
    assert unsafe >= 0.8, unsafe
