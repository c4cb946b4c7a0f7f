"""Prompt formatting and tokenisation: the batched encoders give, text for text, the ids of encoding each piece alone;
right-padded batches need no padding mask under causal attention."""

from __future__ import annotations

import pytest
import torch

from safealign.data.collate import collate_sft, pad_batch, padding_mask_for_causal
from safealign.data.formatting import (
    IGNORE_INDEX,
    format_prompt,
    format_response,
    tokenize_examples,
    tokenize_for_scoring,
    tokenize_prompts,
)
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import train_tokenizer

PROMPTS = ["How do I bake bread?", "How do I kill a stuck process?", "How do I bake bread?", "Tell me a story."]
RESPONSES = ["Mix flour, water and salt, then bake.", "Use kill -9 with its id.", "I cannot help.", "Once upon a time."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((PROMPTS + RESPONSES) * 10, vocab_size=300)


def one_by_one(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The ids of the formatted prompt and of the response that follows it, each encoded alone."""
    formatted = format_prompt(tokenizer, prompt)
    return (tokenizer(formatted, add_special_tokens=False)["input_ids"],
            tokenizer(format_response(tokenizer, formatted, response), add_special_tokens=False)["input_ids"])


def test_batched_tokenisation_gives_the_ids_of_each_text_alone(tokenizer):
    pieces = [one_by_one(tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert tokenize_prompts(tokenizer, PROMPTS) == [p for p, _ in pieces]
    assert tokenize_for_scoring(tokenizer, PROMPTS, RESPONSES, 256) == [p + r for p, r in pieces]
    assert tokenize_for_scoring(tokenizer, PROMPTS, RESPONSES, 5) == [(p + r)[-5:] for p, r in pieces]  # the end kept
    examples = tokenize_examples(tokenizer, PROMPTS, RESPONSES, 256)
    for example, (prompt_ids, response_ids) in zip(examples, pieces):
        assert example.input_ids == prompt_ids + response_ids
        assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids  # the loss reads the response only
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        tokenize_for_scoring(tokenizer, PROMPTS[:2], RESPONSES[:1], 256)


def test_a_right_padded_batch_needs_no_padding_mask_under_causal_attention(tokenizer):
    examples = tokenize_examples(tokenizer, PROMPTS, RESPONSES, 256)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    assert padding_mask_for_causal(batch["attention_mask"]) is None
    left_ids, left_mask = pad_batch([e.input_ids for e in examples], tokenizer.pad_token_id, side="left")
    assert padding_mask_for_causal(left_mask) is left_mask
    model = build_causal_lm("tiny", tokenizer, seed=0).eval()
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        causal = model(input_ids=batch["input_ids"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(causal[real], masked[real], atol=1e-5, rtol=1e-5)  # every real position's logits
