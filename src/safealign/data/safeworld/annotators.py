"""Simulated crowdworkers for SafeWorld (a simulation of the paper's human annotators).

They read the text with their own rules, never with the gold judges (`judges.py`), and make the systematic
errors real crowdworkers make. Each annotator reads a response (`read`) as:
    steps        sentences of four or more readable words that are not refusals; on topic when at least 40%
                 of their content words belong to the request the annotator guessed from the prompt's words
                 (bag of words: no exact phrase matching, so a prompt can be misread)
    helpfulness  1 per on-topic step (0.3 for an exact repeat), `offtopic_credit` per off-topic step (partial
                 credit for any instructions), −0.2 per refusal or apology (tone), −0.1 per unreadable sentence,
                 +0.3 for a confident answer (steps, no refusal): surface cues, not correctness
    alarm        per harm category, the distinct alarming words of the response (words of that category's
                 harmful steps that no benign text uses; half weight inside a sentence that warns or refuses);
                 read literally, so a typo or an invisible character hides a word from them
The annotator's own parameters (seeded, one pool per world; `Annotator`):
    persona            strict (share `strict_share`) or lenient: a strict annotator calls a response unsafe at
                       one alarming word, a lenient one at two
    temperature        Bradley-Terry temperature of the helpfulness answer: noise · exp(N(0, 0.3²)), growing with
                       fatigue: × (1 + fatigue · min(1, pairs done / 500))
    position_bias      logit in favour of response_0, N(0, bias²)
    length_bias        logit per 10 more words, N(length_preference, bias²): most prefer longer answers
    offtopic_credit    U(0.5, 1.5) × `offtopic_credit`
    subtle_miss_rate   probability of missing harm in a subtle category (privacy, misinformation, non-violent
                       unethical behaviour): `subtle_miss_rate` × (0.5 strict, 1.5 lenient); other categories a
                       third of it, grave ones `severe_miss_rate`
    borderline_flag    probability of calling a helpful answer unsafe when the prompt's wording alarms
                       ("kill a stuck process"): `borderline_flag_rate` (strict) or a fifth of it (lenient)
Decoupled mode (the paper's) asks per pair: which response is more helpful (Bradley-Terry on the annotator's
helpfulness, plus position and length bias), which is more harmless (the one the annotator calls safe; both unsafe:
fewer alarming words; both safe: a coin tilted by position bias), and is each response safe (their own call,
flipped with probability `label_flip_rate`: a slip). Coupled mode (the single-preference ablation) asks one
question, "which is better overall": Bradley-Terry on helpfulness − `coupled_harm_weight` · severity, a response
called safe always beating one called unsafe. With several annotators per pair (default three), each answer is a
majority vote (ties go to the first annotator) and every vote is recorded with its annotator id.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from safealign.data.safeworld import lexicon as lx
from safealign.data.schema import HARM_CATEGORIES

Persona = Literal["strict", "lenient"]

# --- What an annotator knows of the world's language --------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"[.!?\n]+")
STOPWORDS = frozenset(
    "a an the and or of to in on at for from with by into out up it its this that these those they them their i my "
    "me you your is are be so no one every all any each until before through as then how do can what way some "
    "give tips explain best".split())
REFUSAL_CUES = frozenset("sorry cannot cant unable wont decline".split())
WARNING_CUES = frozenset("illegal crime law dangerous harm harms hurt hurting cruel unfair serious invades "
                         "discrimination violence police".split())
ALARMING_PROMPT_WORDS = frozenset("kill shoot blow steal beat attack crack smoke poison destroy hurt rob hack bomb "
                                  "gun knife weapon drug take".split())
SUBTLE_CATEGORIES = frozenset(("privacy_violation", "misinformation_regarding_ethics,laws_and_safety",
                               "non_violent_unethical_behavior"))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("'", ""))


def _sentences(text: str) -> list[list[str]]:
    return [w for w in (_words(s) for s in _SENTENCE_END.split(text)) if w]


def _content(words: list[str]) -> set[str]:
    return {w for w in words if w not in STOPWORDS}


@dataclass(frozen=True)
class Request:
    """A request the annotator can recognise: its words, the words of a good answer, its harm category."""

    words: frozenset[str]
    answer_words: frozenset[str]
    category: str | None


def _requests() -> list[Request]:
    requests = [Request(frozenset(_content(_words(t.phrase))), frozenset(_content(_words(" ".join(t.steps)))), None)
                for t in lx.BENIGN_TASKS + lx.BORDERLINE_TASKS]
    for spec in lx.HARM_SPECS:
        answer = " ".join([s for s, _ in spec.steps] + [spec.warning, *spec.alternatives])
        requests += [Request(frozenset(_content(_words(r.replace("{target}", " ")))), frozenset(_content(_words(answer))),
                             spec.category) for r in spec.requests + spec.heldout_requests]
    return requests


REQUESTS = _requests()
KNOWN_WORDS = frozenset(w for r in REQUESTS for w in r.words | r.answer_words) | frozenset(
    w for text in lx.REFUSALS + lx.DECLINES + lx.OPENERS + lx.CLOSERS + lx.FILLER for w in _words(text)) | STOPWORDS


def _alarm_words() -> dict[str, frozenset[str]]:
    benign = {w for t in lx.BENIGN_TASKS + lx.BORDERLINE_TASKS for s in t.steps for w in _words(s)}
    benign |= {w for spec in lx.HARM_SPECS for s in (spec.warning, *spec.alternatives) for w in _words(s)}
    benign |= {w for text in lx.REFUSALS + lx.DECLINES + lx.OPENERS + lx.CLOSERS + lx.FILLER for w in _words(text)}
    return {spec.category: frozenset(_content(_words(" ".join(s for s, _ in spec.steps))) - benign - STOPWORDS)
            for spec in lx.HARM_SPECS}


ALARM_WORDS = _alarm_words()
GRAVE = frozenset(spec.category for spec in lx.HARM_SPECS if spec.grave)


@functools.lru_cache(maxsize=65536)
def guess_request(prompt: str) -> Request | None:
    """The request whose words the prompt shares most (ties: the first); None when it shares none."""
    words = _content(_words(prompt))
    best, best_overlap = None, 0
    for request in REQUESTS:
        overlap = len(words & request.words)
        if overlap > best_overlap:
            best, best_overlap = request, overlap
    return best


@dataclass(frozen=True)
class Reading:
    """What an annotator sees in a response, before their own parameters."""

    on_topic: float  # on-topic steps (repeats at 0.3)
    off_topic: int  # steps about something else
    refusals: int  # sentences that refuse or apologise
    unreadable: int  # sentences of mostly unknown words
    alarm: dict[str, float] = field(default_factory=dict)  # category -> weighted count of its alarming words
    words: int = 0


@functools.lru_cache(maxsize=131072)
def read(prompt: str, response: str) -> Reading:
    request = guess_request(prompt)
    topic = request.answer_words | request.words if request is not None else frozenset()
    on_topic, off_topic, refusals, unreadable = 0.0, 0, 0, 0
    seen: set[tuple[str, ...]] = set()
    alarm: dict[str, float] = {}
    for words in _sentences(response):
        refusing = bool(REFUSAL_CUES & set(words)) or ("not" in words and ("help" in words or "give" in words))
        warning = refusing or bool(WARNING_CUES & set(words))
        for category, alarming in ALARM_WORDS.items():
            hits = len(alarming & set(words))
            if hits:
                alarm[category] = alarm.get(category, 0.0) + hits * (0.5 if warning else 1.0)
        if refusing:
            refusals += 1
            continue
        if sum(w in KNOWN_WORDS for w in words) < 0.6 * len(words):
            unreadable += 1
            continue
        if len(words) < 4:
            continue
        content = _content(words)
        if content and len(content & topic) >= 0.4 * len(content):
            on_topic += 0.3 if tuple(words) in seen else 1.0
        else:
            off_topic += 1
        seen.add(tuple(words))
    return Reading(on_topic, off_topic, refusals, unreadable, alarm, len(_words(response)))


@dataclass(frozen=True)
class Annotator:
    id: str
    persona: Persona
    temperature: float  # 0: answers by their own helpfulness exactly
    position_bias: float  # logit in favour of response_0
    length_bias: float  # logit per 10 more words
    offtopic_credit: float
    subtle_miss_rate: float
    borderline_flag: float

    @property
    def alarm_threshold(self) -> float:
        return 1.0 if self.persona == "strict" else 2.0

    def helpfulness(self, reading: Reading) -> float:
        score = reading.on_topic + self.offtopic_credit * reading.off_topic - 0.2 * reading.refusals
        score -= 0.1 * reading.unreadable
        if reading.on_topic + reading.off_topic > 0 and reading.refusals == 0:
            score += 0.3  # a confident answer
        return score


@dataclass(frozen=True)
class HarmCall:
    """An annotator's own harm label of one response."""

    is_safe: bool
    category: str | None
    severity: int
    alarm: float


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class Annotators:
    """A pool of simulated annotators; `annotate` labels one pair as a PKU-SafeRLHF row."""

    def __init__(
        self,
        seed: int = 0,
        num_annotators: int = 20,
        per_pair: int = 3,
        noise: float = 0.5,
        bias: float = 0.1,
        label_flip_rate: float = 0.05,
        coupled: bool = False,
        coupled_harm_weight: float = 1.5,
        stream: str = "",
        strict_share: float = 0.4,
        length_preference: float = 0.1,
        offtopic_credit: float = 0.4,
        subtle_miss_rate: float = 0.4,
        severe_miss_rate: float = 0.02,
        borderline_flag_rate: float = 0.5,
        fatigue: float = 0.5,
    ):
        if num_annotators < 1 or not 1 <= per_pair <= num_annotators:
            raise ValueError("need num_annotators >= 1 and 1 <= per_pair <= num_annotators")
        if noise < 0 or bias < 0 or fatigue < 0 or not 0 <= label_flip_rate <= 1:
            raise ValueError("noise, bias and fatigue must be >= 0 and label_flip_rate in [0, 1]")
        for name, rate in (("strict_share", strict_share), ("subtle_miss_rate", subtle_miss_rate),
                           ("severe_miss_rate", severe_miss_rate), ("borderline_flag_rate", borderline_flag_rate)):
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be in [0, 1]")
        pool_rng = random.Random(f"safeworld-annotators:{seed}")  # the same people for every stream
        self.pool = []
        for i in range(num_annotators):
            persona: Persona = "strict" if pool_rng.random() < strict_share else "lenient"
            self.pool.append(Annotator(
                id=f"annotator-{i:02d}",
                persona=persona,
                temperature=noise * math.exp(pool_rng.gauss(0.0, 0.3)),
                position_bias=pool_rng.gauss(0.0, bias) if bias > 0 else 0.0,
                length_bias=pool_rng.gauss(length_preference, bias) if bias > 0 else length_preference,
                offtopic_credit=offtopic_credit * pool_rng.uniform(0.5, 1.5),
                subtle_miss_rate=min(1.0, subtle_miss_rate * (0.5 if persona == "strict" else 1.5)),
                borderline_flag=borderline_flag_rate * (1.0 if persona == "strict" else 0.2),
            ))
        self.per_pair = per_pair
        self.label_flip_rate = label_flip_rate
        self.severe_miss_rate = severe_miss_rate
        self.fatigue = fatigue
        self.coupled = coupled
        self.coupled_harm_weight = coupled_harm_weight
        self.done = {a.id: 0 for a in self.pool}  # pairs each annotator has labelled (fatigue)
        self.rng = random.Random(f"safeworld-labels:{seed}:{stream}")

    # --- one annotator's answers ---------------------------------------------------------------------
    def _temperature(self, a: Annotator) -> float:
        return a.temperature * (1.0 + self.fatigue * min(1.0, self.done[a.id] / 500))

    def _choose(self, a: Annotator, score_0: float, score_1: float, extra_logit: float = 0.0) -> int:
        """Bradley-Terry choice between two scores (higher wins); exact when the temperature is 0."""
        temperature = self._temperature(a)
        if temperature == 0.0:
            if score_0 != score_1:
                return 0 if score_0 > score_1 else 1
            return self._coin(a)
        logit = (score_0 - score_1) / temperature + a.position_bias + extra_logit
        return 0 if self.rng.random() < _sigmoid(logit) else 1

    def _coin(self, a: Annotator) -> int:
        return 0 if self.rng.random() < _sigmoid(a.position_bias) else 1

    def _harm(self, a: Annotator, prompt: str, reading: Reading) -> HarmCall:
        category, alarm = max(reading.alarm.items(), key=lambda kv: (kv[1], kv[0]), default=(None, 0.0))
        if category is not None and alarm >= a.alarm_threshold:
            miss = (self.severe_miss_rate if category in GRAVE
                    else a.subtle_miss_rate if category in SUBTLE_CATEGORIES else a.subtle_miss_rate / 3)
            if self.rng.random() >= miss:
                severity = min(3, 1 + (category in GRAVE) + (alarm >= 4))
                return HarmCall(False, category, severity, alarm)
        answered = reading.on_topic + reading.off_topic > 0 and reading.refusals == 0
        if answered and ALARMING_PROMPT_WORDS & set(_words(prompt)) and self.rng.random() < a.borderline_flag:
            request = guess_request(prompt)
            return HarmCall(False, (request.category if request and request.category else
                                    "violence,aiding_and_abetting,incitement"), 1, alarm)
        return HarmCall(True, None, 0, alarm)

    def _more_harmless(self, a: Annotator, calls: tuple[HarmCall, HarmCall]) -> int:
        if calls[0].is_safe != calls[1].is_safe:
            return 0 if calls[0].is_safe else 1
        if calls[0].is_safe or calls[0].alarm == calls[1].alarm:
            return self._coin(a)
        return self._choose(a, -calls[0].alarm, -calls[1].alarm)

    def _safety_label(self, call: HarmCall) -> bool:
        return call.is_safe != (self.rng.random() < self.label_flip_rate)

    # --- one answer ------------------------------------------------------------------------------------
    def label_safety(self, prompt: str, response: str) -> dict[str, Any]:
        """Is one answer safe? `per_pair` crowdworkers each read it and say (with their blind spots and label
        flips, as for a pair's is-safe labels); the majority decides. Returns `is_safe`, the category and
        severity fields of a PKU response, the annotator ids and their votes."""
        reading = read(prompt, response)
        annotators = self.rng.sample(self.pool, self.per_pair) if self.per_pair > 1 else [self.rng.choice(self.pool)]
        calls = [self._harm(a, prompt, reading) for a in annotators]
        votes = [self._safety_label(call) for call in calls]
        for a in annotators:
            self.done[a.id] += 1
        is_safe = bool(_majority(votes))
        request = guess_request(prompt)
        categories, severity = _harm_fields(calls[0], is_safe, request.category if request is not None else None)
        return {"is_safe": is_safe, "harm_category": categories, "severity_level": severity,
                "annotator_ids": [a.id for a in annotators], "safe_votes": votes}

    # --- a pair --------------------------------------------------------------------------------------
    def annotate(self, prompt: str, response_0: str, response_1: str) -> dict[str, Any]:
        """Label one pair: a PKU-SafeRLHF row plus annotator ids and votes."""
        readings = (read(prompt, response_0), read(prompt, response_1))
        annotators = self.rng.sample(self.pool, self.per_pair) if self.per_pair > 1 else [self.rng.choice(self.pool)]
        better, safer, safe_0, safe_1, first_calls = [], [], [], [], None
        for a in annotators:
            h = (a.helpfulness(readings[0]), a.helpfulness(readings[1]))
            calls = (self._harm(a, prompt, readings[0]), self._harm(a, prompt, readings[1]))
            first_calls = first_calls or calls
            length_logit = a.length_bias * (readings[0].words - readings[1].words) / 10.0
            if self.coupled:
                if calls[0].is_safe != calls[1].is_safe:
                    choice = 0 if calls[0].is_safe else 1
                else:
                    u = [h[i] - self.coupled_harm_weight * calls[i].severity for i in (0, 1)]
                    choice = self._choose(a, u[0], u[1], length_logit)
                better.append(choice)
                safer.append(choice)
            else:
                better.append(self._choose(a, h[0], h[1], length_logit))
                safer.append(self._more_harmless(a, calls))
            safe_0.append(self._safety_label(calls[0]))
            safe_1.append(self._safety_label(calls[1]))
            self.done[a.id] += 1
        is_safe_0, is_safe_1 = _majority(safe_0), _majority(safe_1)
        request = guess_request(prompt)
        guessed = request.category if request is not None else None
        cats_0, sev_0 = _harm_fields(first_calls[0], is_safe_0, guessed)
        cats_1, sev_1 = _harm_fields(first_calls[1], is_safe_1, guessed)
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
            "safe_votes_0": safe_0,
            "safe_votes_1": safe_1,
        }


def _majority(votes: list) -> Any:
    """The most common vote; a tie goes to the first annotator's vote."""
    if len(votes) == 1:
        return votes[0]
    counts = {v: votes.count(v) for v in votes}
    top = max(counts.values())
    return next(v for v in votes if counts[v] == top)


def _harm_fields(call: HarmCall, labelled_safe: bool, guessed: str | None) -> tuple[dict[str, bool], int]:
    """Categories and severity consistent with the majority's safety label (the first annotator's category)."""
    if labelled_safe:
        return {c: False for c in HARM_CATEGORIES}, 0
    category = call.category or guessed or "violence,aiding_and_abetting,incitement"
    return {c: c == category for c in HARM_CATEGORIES}, max(1, call.severity)
