"""Generate SafeWorld (a simulation): prompt splits, an SFT corpus, and annotated preference pairs.

`run(cfg)` writes, atomically, into `cfg.out`:
    prompts/{train,dev,test,redteam,redteam_test}.jsonl
                                         {prompt, kind, category, domain, request, target, template, prefix}
    sft/train.jsonl                      {prompt, response, kind, move}
    preferences/{train,dev,test}.jsonl   PKU-SafeRLHF rows + prompt_kind, prompt_category, sources, annotators
    world.json                           seed, config, sizes, counts, split overlaps, annotators vs gold
                                         (and a line saying it is a simulation)
Everything is determined by the seed and the sizes: the same config gives byte-identical files.

Splits share no prompt string. Train prompts (and so the SFT corpus, the train pairs and the RL prompts) and the
red-team pool use the training phrasings, targets and frames; dev, test and the red-team test split use held-out
ones, dev and test different held-out targets (see "Prompts" below). Dev and test pairs use their own prompts.

The SFT corpus is calibrated so that a model imitating it answers about half of the harmful prompts
harmfully (the paper's Alpaca-7B: about 53%), benign prompts helpfully (90%), and over-refuses a few
borderline prompts (about 12%). Preference pairs draw both responses from a broad mix of moves and
amounts of content, so that a reward model learns relevance and amount, and a cost model learns harm.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from safealign.config import ConfigError, config_field
from safealign.data.safeworld import lexicon as lx
from safealign.data.safeworld.annotators import GRAVE, SUBTLE_CATEGORIES, Annotators
from safealign.data.safeworld.judges import UNITS, classify_response, judge_harm, judge_helpfulness, normalise
from safealign.data.safeworld.responses import sample_response
from safealign.io import atomic_write_json, atomic_write_jsonl

SIMULATION_NOTICE = (
    "SafeWorld is a simulation: generated requests and responses in a small fixed vocabulary, judged by "
    "hidden gold judges and labelled by simulated annotators. It is not human data; harmful content is "
    "abstract placeholder text, never real instructions."
)

# Prompt kinds of the SFT corpus and of the preference pairs.
SFT_KIND_MIX: dict[str, float] = {"benign": 0.5, "harmful": 0.35, "borderline": 0.15}
PAIR_KIND_MIX: dict[str, float] = {"harmful": 0.5, "benign": 0.35, "borderline": 0.15}

# (move, steps, weight) per prompt kind for preference pairs: a broad mix of moves and amounts.
PAIR_MOVES: dict[str, tuple[tuple[str, int | None, float], ...]] = {
    "harmful": (
        ("compliance", 3, 0.18), ("compliance", 2, 0.12), ("compliance", 1, 0.08),
        ("redirection", 2, 0.14), ("redirection", 1, 0.08), ("refusal", None, 0.22),
        ("repetitive", None, 0.04), ("offtopic", None, 0.07), ("filler", None, 0.07),
    ),
    "benign": (
        ("helpful", 4, 0.14), ("helpful", 3, 0.14), ("partial", 2, 0.12), ("partial", 1, 0.10),
        ("repetitive", None, 0.08), ("offtopic", None, 0.10), ("refusal", None, 0.14),
        ("filler", None, 0.08), ("redirection", None, 0.04), ("compliance", None, 0.06),
    ),
    "borderline": (
        ("helpful", 4, 0.12), ("helpful", 3, 0.12), ("partial", 2, 0.10), ("partial", 1, 0.08),
        ("repetitive", None, 0.05), ("offtopic", None, 0.05), ("refusal", None, 0.22),
        ("redirection", None, 0.10), ("filler", None, 0.06), ("compliance", None, 0.10),
    ),
}
_PAIR_CUM_WEIGHTS = {kind: tuple(itertools.accumulate(w for _, _, w in table)) for kind, table in PAIR_MOVES.items()}


@dataclass
class WorldConfig:
    """Sizes, seed and annotator settings of a generated SafeWorld."""

    out: str = config_field("runs/world", help="Directory to write the world into.")
    seed: int = config_field(0, help="World seed: chooses prompt splits, responses and annotators (the lexicon is fixed).")
    sft_examples: int = config_field(8000, help="SFT corpus size (prompt, response) on train prompts.")
    train_pairs: int = config_field(6000, help="Annotated preference pairs on train prompts.")
    test_pairs: int = config_field(1000, help="Annotated preference pairs on test prompts.")
    dev_pairs: int = config_field(500, help="Annotated preference pairs on dev prompts (for choosing defaults).")
    test_harmful: int = config_field(280, help="Harmful test prompts, balanced over the held-out test requests (10 per category by default).")
    test_benign: int = config_field(144, help="Benign test prompts (held-out frames, balanced over the everyday tasks).")
    test_borderline: int = config_field(78, help="Borderline test prompts (harmful-looking, benign: over-refusal).")
    test_targets: int = config_field(5, help="Held-out targets per harm category given to test (the rest to dev); test requests = these x the held-out phrasings.")
    dev_harmful: int = config_field(448, help="Harmful dev prompts, balanced over the held-out dev requests (8 per request: a dev screen separates arms about a point apart).")
    dev_benign: int = config_field(288, help="Benign dev prompts (held-out frames, no prompt shared with test).")
    dev_borderline: int = config_field(156, help="Borderline dev prompts (held-out frames, no prompt shared with test).")
    redteam_prompts: int = config_field(280, help="Red-team pool (the rounds may train on it): training requests in jailbreak framings.")
    redteam_test_prompts: int = config_field(140, help="Red-team test prompts: held-out test requests in held-out jailbreak framings.")
    num_annotators: int = config_field(20, help="Size of the simulated annotator pool.")
    annotators_per_pair: int = config_field(3, help="Annotators per pair (majority vote; every vote recorded with its annotator id).")
    annotator_noise: float = config_field(0.5, help="Bradley-Terry temperature scale of the annotators' helpfulness answers (0: by their own reading exactly).")
    annotator_bias: float = config_field(0.1, help="Spread of the annotators' position and length biases (logits).")
    length_preference: float = config_field(0.1, help="Mean length bias: logit in favour of the longer response per 10 more words.")
    strict_share: float = config_field(0.4, help="Share of strict annotators (unsafe at one alarming word; lenient: two).")
    offtopic_credit: float = config_field(0.4, help="Mean credit an annotator gives a step that is off the request's topic (on topic: 1).")
    subtle_miss_rate: float = config_field(0.4, help="Mean rate at which harm in subtle categories (privacy, misinformation, non-violent unethical) is missed.")
    severe_miss_rate: float = config_field(0.02, help="Rate at which harm in grave categories is missed.")
    borderline_flag_rate: float = config_field(0.5, help="Rate at which a strict annotator calls an answer to an alarming-worded prompt unsafe (lenient: a fifth).")
    fatigue: float = config_field(0.5, help="Growth of an annotator's helpfulness temperature over their first 500 pairs (x 1 + fatigue).")
    label_flip_rate: float = config_field(0.05, help="Probability that an annotator's is-safe label slips (flips).")
    coupled: bool = config_field(False, help="One 'better overall' question for both preferences (single-preference ablation).")
    sft_compliance_rate: float = config_field(0.5, help="Share of harmful SFT prompts answered with compliance (rest: refusal/redirection).")
    sft_over_refusal_rate: float = config_field(0.12, help="Share of borderline SFT prompts answered with a refusal.")


@dataclass
class World:
    """A generated world in memory: prompt splits, SFT corpus, preference pairs."""

    config: WorldConfig
    prompts: dict[str, list[dict[str, Any]]]  # split -> rows {prompt, kind, category, domain}
    sft: list[dict[str, Any]]
    preferences: dict[str, list[dict[str, Any]]]  # split -> PKU rows


# --- Prompts ----------------------------------------------------------------------------------------
# A prompt is a request (a benign or borderline task, or a harmful phrasing with its target filled in) said
# through a frame (an optional prefix and a template). Training files (SFT, preference and RL prompts, the red-team
# pool) use the lexicon's training phrasings, targets and frames; dev, test and the red-team test split use the
# held-out ones (`heldout_requests`, `heldout_targets`, `HELDOUT_TEMPLATES`, ...), so that a test prompt shares no
# harmful phrasing, target, template or prefix with anything a model trains on. Benign and borderline tasks have
# fixed steps, so their tasks are shared (only their frames are held out): world.json reports that overlap.
Frames = tuple[tuple[str, ...], tuple[str, ...]]  # (templates, prefixes)
TRAIN_FRAMES: Frames = (lx.PROMPT_TEMPLATES, lx.PROMPT_PREFIXES)
HELDOUT_FRAMES: Frames = (lx.HELDOUT_TEMPLATES, ("",) + lx.HELDOUT_PREFIXES)
REDTEAM_FRAMES: Frames = (lx.REDTEAM_TEMPLATES, ("",))
HELDOUT_REDTEAM_FRAMES: Frames = (lx.HELDOUT_REDTEAM_TEMPLATES, ("",))
SPLITS = ("train", "dev", "test", "redteam", "redteam_test")
TRAINING_SPLITS = ("train", "redteam")  # the prompt splits that training files draw from


def _render(template: str, phrase: str, prefix: str = "") -> str:
    text = template.format(p=phrase)
    return f"{prefix} {text}" if prefix else text


def harmful_requests(spec: lx.HarmSpec, heldout: bool) -> list[tuple[str, str, str]]:
    """(request id, phrase, target) of a category's training requests (training phrasings x targets) or held-out
    ones (held-out phrasings x held-out targets). The id is "category#phrasing@target", phrasings numbered across
    both sets, as the judges' `PromptInfo.task` numbers them."""
    phrasings = list(enumerate(spec.requests + spec.heldout_requests))
    phrasings = phrasings[len(spec.requests):] if heldout else phrasings[:len(spec.requests)]
    targets = spec.heldout_targets if heldout else spec.targets
    return [(f"{spec.category}#{r}@{target}", request.format(target=target), target)
            for r, request in phrasings for target in targets]


def prompt_instances(kind: str, frames: Frames = TRAIN_FRAMES, heldout: bool = False,
                     requests: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every prompt of a kind the lexicon can say through `frames`, grouped by request id; harmful requests from
    the training or held-out phrasings and targets (`heldout`), optionally only those in `requests`."""
    templates, prefixes = frames
    said: list[tuple[str, str, str | None, str | None, str | None]] = []  # (request id, phrase, category, domain, target)
    if kind in ("benign", "borderline"):
        said = [(task.id, task.phrase, None, task.domain, None)
                for task in (lx.BENIGN_TASKS if kind == "benign" else lx.BORDERLINE_TASKS)]
    elif kind == "harmful":
        said = [(rid, phrase, spec.category, None, target)
                for spec in lx.HARM_SPECS for rid, phrase, target in harmful_requests(spec, heldout)]
    else:
        raise ValueError(f"unknown prompt kind {kind!r}")
    return {
        request: [{"prompt": _render(t, phrase, p), "kind": kind, "category": category, "domain": domain,
                   "request": request, "target": target, "template": t, "prefix": p}
                  for t in templates for p in prefixes]
        for request, phrase, category, domain, target in said if requests is None or request in requests
    }


def _take_balanced(groups: dict[str, list[dict]], quota: int, rng: random.Random, what: str) -> tuple[list, list]:
    """Take `quota` rows round-robin over shuffled groups; return (taken, the rest)."""
    total = sum(len(rows) for rows in groups.values())
    if not 0 <= quota <= total:
        raise ConfigError(f"{what}: asked for {quota} prompts, the world has {total}")
    pools = {key: rng.sample(rows, len(rows)) for key, rows in groups.items()}
    order = rng.sample(sorted(pools), len(pools))
    taken: list[dict] = []
    while len(taken) < quota:
        for key in order:
            if pools[key] and len(taken) < quota:
                taken.append(pools[key].pop())
    rest = [row for key in sorted(pools) for row in pools[key]]
    return taken, rest


def heldout_request_split(cfg: WorldConfig, rng: random.Random) -> tuple[set[str], set[str]]:
    """The held-out harmful requests of the test and dev splits: per category, `test_targets` of its held-out
    targets go to test (with every held-out phrasing), the rest to dev, so that dev and test share no request
    and no target."""
    test: set[str] = set()
    dev: set[str] = set()
    for spec in lx.HARM_SPECS:
        if not 1 <= cfg.test_targets < len(spec.heldout_targets):
            raise ConfigError(f"test_targets must be in [1, {len(spec.heldout_targets) - 1}] ({spec.category} has "
                              f"{len(spec.heldout_targets)} held-out targets), got {cfg.test_targets}")
        test_targets = set(rng.sample(spec.heldout_targets, cfg.test_targets))
        for rid, _, target in harmful_requests(spec, heldout=True):
            (test if target in test_targets else dev).add(rid)
    return test, dev


def split_prompts(cfg: WorldConfig) -> dict[str, list[dict[str, Any]]]:
    """The prompt splits (`SPLITS`): train and the red-team pool from training phrasings and frames; dev, test and
    the red-team test split from held-out ones; no prompt string in two splits."""
    rng = random.Random(f"safeworld:{cfg.seed}:splits")
    test_requests, dev_requests = heldout_request_split(cfg, rng)
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for kind in ("harmful", "benign", "borderline"):
        splits["train"] += [row for rows in prompt_instances(kind).values() for row in rows]
        if kind == "harmful":
            test, _ = _take_balanced(prompt_instances(kind, HELDOUT_FRAMES, True, test_requests), cfg.test_harmful,
                                     rng, "test_harmful")
            dev, _ = _take_balanced(prompt_instances(kind, HELDOUT_FRAMES, True, dev_requests), cfg.dev_harmful,
                                    rng, "dev_harmful")
        else:  # the same tasks, held-out frames: dev and test are disjoint prompt strings
            test, rest = _take_balanced(prompt_instances(kind, HELDOUT_FRAMES), getattr(cfg, f"test_{kind}"),
                                        rng, f"test_{kind}")
            by_task: dict[str, list[dict]] = {}
            for row in rest:
                by_task.setdefault(row["request"], []).append(row)
            dev, _ = _take_balanced(by_task, getattr(cfg, f"dev_{kind}"), rng, f"dev_{kind}")
        splits["test"] += test
        splits["dev"] += dev
    rng.shuffle(splits["train"])
    splits["redteam"], _ = _take_balanced(prompt_instances("harmful", REDTEAM_FRAMES), cfg.redteam_prompts, rng,
                                          "redteam_prompts")
    splits["redteam_test"], _ = _take_balanced(
        prompt_instances("harmful", HELDOUT_REDTEAM_FRAMES, True, test_requests), cfg.redteam_test_prompts, rng,
        "redteam_test_prompts")
    seen: set[str] = set()
    for rows in splits.values():
        texts = {row["prompt"] for row in rows}
        assert len(texts) == len(rows) and not texts & seen, "prompt splits must be disjoint"
        seen |= texts
    return splits


OVERLAP_FIELDS = ("request", "target", "task", "template", "prefix")


def _field_values(rows: list[dict], name: str) -> set[str]:
    if name == "task":  # benign/borderline: the task; harmful: category and phrasing (what the steps answer)
        return {r["request"].split("@")[0] for r in rows}
    if name == "request":  # harmful requests (a benign or borderline request is its task)
        return {r["request"] for r in rows if r["kind"] == "harmful"}
    return {r[name] for r in rows if r.get(name)}  # (the empty prefix is no phrasing)


def split_overlap(prompts: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, int]]]:
    """For every pair of prompt splits, how many harmful requests, targets, tasks (and harmful phrasings), templates
    and prefixes of the second also occur in the first (`overlap[a][b][field]`); test against the training splits is 0 by design, except
    benign and borderline tasks (`task`), whose steps are fixed."""
    names = [s for s in SPLITS if prompts.get(s)]
    return {a: {b: {f: len(_field_values(prompts[a], f) & _field_values(prompts[b], f)) for f in OVERLAP_FIELDS}
                for b in names if b != a} for a in names}


def harmful_interval_half_width(requests: int, answers_per_request: float, rate: float = 0.05,
                                z: float = 1.959964) -> dict[str, float]:
    """The half-width of a 95% interval around `rate` from a split's harmful requests, clustered by request: from
    every answer independent (design effect 1) to a request's answers all alike (one answer per request)."""
    def half(n: float) -> float:
        return round(z * (rate * (1 - rate) / n) ** 0.5, 4)
    return {"requests": requests, "independent_answers": half(requests * answers_per_request),
            "answers_of_a_request_alike": half(requests)}


# --- SFT corpus and pairs ---------------------------------------------------------------------------
def _by_kind(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["kind"], []).append(row)
    return out


def _pick(mix: dict[str, float], rng: random.Random) -> str:
    return rng.choices(tuple(mix), cum_weights=tuple(itertools.accumulate(mix.values())))[0]


def sft_move(kind: str, rng: random.Random, cfg: WorldConfig) -> tuple[str, int | None]:
    """The (move, steps) of one SFT example: the calibration of the SFT policy."""
    if kind == "harmful":
        comply = cfg.sft_compliance_rate
        move = _pick({"compliance": comply, "refusal": (1 - comply) / 2, "redirection": (1 - comply) / 2}, rng)
        if move == "compliance":
            return move, rng.choices((3, 2, 1), weights=(0.5, 0.3, 0.2))[0]
        return move, (rng.choices((2, 1), weights=(0.6, 0.4))[0] if move == "redirection" else None)
    if kind == "benign":
        move = _pick({"helpful": 0.9, "refusal": 0.05, "filler": 0.05}, rng)
        return move, (rng.choices((4, 3, 2), weights=(0.35, 0.4, 0.25))[0] if move == "helpful" else None)
    refuse = cfg.sft_over_refusal_rate
    move = _pick({"helpful": 1 - refuse - 0.03, "refusal": refuse, "redirection": 0.03}, rng)
    return move, (rng.choices((4, 3, 2), weights=(0.35, 0.4, 0.25))[0] if move == "helpful" else None)


def generate_sft(cfg: WorldConfig, train_prompts: list[dict]) -> list[dict[str, Any]]:
    rng = random.Random(f"safeworld:{cfg.seed}:sft")
    by_kind = _by_kind(train_prompts)
    mix = {kind: weight for kind, weight in SFT_KIND_MIX.items() if by_kind.get(kind)}
    rows = []
    for _ in range(cfg.sft_examples):
        kind = _pick(mix, rng)
        prompt = rng.choice(by_kind[kind])["prompt"]
        move, steps = sft_move(kind, rng, cfg)
        rows.append({"prompt": prompt, "response": sample_response(prompt, move, rng, steps), "kind": kind, "move": move})
    return rows


def sample_pair_move(kind: str, rng: random.Random) -> tuple[str, int | None]:
    """One (move, steps) from the broad preference-pair mix of a prompt kind."""
    table = PAIR_MOVES[kind]
    move, steps, _ = rng.choices(table, cum_weights=_PAIR_CUM_WEIGHTS[kind])[0]
    return move, steps


def world_annotators(cfg: WorldConfig, stream: str) -> Annotators:
    """The world's simulated crowdworkers (same pool, noise, bias, flip rate and mode for every stream) on
    their own label stream: the train and test pairs use streams "train" and "test", each later round of
    the pipeline its own ("round2", ...), so that every set of annotations is reproducible on its own."""
    return Annotators(
        cfg.seed, num_annotators=cfg.num_annotators, per_pair=cfg.annotators_per_pair, noise=cfg.annotator_noise,
        bias=cfg.annotator_bias, label_flip_rate=cfg.label_flip_rate, coupled=cfg.coupled, stream=stream,
        strict_share=cfg.strict_share, length_preference=cfg.length_preference, offtopic_credit=cfg.offtopic_credit,
        subtle_miss_rate=cfg.subtle_miss_rate, severe_miss_rate=cfg.severe_miss_rate,
        borderline_flag_rate=cfg.borderline_flag_rate, fatigue=cfg.fatigue,
    )


def generate_pairs(cfg: WorldConfig, prompts: list[dict], count: int, split: str) -> list[dict[str, Any]]:
    rng = random.Random(f"safeworld:{cfg.seed}:pairs:{split}")
    annotators = world_annotators(cfg, stream=split)
    by_kind = _by_kind(prompts)
    mix = {kind: weight for kind, weight in PAIR_KIND_MIX.items() if by_kind.get(kind)}
    if count and not mix:
        raise ConfigError(f"{split} pairs: the {split} split has no prompts")
    rows = []
    for _ in range(count):
        kind = _pick(mix, rng)
        row = rng.choice(by_kind[kind])
        prompt = row["prompt"]
        move_0, steps_0 = sample_pair_move(kind, rng)
        response_0 = sample_response(prompt, move_0, rng, steps_0)
        for _attempt in range(20):  # two different texts
            move_1, steps_1 = sample_pair_move(kind, rng)
            response_1 = sample_response(prompt, move_1, rng, steps_1)
            if response_1 != response_0:
                break
        labels = annotators.annotate(prompt, response_0, response_1)
        rows.append({
            **{k: labels[k] for k in ("prompt", "response_0", "response_1")},
            "prompt_kind": kind,
            "prompt_category": row["category"] or row["domain"],
            "response_0_source": f"safeworld:{move_0}",
            "response_1_source": f"safeworld:{move_1}",
            **{k: v for k, v in labels.items() if k not in ("prompt", "response_0", "response_1")},
        })
    return rows


def generate_world(cfg: WorldConfig) -> World:
    """Generate a world in memory (deterministic in `cfg`)."""
    for name in ("sft_examples", "train_pairs", "test_pairs", "dev_pairs"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0")
    if not 1 <= cfg.annotators_per_pair <= cfg.num_annotators:
        raise ConfigError("need 1 <= annotators_per_pair <= num_annotators")
    if cfg.annotator_noise < 0 or cfg.annotator_bias < 0 or cfg.fatigue < 0:
        raise ConfigError("annotator_noise, annotator_bias and fatigue must be >= 0")
    for name in ("label_flip_rate", "strict_share", "subtle_miss_rate", "severe_miss_rate", "borderline_flag_rate"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"{name} must be in [0, 1]")
    if not 0 <= cfg.sft_compliance_rate <= 1 or not 0 <= cfg.sft_over_refusal_rate <= 0.97:
        raise ConfigError("sft_compliance_rate must be in [0, 1] and sft_over_refusal_rate in [0, 0.97]")
    prompts = split_prompts(cfg)
    sft = generate_sft(cfg, prompts["train"])
    preferences = {
        "train": generate_pairs(cfg, prompts["train"], cfg.train_pairs, "train"),
        "test": generate_pairs(cfg, prompts["test"], cfg.test_pairs, "test"),
        "dev": generate_pairs(cfg, prompts["dev"], cfg.dev_pairs, "dev"),
    }
    return World(cfg, prompts, sft, preferences)


def world_texts(world: World) -> Iterator[str]:
    """Every prompt and response of the world, then every lexicon sentence (for tokenizer training)."""
    for rows in world.prompts.values():
        for row in rows:
            yield row["prompt"]
    for row in world.sft:
        yield row["response"]
    for rows in world.preferences.values():
        for row in rows:
            yield row["response_0"]
            yield row["response_1"]
    for unit in UNITS:  # every sentence the world can say
        yield unit.text


# --- Statistics and files ---------------------------------------------------------------------------
def _is_contradictory(row: dict) -> bool:
    safer = row["safer_response_id"]
    return not row[f"is_response_{safer}_safe"] and row[f"is_response_{1 - safer}_safe"]


def annotator_agreement(rows: list[dict]) -> dict[str, Any]:
    """How often the annotators' labels (the majority) agree with the gold judges, per question and per category.

    better: on pairs whose gold helpfulness differs, the annotators chose the gold-more-helpful response;
    safer: on pairs where gold calls exactly one response safe, they chose it; is_safe: each response's label.
    by_category: is_safe agreement on responses gold calls unsafe, by the gold harm category (recall).
    borderline_over_flagging: gold-safe, gold-helpful answers to borderline prompts labelled unsafe.
    missed_subtle_harm / missed_grave_harm: gold-unsafe responses of subtle / grave categories labelled safe.
    """
    better = safer = safe_agree = 0
    better_n = safer_n = safe_n = 0
    by_category: dict[str, list[int]] = {}
    over_flag = [0, 0]
    missed = {"subtle": [0, 0], "grave": [0, 0]}
    for row in rows:
        prompt = row["prompt"]
        gold = [judge_harm(prompt, row[f"response_{i}"]) for i in (0, 1)]
        helpfulness = [judge_helpfulness(prompt, row[f"response_{i}"]) for i in (0, 1)]
        if helpfulness[0] != helpfulness[1]:
            better_n += 1
            better += row["better_response_id"] == (0 if helpfulness[0] > helpfulness[1] else 1)
        if gold[0].is_safe != gold[1].is_safe:
            safer_n += 1
            safer += row["safer_response_id"] == (0 if gold[0].is_safe else 1)
        for i in (0, 1):
            labelled_safe = row[f"is_response_{i}_safe"]
            safe_n += 1
            safe_agree += labelled_safe == gold[i].is_safe
            if not gold[i].is_safe:
                for category in (c for c, hit in gold[i].categories.items() if hit):
                    counts = by_category.setdefault(category, [0, 0])
                    counts[0] += not labelled_safe
                    counts[1] += 1
                    group = "subtle" if category in SUBTLE_CATEGORIES else "grave" if category in GRAVE else None
                    if group:
                        missed[group][0] += labelled_safe
                        missed[group][1] += 1
            elif row.get("prompt_kind") == "borderline" and \
                    classify_response(prompt, row[f"response_{i}"]) == "helpful":
                over_flag[0] += not labelled_safe
                over_flag[1] += 1

    def ratio(k: int, n: int) -> float | None:
        return round(k / n, 4) if n else None

    return {
        "better": ratio(better, better_n), "safer": ratio(safer, safer_n), "is_safe": ratio(safe_agree, safe_n),
        "unsafe_recall_by_category": {c: ratio(k, n) for c, (k, n) in sorted(by_category.items())},
        "borderline_over_flagging": ratio(*over_flag),
        "missed_subtle_harm": ratio(*missed["subtle"]),
        "missed_grave_harm": ratio(*missed["grave"]),
    }


def world_stats(world: World) -> dict[str, Any]:
    """Counts and gold-judged rates of a world (what world.json and `run` report)."""
    words = {w for text in set(world_texts(world)) for sentence in normalise(text) for w in sentence}
    sft_judged: dict[str, Counter] = {}
    for row in world.sft:
        sft_judged.setdefault(row["kind"], Counter())[classify_response(row["prompt"], row["response"])] += 1
    sft_moves: dict[str, Counter] = {}
    for row in world.sft:
        sft_moves.setdefault(row["kind"], Counter())[row["move"]] += 1

    def rate(kind: str, cls: str) -> float:
        counts = sft_judged.get(kind, Counter())
        return round(counts[cls] / max(1, sum(counts.values())), 4)

    pairs = {}
    for split, rows in world.preferences.items():
        pairs_agreement = annotator_agreement(rows)
        unsafe = sum(not judge_harm(r["prompt"], r[f"response_{i}"]).is_safe for r in rows for i in (0, 1))
        pairs[split] = {
            "pairs": len(rows),
            "contradictory": sum(_is_contradictory(r) for r in rows),
            "unsafe_responses_gold": unsafe,
            "kinds": dict(sorted(Counter(r["prompt_kind"] for r in rows).items())),
            "annotators_vs_gold": pairs_agreement,
        }
    test_harmful = [r for r in world.prompts["test"] if r["kind"] == "harmful"]
    test_requests = len({r["request"] for r in test_harmful})
    return {
        "distinct_words": len(words),
        # Shared requests, targets, tasks, templates and prefixes of every pair of prompt splits (0 between test and
        # the training splits by design, but for the benign and borderline tasks, whose steps are fixed).
        "split_overlap": split_overlap(world.prompts),
        # How precisely the test split measures a harmful rate near 5% with four answers per prompt.
        "test_harmful_interval_half_width": harmful_interval_half_width(
            test_requests, 4 * len(test_harmful) / max(1, test_requests)),
        "prompts": {split: dict(sorted(Counter(r["kind"] for r in rows).items())) for split, rows in world.prompts.items()},
        "sft_moves": {k: dict(sorted(v.items())) for k, v in sorted(sft_moves.items())},
        "sft_judged": {k: dict(sorted(v.items())) for k, v in sorted(sft_judged.items())},
        "sft_harmful_unsafe_rate": rate("harmful", "compliance"),
        "sft_benign_helpful_rate": rate("benign", "helpful"),
        # Over-refused: safe and not helpful (refusal, redirection, filler, cut), as the evaluation counts it.
        "sft_borderline_refusal_rate": round(sum(rate("borderline", c) for c in ("refusal", "redirection", "filler", "cut")), 4),
        "preferences": pairs,
    }


def write_world(world: World, out: str | Path) -> dict[str, Any]:
    """Write a world's files (atomically) and return its statistics."""
    out = Path(out)
    for split, rows in world.prompts.items():
        atomic_write_jsonl(out / "prompts" / f"{split}.jsonl", rows)
    atomic_write_jsonl(out / "sft" / "train.jsonl", world.sft)
    for split, rows in world.preferences.items():
        atomic_write_jsonl(out / "preferences" / f"{split}.jsonl", rows)
    stats = world_stats(world)
    config = {k: v for k, v in dataclasses.asdict(world.config).items() if k != "out"}  # paths differ, content not
    atomic_write_json(out / "world.json", {
        "description": SIMULATION_NOTICE,
        "seed": world.config.seed,
        "config": config,
        "lexicon": {
            "domains": list(lx.DOMAINS),
            "benign_tasks": len(lx.BENIGN_TASKS),
            "borderline_tasks": len(lx.BORDERLINE_TASKS),
            "harm_categories": [spec.category for spec in lx.HARM_SPECS],
        },
        **stats,
    })
    return stats


def run(cfg: WorldConfig) -> dict[str, Any]:
    """Generate the world and write it to `cfg.out`; return a flat summary (counts and rates)."""
    world = generate_world(cfg)
    stats = write_world(world, cfg.out)
    return {
        "out": str(cfg.out),
        "seed": cfg.seed,
        "prompts_train": len(world.prompts["train"]),
        "prompts_test": len(world.prompts["test"]),
        "prompts_dev": len(world.prompts["dev"]),
        "prompts_redteam": len(world.prompts["redteam"]),
        "prompts_redteam_test": len(world.prompts["redteam_test"]),
        "sft_examples": len(world.sft),
        "train_pairs": len(world.preferences["train"]),
        "test_pairs": len(world.preferences["test"]),
        "dev_pairs": len(world.preferences["dev"]),
        "contradictory_train_pairs": stats["preferences"]["train"]["contradictory"],
        "contradictory_test_pairs": stats["preferences"]["test"]["contradictory"],
        "distinct_words": stats["distinct_words"],
        "sft_harmful_unsafe_rate": stats["sft_harmful_unsafe_rate"],
        "sft_benign_helpful_rate": stats["sft_benign_helpful_rate"],
        "sft_borderline_refusal_rate": stats["sft_borderline_refusal_rate"],
    }
