"""Verbalized Sampling (Zhang, Yu, Chong, Sicilia, Tomz, Manning, Shi; arXiv 2510.01171): ask an instruction model
for k responses, each with a probability, and draw one response from that verbalised distribution.

RLHF sharpens a policy towards typical answers (mode collapse); asked for a *distribution* of answers, an aligned
model recalls more of what its base model would say. One VS draw:
1. the prompt is wrapped in the paper's VS-Standard instructions (`verbalized_prompt`, the wording of the reference
   repository CHATS-lab/verbalized-sampling's README: k responses, each `<response>` holding a `<text>` and a numeric
   `<probability>`, "randomly sample responses from the full distribution");
2. the model answers once (the one generation path, `generate_samples`, with k × max_new_tokens tokens so that k
   responses fit);
3. `parse_verbalized` reads the answer into texts and probabilities, renormalised to sum 1;
4. one response is drawn from them with a seeded torch.Generator (`choose`, the sampler's inverse CDF);
5. an answer that does not parse gets a direct answer instead (the plain prompt, `max_new_tokens`), counted as a
   fallback and named in a warning.

What counts as parsed (strict): the answer holds at least one complete block
`<response> ... <text>T</text> ... <probability>P</probability> ... </response>` (tags in lower case, whitespace
allowed between them) whose T is not blank and whose P is a decimal number in [0, 1] or a percentage in [0%, 100%]
(`0.3`, `.3`, `1`, `30%`). A block without those (an empty text, no probability, `high`, `1.5`, `-0.1`, `120%`, two
texts, an unclosed tag, a block cut off by the token limit) is dropped and counted in `dropped`; the blocks that
remain are the distribution, whatever their number (fewer or more than k). An answer with no block left, or whose
remaining probabilities are all 0 (no distribution stated), does not parse. Text outside the blocks is ignored.
Verbalised probabilities are the model's statement, not calibrated likelihoods (the paper says so too).

Small models often do not follow the format at all: the evaluation offers the mode only for a model that parses at
least half the time (`require_parse_rate`, a probe on the first prompts). Measured by bench/bench_verbalized.py
(temperature 1, k = 5, 320 tokens per call): SmolLM2-135M-Instruct parsed 0 of 96 calls, Qwen2.5-Coder-0.5B-Instruct
6 of 48 (its near misses mostly write `text: ...` / `probability: ...` lines instead of the tags): neither passes.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safealign.config import ConfigError
from safealign.models.generation import Sample, SamplingConfig, generate_samples, sample_next_token

DEFAULT_K = 5  # the reference code's num_samplings
PROBE_PROMPTS = 8  # VS calls of the parse-rate probe
MIN_PARSE_RATE = 0.5  # below this share of parsed answers the mode is refused (unless forced)

# VS-Standard as the reference repository's README gives it (a system prompt there; here it leads the user turn,
# since not every chat template takes a system message).
VS_INSTRUCTIONS = (
    "<instructions>\n"
    "Generate {k} responses to the user query, each within a separate <response> tag. Each <response> must include "
    "a <text> and a numeric <probability>. Randomly sample responses from the full distribution.\n"
    "</instructions>\n\n"
    "{prompt}"
)

_BLOCK = re.compile(r"<response>(.*?)</response>", re.DOTALL)
_TEXT = re.compile(r"<text>(.*?)</text>", re.DOTALL)
_PROBABILITY = re.compile(r"<probability>(.*?)</probability>", re.DOTALL)
_NUMBER = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(%?)")


def verbalized_prompt(prompt: str, k: int = DEFAULT_K) -> str:
    """The user turn of a VS call: the VS-Standard instructions for `k` responses, then the prompt."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return VS_INSTRUCTIONS.format(k=k, prompt=prompt.strip())


def parse_probability(text: str) -> float | None:
    """A stated probability: a decimal number in [0, 1] (`0.3`, `.3`, `1`) or a percentage in [0%, 100%] (`30%`
    → 0.3), whitespace around it allowed; None for anything else (words, signs, other numbers, NaN)."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    value = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    return value if 0.0 <= value <= 1.0 else None


@dataclass(frozen=True)
class VerbalizedAnswer:
    """The distribution an answer states: k' ≥ 1 texts and their probabilities, renormalised to sum 1."""

    texts: tuple[str, ...]  # stripped, not blank
    probabilities: tuple[float, ...]  # stated / sum(stated)
    stated: tuple[float, ...]  # as the answer wrote them, in [0, 1]
    dropped: int  # <response> blocks (complete or cut off) that did not parse


def parse_verbalized(answer: str) -> VerbalizedAnswer | None:
    """The texts and probabilities of a VS answer, or None when it does not parse (module docstring: the rules)."""
    blocks = _BLOCK.findall(answer)
    dropped = max(0, answer.count("<response>") - len(blocks))  # opened, never closed (cut off)
    texts, stated = [], []
    for block in blocks:
        text, probability = _TEXT.findall(block), _PROBABILITY.findall(block)
        value = parse_probability(probability[0]) if len(probability) == 1 else None
        if len(text) != 1 or not text[0].strip() or value is None:
            dropped += 1
            continue
        texts.append(text[0].strip())
        stated.append(value)
    total = math.fsum(stated)
    if not texts or total <= 0.0:
        return None
    return VerbalizedAnswer(tuple(texts), tuple(p / total for p in stated), tuple(stated), dropped)


def choose(probabilities: Sequence[float], generator: torch.Generator | None = None) -> int:
    """The index of one response drawn from `probabilities` (≥ 0, summing to 1), with the sampler's inverse CDF
    (`sample_next_token` at temperature 1 on their logarithms): reproducible with a seeded generator."""
    log_probs = torch.tensor(probabilities, dtype=torch.float64).log()[None]  # size = (1, k'); log 0 = -inf
    return int(sample_next_token(log_probs, SamplingConfig(), generator)[0])


@dataclass
class VerbalizedSamples:
    """One response per VS call, prompt-major as `generate_samples`'s, and whether each came from a parsed answer."""

    samples: list[Sample]
    parsed: list[bool]  # False: the answer did not parse and the sample is a direct one (a fallback)
    answers: list[str]  # the model's raw VS answers, one per call

    @property
    def calls(self) -> int:
        return len(self.parsed)

    @property
    def fallbacks(self) -> int:
        return self.parsed.count(False)

    @property
    def parse_rate(self) -> float | None:
        """Share of VS calls whose answer parsed (None when there were none)."""
        return (self.calls - self.fallbacks) / self.calls if self.calls else None


def verbalized_calls(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     cfg: SamplingConfig, k: int = DEFAULT_K, batch_size: int = 64, seed: int = 0,
                     progress: bool = False) -> list[Sample]:
    """The raw VS answers: `cfg.num_samples` calls per prompt (prompt-major), each with room for k responses of
    `cfg.max_new_tokens` tokens (k × max_new_tokens new tokens)."""
    call = replace(cfg, max_new_tokens=k * cfg.max_new_tokens)
    return generate_samples(model, tokenizer, [verbalized_prompt(p, k) for p in prompts], call,
                            batch_size=batch_size, seed=seed, progress=progress)


def generate_verbalized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                        cfg: SamplingConfig, k: int = DEFAULT_K, batch_size: int = 64, seed: int = 0,
                        progress: bool = False) -> VerbalizedSamples:
    """`cfg.num_samples` responses per prompt, each drawn by one VS call (prompt-major, as `generate_samples`).

    A parsed call gives the drawn text (its `num_tokens` counted with `tokenizer`, `ended_with_eos` True: a text
    closed by `</text>` is complete); a call that does not parse gives a direct answer to the plain prompt, sampled
    with `cfg`, and is counted in `fallbacks` (a warning names the count). The same arguments give the same samples.
    """
    answers = verbalized_calls(model, tokenizer, prompts, cfg, k, batch_size, seed, progress)
    generator = torch.Generator().manual_seed(seed)
    samples: list[Sample | None] = []
    for answer in answers:
        distribution = parse_verbalized(answer.text)
        if distribution is None:
            samples.append(None)
            continue
        text = distribution.texts[choose(distribution.probabilities, generator)]
        num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        samples.append(Sample(text=text, num_tokens=num_tokens, ended_with_eos=True))
    failed = [i for i, s in enumerate(samples) if s is None]
    if failed:
        warnings.warn(f"verbalized sampling: {len(failed)} of {len(samples)} answers did not parse; those "
                      f"{len(failed)} were sampled directly instead (fallbacks)", stacklevel=2)
        per_prompt = cfg.num_samples
        direct = generate_samples(model, tokenizer, [prompts[i // per_prompt] for i in failed],
                                  replace(cfg, num_samples=1), batch_size=batch_size, seed=seed)
        for i, sample in zip(failed, direct):
            samples[i] = sample
    fell_back = set(failed)
    return VerbalizedSamples(samples=samples, parsed=[i not in fell_back for i in range(len(samples))],
                             answers=[a.text for a in answers])


def probe_parse_rate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     cfg: SamplingConfig, k: int = DEFAULT_K, probe: int = PROBE_PROMPTS, seed: int = 0) -> float:
    """Share of parsed answers among one VS call on each of the first `probe` prompts."""
    if not prompts:
        raise ValueError("the parse-rate probe needs at least one prompt")
    calls = verbalized_calls(model, tokenizer, prompts[:probe], replace(cfg, num_samples=1), k, seed=seed)
    return sum(parse_verbalized(c.text) is not None for c in calls) / len(calls)


def require_parse_rate(rate: float, probed: int, model_name: str = "the model",
                       minimum: float = MIN_PARSE_RATE) -> None:
    """A ConfigError when fewer than `minimum` of the probe's answers parsed: VS is offered only for a model that
    follows its format at least that often (below it, most samples would be fallbacks: direct sampling)."""
    if rate < minimum:
        raise ConfigError(
            f"verbalized sampling: {model_name} answered the VS format in {rate:.0%} of {probed} probe calls "
            f"(fewer than {minimum:.0%}): the mode is offered only for a model that parses at least that often; "
            "use sampling: direct, or force it (verbalized_force: true) to sample with fallbacks anyway")
