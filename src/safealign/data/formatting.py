"""Prompt formatting and tokenisation shared by every stage.

A prompt is rendered with the tokenizer's chat template when it has one, otherwise with the Safe RLHF
template (the reference's): `BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:`. A response is the
text after that, followed by EOS. Training masks everything but the response tokens (and EOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from safealign.data.schema import PreferenceRecord

SAFE_RLHF_PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
IGNORE_INDEX = -100  # label value that the LM loss skips


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a model sees before its response."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return SAFE_RLHF_PROMPT_TEMPLATE.format(prompt=prompt)


def training_text(prompt: str, response: str) -> str:
    """A prompt and its response in the Safe RLHF template: the text a BPE for a preset is trained on."""
    return f"{SAFE_RLHF_PROMPT_TEMPLATE.format(prompt=prompt)} {response}"


def format_response(tokenizer: PreTrainedTokenizerBase, formatted_prompt: str, response: str) -> str:
    """The response text as it follows `formatted_prompt`, ending with EOS.

    A space separates it from a prompt that ends in a visible character (`... ASSISTANT:`); a prompt
    that ends in whitespace (`<|im_start|>assistant\n`) is followed directly.
    """
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; set one (responses must end with EOS)")
    separator = "" if not formatted_prompt or formatted_prompt[-1].isspace() else " "
    return f"{separator}{response.strip()}{tokenizer.eos_token}"


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Special tokens are already in the text (chat template / EOS): never add a second BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return _encode_prompt(tokenizer, format_prompt(tokenizer, prompt))


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, formatted_prompt: str) -> list[int]:
    ids = _encode(tokenizer, formatted_prompt)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        if not ids or ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id] + ids
    return ids


def tokenize_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> TokenizedExample:
    """Prompt + response + EOS, labels only on the response; truncated from the response's end.

    The prompt and response are encoded separately so that the boundary is exact whatever the BPE
    merges would do across it (the same boundary generation sees).
    """
    formatted_prompt = format_prompt(tokenizer, prompt)
    prompt_ids = _encode_prompt(tokenizer, formatted_prompt)
    response_ids = _encode(tokenizer, format_response(tokenizer, formatted_prompt, response))
    if len(prompt_ids) >= max_length:
        # Keep the end of an over-long prompt (the part next to the response) and at least one
        # response token, so that no example is left without a label.
        prompt_ids = prompt_ids[-(max_length // 2):]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def tokenize_for_scoring(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int) -> list[int]:
    """Input of a reward/cost model: formatted prompt + response + EOS (spec §2), its end kept.

    The score is read at the last token, so an over-long example is cut from the prompt's start,
    never at the response's end.
    """
    formatted_prompt = format_prompt(tokenizer, prompt)
    ids = _encode_prompt(tokenizer, formatted_prompt) + _encode(
        tokenizer, format_response(tokenizer, formatted_prompt, response))
    return ids[-max_length:]


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair ready for a score model: both texts tokenised, the labels as ints/bools."""

    input_ids: tuple[list[int], list[int]]  # prompt + response_i + EOS, i = 0, 1
    better_response_id: int
    safer_response_id: int
    is_safe: tuple[bool, bool]


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, records: Sequence[PreferenceRecord], max_length: int) -> list[TokenizedPair]:
    return [
        TokenizedPair(
            input_ids=(tokenize_for_scoring(tokenizer, r.prompt, r.response_0, max_length),
                       tokenize_for_scoring(tokenizer, r.prompt, r.response_1, max_length)),
            better_response_id=r.better_response_id,
            safer_response_id=r.safer_response_id,
            is_safe=(r.is_response_0_safe, r.is_response_1_safe),
        )
        for r in records
    ]
