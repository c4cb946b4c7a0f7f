"""Prompt formatting and tokenisation shared by every stage.

A prompt is rendered with the tokenizer's chat template when it has one, otherwise with the Safe RLHF
template (the reference's): `BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:`. A response is the
text after that, followed by EOS. Training masks everything but the response tokens (and EOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from safealign.data.label_aggregation import PairTargets
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


def _encode_many(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, from one call (a fast tokenizer encodes the list at once; the ids are those of
    encoding each text alone). Special tokens are already in the texts (chat template / EOS): no second BOS."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def _with_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """A tokenizer that adds BOS itself (add_bos_token) gets it in front of a prompt that lacks it."""
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        if not ids or ids[0] != tokenizer.bos_token_id:
            return [tokenizer.bos_token_id] + ids
    return ids


def _prompts_and_responses(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
                           ) -> tuple[list[list[int]], list[list[int]]]:
    """The ids of each prompt (formatted) and of each response as it follows it (+ EOS), encoded separately so that
    the boundary is exact whatever the BPE merges would do across it (the same boundary generation sees). Each
    distinct prompt is formatted and encoded once: pairs and samples repeat their prompts."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    distinct = list(dict.fromkeys(prompts))
    formatted = dict(zip(distinct, (format_prompt(tokenizer, p) for p in distinct)))
    prompt_ids = dict(zip(distinct, (_with_bos(tokenizer, ids) for ids in _encode_many(tokenizer, list(formatted.values())))))
    response_ids = _encode_many(tokenizer, [format_response(tokenizer, formatted[p], r) for p, r in zip(prompts, responses)])
    return [prompt_ids[p] for p in prompts], response_ids


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """What a policy reads before its response, for each prompt: the formatted prompt's ids (BOS where the
    tokenizer adds one)."""
    distinct = list(dict.fromkeys(prompts))
    ids = _encode_many(tokenizer, [format_prompt(tokenizer, p) for p in distinct])
    by_prompt = dict(zip(distinct, (_with_bos(tokenizer, i) for i in ids)))
    return [by_prompt[p] for p in prompts]


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return tokenize_prompts(tokenizer, [prompt])[0]


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
                      max_length: int) -> list[TokenizedExample]:
    """Prompt + response + EOS, labels only on the response; truncated from the response's end."""
    examples = []
    for prompt_ids, response_ids in zip(*_prompts_and_responses(tokenizer, prompts, responses)):
        if len(prompt_ids) >= max_length:
            # Keep the end of an over-long prompt (the part next to the response) and at least one
            # response token, so that no example is left without a label.
            prompt_ids = prompt_ids[-(max_length // 2):]
        input_ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        examples.append(TokenizedExample(input_ids=input_ids, labels=labels))
    return examples


def tokenize_prompt_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                             max_length: int) -> TokenizedExample:
    return tokenize_examples(tokenizer, [prompt], [response], max_length)[0]


def tokenize_for_scoring(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
                         max_length: int) -> list[list[int]]:
    """Inputs of a reward/cost model: formatted prompt + response + EOS (docs/maths.md §2), each one's end kept.

    The score is read at the last token, so an over-long text is cut from the prompt's start, never at the
    response's end.
    """
    return [(p + r)[-max_length:] for p, r in zip(*_prompts_and_responses(tokenizer, prompts, responses))]


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair ready for a score model: both texts tokenised, the labels as ints/bools."""

    input_ids: tuple[list[int], list[int]]  # prompt + response_i + EOS, i = 0, 1
    better_response_id: int
    safer_response_id: int
    is_safe: tuple[bool, bool]
    # soft labels (data.label_aggregation.PairTargets as a tuple): P(r0 more helpful), P(r0 more harmless),
    # P(r0 unsafe), P(r1 unsafe); None: the hard labels above are the targets
    targets: tuple[float, float, float, float] | None = None


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, records: Sequence[PreferenceRecord], max_length: int,
                   targets: Sequence[PairTargets] | None = None) -> list[TokenizedPair]:
    ids = tokenize_for_scoring(tokenizer, [r.prompt for r in records for _ in (0, 1)],
                               [r.response(i) for r in records for i in (0, 1)], max_length)
    return [TokenizedPair(input_ids=(ids[2 * k], ids[2 * k + 1]), better_response_id=r.better_response_id,
                          safer_response_id=r.safer_response_id, is_safe=(r.is_response_0_safe, r.is_response_1_safe),
                          targets=None if targets is None else (targets[k].better, targets[k].safer, *targets[k].unsafe))
            for k, r in enumerate(records)]
