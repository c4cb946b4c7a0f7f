"""Verbalized Sampling: the prompt, the parser on hand-written answers, renormalisation, the seeded draw, the fallback
count on a tiny model and the parse-rate gate."""

from __future__ import annotations

import warnings

import pytest
import torch

from safealign.config import ConfigError
from safealign.models import verbalized
from safealign.models.generation import Sample, SamplingConfig, generate_samples
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import train_tokenizer
from safealign.models.verbalized import (
    choose,
    generate_verbalized,
    parse_probability,
    parse_verbalized,
    probe_parse_rate,
    require_parse_rate,
    verbalized_prompt,
)

GOOD = """Sure! Here are some jokes.
<response>
  <text>Why did the coffee file a police report? It got mugged.</text>
  <probability>0.5</probability>
</response>
<response><text>Decaf? No thanks, I like my jokes with a kick.</text><probability>0.3</probability></response>
<response>
<text> Espresso yourself. </text>
<probability>20%</probability>
</response>
I hope you enjoy them!"""

PARTLY_BAD = """<response><text>kept one</text><probability>0.6</probability></response>
<response><text>   </text><probability>0.2</probability></response>
<response><text>no probability</text></response>
<response><text>a word for a probability</text><probability>high</probability></response>
<response><text>above one</text><probability>1.5</probability></response>
<response><text>negative</text><probability>-0.1</probability></response>
<response><text>two</text><text>texts</text><probability>0.1</probability></response>
<response><probability>0.4</probability></response>
<response><text>kept two</text><probability>.2</probability></response>
<response><text>cut off by the token limit</text><probability>0.1"""


def test_the_prompt_asks_for_k_responses_each_with_a_text_and_a_probability():
    prompt = verbalized_prompt("  Tell me a joke about coffee. ", k=5)
    assert prompt.startswith("<instructions>\nGenerate 5 responses to the user query, each within a separate "
                             "<response> tag. Each <response> must include a <text> and a numeric <probability>. "
                             "Randomly sample responses from the full distribution.\n</instructions>\n\n")
    assert prompt.endswith("</instructions>\n\nTell me a joke about coffee.")
    assert "Generate 3 responses" in verbalized_prompt("x", k=3)
    with pytest.raises(ValueError, match="k must be"):
        verbalized_prompt("x", k=0)


@pytest.mark.parametrize("text, expected", [
    ("0.3", 0.3), (" .25 ", 0.25), ("1", 1.0), ("0", 0.0), ("1.", 1.0), ("30%", 0.3), ("5 %", 0.05), ("100%", 1.0),
    ("1.5", None), ("120%", None), ("-0.1", None), ("high", None), ("0.3 or 0.4", None), ("nan", None), ("", None),
    ("1e-1", None), ("~0.2", None),
])
def test_a_probability_is_a_number_in_0_1_or_a_percentage(text, expected):
    assert parse_probability(text) == (pytest.approx(expected) if expected is not None else None)


def test_a_well_formed_answer_parses_into_texts_and_renormalised_probabilities():
    answer = parse_verbalized(GOOD)
    assert answer.texts == ("Why did the coffee file a police report? It got mugged.",
                            "Decaf? No thanks, I like my jokes with a kick.", "Espresso yourself.")
    assert answer.stated == pytest.approx((0.5, 0.3, 0.2))
    assert answer.probabilities == pytest.approx((0.5, 0.3, 0.2))
    assert answer.dropped == 0


def test_blocks_that_do_not_parse_are_dropped_and_counted_and_the_rest_renormalised():
    answer = parse_verbalized(PARTLY_BAD)
    assert answer.texts == ("kept one", "kept two")
    assert answer.stated == pytest.approx((0.6, 0.2))
    assert answer.probabilities == pytest.approx((0.75, 0.25))  # 0.6 / 0.8, 0.2 / 0.8
    # blank text, no probability, "high", 1.5, -0.1, two texts, no text, and the unclosed last block
    assert answer.dropped == 8


def test_stated_probabilities_that_do_not_sum_to_one_are_renormalised():
    text = "".join(f"<response><text>name {i}</text><probability>{p}</probability></response>"
                   for i, p in enumerate([0.6, 0.5, 0.3, 0.0]))
    answer = parse_verbalized(text)
    assert sum(answer.probabilities) == pytest.approx(1.0)
    assert answer.probabilities == pytest.approx((0.6 / 1.4, 0.5 / 1.4, 0.3 / 1.4, 0.0))
    assert len(answer.texts) == 4  # more or fewer blocks than asked for: all that parse are the distribution


@pytest.mark.parametrize("text", [
    "",
    "Why did the coffee file a police report? It got mugged.",  # a direct answer: no block
    "<response><text></text><probability>0.5</probability></response>",  # only a blank text
    "<response><text>a</text><probability>0</probability></response>"
    "<response><text>b</text><probability>0.0</probability></response>",  # no distribution stated
    "<response><text>a</text><probability>0.5</probability>",  # never closed
    "<RESPONSE><TEXT>a</TEXT><PROBABILITY>0.5</PROBABILITY></RESPONSE>",  # other tags
    '{"responses": [{"text": "a", "probability": 0.5}]}',  # the JSON variant is not this format
])
def test_an_answer_without_a_parsed_block_does_not_parse(text):
    assert parse_verbalized(text) is None


def test_seeded_draws_follow_the_verbalised_probabilities():
    generator = torch.Generator().manual_seed(0)
    draws = [choose([0.7, 0.2, 0.1, 0.0], generator) for _ in range(2000)]
    frequencies = [draws.count(i) / len(draws) for i in range(4)]
    # binomial standard deviation at n = 2000: 0.010 (p = 0.7), 0.009 (0.2), 0.007 (0.1): 3.5 of them
    assert frequencies[:3] == pytest.approx([0.7, 0.2, 0.1], abs=0.035)
    assert frequencies[3] == 0.0  # probability 0 is never drawn
    again = torch.Generator().manual_seed(0)
    assert [choose([0.7, 0.2, 0.1, 0.0], again) for _ in range(2000)] == draws


# --------------------------------------------------------------------------------------------------
# On a tiny model
# --------------------------------------------------------------------------------------------------
PROMPTS = ["tell me a joke", "name my cat", "a poem about the sea"]
CFG = SamplingConfig(max_new_tokens=4, num_samples=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([*PROMPTS, "responses text probability instructions"] * 20, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_causal_lm("tiny", tokenizer, seed=0).eval()


def scripted_calls(answers: list[str]):
    """A stand-in for the VS call that returns `answers` in turn (one per call), to test what follows it."""
    def calls(model, tokenizer, prompts, cfg, k=5, batch_size=64, seed=0, progress=False):
        n = len(prompts) * cfg.num_samples
        return [Sample(text=answers[i % len(answers)], num_tokens=1, ended_with_eos=True) for i in range(n)]
    return calls


def test_a_model_that_never_answers_the_format_falls_back_to_direct_answers_and_counts_them(model, tokenizer):
    with pytest.warns(UserWarning, match="6 of 6 answers did not parse"):
        drawn = generate_verbalized(model, tokenizer, PROMPTS, CFG, k=3, seed=0)
    assert (drawn.calls, drawn.fallbacks, drawn.parse_rate) == (6, 6, 0.0)
    assert drawn.parsed == [False] * 6 and len(drawn.answers) == 6
    # the fallbacks are the direct answers to the plain prompts, one draw each, prompt-major
    direct = generate_samples(model, tokenizer, [p for p in PROMPTS for _ in range(2)], SamplingConfig(max_new_tokens=4),
                              seed=0)
    assert drawn.samples == direct
    assert all(s.num_tokens <= 4 for s in drawn.samples)  # a direct answer keeps the per-response budget


def test_parsed_answers_give_one_of_their_texts_and_only_the_others_fall_back(model, tokenizer, monkeypatch):
    good = "<response><text>alpha</text><probability>0.9</probability></response>" \
           "<response><text>beta gamma</text><probability>0.1</probability></response>"
    monkeypatch.setattr(verbalized, "verbalized_calls", scripted_calls([good, "no format at all", good]))
    with pytest.warns(UserWarning, match="2 of 6 answers did not parse"):
        drawn = generate_verbalized(model, tokenizer, PROMPTS, CFG, k=3, seed=0)
    assert drawn.parsed == [True, False, True, True, False, True]
    assert (drawn.fallbacks, drawn.parse_rate) == (2, pytest.approx(4 / 6))
    for sample, parsed in zip(drawn.samples, drawn.parsed):
        if parsed:
            assert sample.text in {"alpha", "beta gamma"} and sample.ended_with_eos
            assert sample.num_tokens == len(tokenizer(sample.text, add_special_tokens=False)["input_ids"])
    with pytest.warns(UserWarning, match="2 of 6"):
        assert generate_verbalized(model, tokenizer, PROMPTS, CFG, k=3, seed=0) == drawn  # same seed, same samples


def test_no_warning_when_every_answer_parses(model, tokenizer, monkeypatch):
    monkeypatch.setattr(verbalized, "verbalized_calls",
                        scripted_calls(["<response><text>a</text><probability>1</probability></response>"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = generate_verbalized(model, tokenizer, PROMPTS, CFG, k=3)
    assert drawn.parse_rate == 1.0 and [s.text for s in drawn.samples] == ["a"] * 6


def test_the_vs_call_has_room_for_k_responses(model, tokenizer):
    calls = verbalized.verbalized_calls(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=3), k=4)
    assert len(calls) == 1 and calls[0].num_tokens <= 12


def test_the_gate_refuses_a_model_that_parses_less_than_half_the_time(model, tokenizer, monkeypatch):
    assert probe_parse_rate(model, tokenizer, PROMPTS, CFG, k=3) == 0.0  # a random tiny model: no format
    with pytest.raises(ConfigError, match=r"evaluate: model 'tiny'.* 38% of 8 probe calls"):
        require_parse_rate(3 / 8, 8, "evaluate: model 'tiny'")
    require_parse_rate(4 / 8, 8)  # half is enough
    good = "<response><text>a</text><probability>0.5</probability></response>"
    monkeypatch.setattr(verbalized, "verbalized_calls", scripted_calls([good, "prose", good, good]))
    assert probe_parse_rate(model, tokenizer, PROMPTS * 3, CFG, k=3, probe=8) == pytest.approx(6 / 8)
