"""Spliced negatives for the cost model: harmful content stays harmful inside safe text.

A cost model trained only on whole responses learns the cheapest cue that separates them, and on
refusal-heavy data that cue is the opening: "I cannot help with that." scores safe whatever follows. A
policy optimised against such a cost model finds it quickly and writes refusals or redirections with
harmful fragments in between (docs/results.md measured the round-1 cost model missing over half of the
unsafe answers of later policies this way). The paper's rounds repair it with new annotated pairs; this
repairs it in the data the cost model starts from.

For a pair with one response labelled safe (s) and one labelled unsafe (u), the spliced pair is

    (s,  s[:k] + one sentence of u + s[k:])    labelled (safe, unsafe), s the safer one

with k a random sentence boundary of s (never before its first sentence, so the opener stays s's) and the
sentence of u taken after u's own first sentence when u has more than one (a first sentence such as
"Sure, here is how." is an opener, not the harm). The assumption is monotonicity: inserting unsafe
content into a safe answer does not make it safe. It is wrong when the chosen sentence of u is harmless
by itself (label noise; on SafeWorld's pairs the gold judge calls about 90% of the spliced responses
unsafe). Only training pairs are spliced, never evaluation pairs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace

from safealign.data.schema import PreferenceRecord

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, split after '.', '!' or '?' followed by whitespace (a plain heuristic: it also
    splits after abbreviations, which only moves where a splice may go)."""
    return [part for part in _SENTENCE_END.split(text.strip()) if part]


def splice_unsafe_pairs(records: Sequence[PreferenceRecord], fraction: float, seed: int) -> list[PreferenceRecord]:
    """Spliced pairs (module docstring) for a random `fraction` of the pairs with exactly one response
    labelled safe; the same records, fraction and seed give the same pairs on every process."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"splice fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"splice-{seed}")
    spliced = []
    for record in records:
        if record.is_response_0_safe == record.is_response_1_safe or rng.random() >= fraction:
            continue
        safe = 0 if record.is_response_0_safe else 1
        safe_sentences = split_sentences(record.response(safe))
        unsafe_sentences = split_sentences(record.response(1 - safe))
        if not safe_sentences or not unsafe_sentences:
            continue
        if len(unsafe_sentences) > 1:  # never u's own opener ("Sure, here is how."): it is not the harm
            inserted = unsafe_sentences[rng.randrange(1, len(unsafe_sentences))]
        else:
            inserted = unsafe_sentences[0]
        position = rng.randint(1, len(safe_sentences))
        text = " ".join(safe_sentences[:position] + [inserted] + safe_sentences[position:])
        spliced.append(replace(
            record,
            response_0=record.response(safe), response_1=text,
            is_response_0_safe=True, is_response_1_safe=False, safer_response_id=0,
            # Helpfulness is not judged on a spliced pair; the cost model does not read it. Keep s the better.
            better_response_id=0,
            response_0_harm_category=record.response_0_harm_category if safe == 0 else record.response_1_harm_category,
            response_1_harm_category=record.response_1_harm_category if safe == 0 else record.response_0_harm_category,
            response_0_severity_level=None, response_1_severity_level=None,
            extra={**record.extra, "spliced": True},
        ))
    return spliced
