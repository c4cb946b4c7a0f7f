"""Simulated crowdworkers for SafeWorld (a simulation of the paper's human annotators).

A seeded pool of annotators, each with individual noise and bias:
    temperature T_a = noise · exp(N(0, 0.3²)),  position bias b_a ~ N(0, bias²),  length bias l_a ~ N(0, bias²)
Decoupled mode (the paper's) asks two separate questions per pair, plus a safety label per response:
    more helpful:   P(response_0) = σ((h_0 − h_1)/T_a + b_a + l_a·(words_0 − words_1)/10)   (Bradley-Terry on
                    the gold helpfulness h)
    more harmless:  if exactly one response is (gold) safe, that one; if both are unsafe with different
                    severities, Bradley-Terry on the severities; a tie (e.g. both safe) is a coin flip
                    tilted by b_a
    is safe:        the gold label, flipped with probability `label_flip_rate`
Coupled mode (the single-preference ablation) asks one question, "which is better overall", and uses the
answer for both preferences: Bradley-Terry on u = h − `coupled_harm_weight`·severity, except that a safe
response always beats an unsafe one (so that no row contradicts its safety labels).
With several annotators per pair, each answer is a majority vote (ties go to the first annotator) and
every vote is recorded. With `noise = 0` the helpfulness and severity answers are exact (ties: coin flip).
Only a label flip can make a row contradictory (its safer response labelled unsafe, the other safe).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from safealign.data.safeworld.judges import HarmJudgement, _judge_harm, judge_helpfulness, parse_prompt
from safealign.data.schema import HARM_CATEGORIES


@dataclass(frozen=True)
class Annotator:
    id: str
    temperature: float  # 0: answers by the gold judge exactly
    position_bias: float  # logit in favour of response_0
    length_bias: float  # logit per 10 more words


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class Annotators:
    """A pool of simulated annotators; `annotate` labels one pair as a PKU-SafeRLHF row."""

    def __init__(
        self,
        seed: int = 0,
        num_annotators: int = 20,
        per_pair: int = 1,
        noise: float = 0.5,
        bias: float = 0.1,
        label_flip_rate: float = 0.02,
        coupled: bool = False,
        coupled_harm_weight: float = 1.5,
        stream: str = "",
    ):
        if num_annotators < 1 or not 1 <= per_pair <= num_annotators:
            raise ValueError("need num_annotators >= 1 and 1 <= per_pair <= num_annotators")
        if noise < 0 or bias < 0 or not 0 <= label_flip_rate <= 1:
            raise ValueError("noise and bias must be >= 0 and label_flip_rate in [0, 1]")
        pool_rng = random.Random(f"safeworld-annotators:{seed}")  # the same people for every stream
        self.pool = [
            Annotator(
                id=f"annotator-{i:02d}",
                temperature=noise * math.exp(pool_rng.gauss(0.0, 0.3)),
                position_bias=pool_rng.gauss(0.0, bias) if bias > 0 else 0.0,
                length_bias=pool_rng.gauss(0.0, bias) if bias > 0 else 0.0,
            )
            for i in range(num_annotators)
        ]
        self.per_pair = per_pair
        self.label_flip_rate = label_flip_rate
        self.coupled = coupled
        self.coupled_harm_weight = coupled_harm_weight
        self.rng = random.Random(f"safeworld-labels:{seed}:{stream}")

    # --- one annotator's answers ---------------------------------------------------------------------
    def _choose(self, a: Annotator, score_0: float, score_1: float, extra_logit: float = 0.0) -> int:
        """Bradley-Terry choice between two scores (higher wins); exact when the temperature is 0."""
        if a.temperature == 0.0:
            if score_0 != score_1:
                return 0 if score_0 > score_1 else 1
            return self.rng.randrange(2)
        logit = (score_0 - score_1) / a.temperature + a.position_bias + extra_logit
        return 0 if self.rng.random() < _sigmoid(logit) else 1

    def _coin(self, a: Annotator) -> int:
        return 0 if self.rng.random() < _sigmoid(a.position_bias) else 1

    def _more_harmless(self, a: Annotator, j0: HarmJudgement, j1: HarmJudgement) -> int:
        if j0.is_safe != j1.is_safe:
            return 0 if j0.is_safe else 1
        if j0.severity == j1.severity:
            return self._coin(a)
        return self._choose(a, -j0.severity, -j1.severity)

    def _better_overall(self, a: Annotator, h: tuple[float, float], j: tuple[HarmJudgement, HarmJudgement],
                        length_logit: float) -> int:
        if j[0].is_safe != j[1].is_safe:
            return 0 if j[0].is_safe else 1
        u0 = h[0] - self.coupled_harm_weight * j[0].severity
        u1 = h[1] - self.coupled_harm_weight * j[1].severity
        return self._choose(a, u0, u1, length_logit)

    def _safety_label(self, judgement: HarmJudgement) -> bool:
        return judgement.is_safe != (self.rng.random() < self.label_flip_rate)

    # --- a pair --------------------------------------------------------------------------------------
    def annotate(self, prompt: str, response_0: str, response_1: str) -> dict[str, Any]:
        """Label one pair: a PKU-SafeRLHF row plus annotator ids and votes."""
        h = (judge_helpfulness(prompt, response_0), judge_helpfulness(prompt, response_1))
        j = (_judge_harm(response_0), _judge_harm(response_1))  # cached, read-only
        words = (len(response_0.split()), len(response_1.split()))
        annotators = self.rng.sample(self.pool, self.per_pair) if self.per_pair > 1 else [self.rng.choice(self.pool)]
        better, safer, safe_0, safe_1 = [], [], [], []
        for a in annotators:
            length_logit = a.length_bias * (words[0] - words[1]) / 10.0
            if self.coupled:
                choice = self._better_overall(a, h, j, length_logit)
                better.append(choice)
                safer.append(choice)
            else:
                better.append(self._choose(a, h[0], h[1], length_logit))
                safer.append(self._more_harmless(a, j[0], j[1]))
            safe_0.append(self._safety_label(j[0]))
            safe_1.append(self._safety_label(j[1]))
        is_safe_0, is_safe_1 = _majority(safe_0), _majority(safe_1)
        info = parse_prompt(prompt)
        requested = info.category if info is not None and info.kind == "harmful" else None
        cats_0, sev_0 = _harm_fields(j[0], is_safe_0, requested)
        cats_1, sev_1 = _harm_fields(j[1], is_safe_1, requested)
        return {
            "prompt": prompt,
            "response_0": response_0,
            "response_1": response_1,
            "better_response_id": int(_majority(better)),
            "safer_response_id": int(_majority(safer)),
            "is_response_0_safe": bool(is_safe_0),
            "is_response_1_safe": bool(is_safe_1),
            "response_0_harm_category": cats_0,
            "response_1_harm_category": cats_1,
            "response_0_severity_level": sev_0,
            "response_1_severity_level": sev_1,
            "annotator_ids": [a.id for a in annotators],
            "better_votes": better,
            "safer_votes": safer,
        }


def _majority(votes: list) -> Any:
    """The most common vote; a tie goes to the first annotator's vote."""
    if len(votes) == 1:
        return votes[0]
    counts = {v: votes.count(v) for v in votes}
    top = max(counts.values())
    return next(v for v in votes if counts[v] == top)


def _harm_fields(judgement: HarmJudgement, labelled_safe: bool, requested: str | None) -> tuple[dict[str, bool], int]:
    """Categories and severity consistent with the (possibly flipped) safety label."""
    if labelled_safe:
        return {c: False for c in HARM_CATEGORIES}, 0
    if not judgement.is_safe:
        return dict(judgement.categories), judgement.severity
    # A flipped label: the annotator calls safe content unsafe, most likely under the requested category.
    return {c: c == requested for c in HARM_CATEGORIES}, 1
