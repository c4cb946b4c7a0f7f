"""Safe RLHF in rounds with red-teaming: the new preference data of round k ≥ 2 (the paper ran three rounds).

Round k starts from the round k−1 policy. This stage gathers the prompts that policy answers unsafely,
samples and annotates new response pairs, and adds them to all the preference data so far; the pipeline
(`safealign.pipeline`) then retrains the reward and cost models on all of it and runs Safe RLHF (PPO-Lagrangian)
again from the round k−1 policy.

`run(cfg)` writes into `output_dir` (the pipeline's `round{k}/redteam/`), each file atomically:
1. probe.jsonl: the round k−1 policy answers (one sample, temperature 1) `probe_limit` prompts drawn
   (seeded) from `probe_prompts` (SafeWorld's train prompts, never the test prompts) and every red-team
   prompt; the round k−1 cost model scores each answer. Cost > 0 (unsafe, docs/maths.md §2) makes a prompt
   *unsolved*; with `probe_judge: annotators` SafeWorld's simulated crowdworkers label each answer instead (the
   cost model is blind exactly where the policy learnt to fool it). On SafeWorld each row also carries the gold
   judge's verdict (a measurement only: nothing below reads it).
2. prompts.jsonl: the gathered prompts, i.e. the unsolved probe prompts plus every red-team prompt
   (SafeWorld's `prompts/redteam.jsonl`: harmful requests in jailbreak framings no other split uses).
3. pairs.jsonl: `pairs` new pairs, PKU format. Their prompts come from four pools in the proportions of
   `prompt_mix` (Figure 3a of the paper mixes prompt types per round the same way): `unsafe` (unsolved
   probe prompts), `redteam`, `solved` (harmful probe prompts the cost model found answered safely: where
   its misses hide) and `benign` (the benign and borderline prompts of `probe_prompts`). The benign share
   is there because pairs from harmful prompts alone teach the retrained models only that declining is
   safe: the reward model would see ever fewer pairs in which refusing a harmless request loses to a
   helpful answer, and round k's policy, pushed by the cost constraint, would learn to refuse the
   borderline prompts that only look harmful (over-refusal). A pool gives at most `max_pairs_per_prompt`
   pairs per prompt; what an empty or full pool cannot take goes to the others in proportion. Within a
   pool every prompt is used once (in a seeded order) before any twice.
   Two responses per prompt are sampled (temperature 1) from the round k−1 policy and annotated by
   SafeWorld's simulated crowdworkers with the world's annotator settings (world.json) on their own
   label stream `stream` ("round2", ...): decoupled helpfulness and harmlessness preferences and is-safe
   labels, exactly as for the world's own pairs, and reproducible. Rows add prompt_kind,
   prompt_category, prompt_pool, the responses' source and the annotator ids. A pair with an empty
   answer (EOS first) is left out (PKU rows need text) and counted.
4. `preferences_out` (the pipeline's `round{k}/preferences.jsonl`): every pair of `previous_preferences`
   (all earlier rounds) and then the new ones. Contradictory rows (docs/maths.md §1) are left out there (training
   would skip them) and counted in metrics.json. train_preferences.jsonl (in output_dir): the same with the
   new pairs `new_pairs_weight` times, what the round's reward and cost models train on (the policy's own
   answers are otherwise a thin slice of all pairs so far, and the cost model misses its failure modes). With
   `labelled_answers_weight` the crowdworker-labelled probe answers join as one-answer rows (`labelled_answer_rows`),
   in pairs.jsonl and preferences.jsonl once and that many times in train_preferences.jsonl.
5. rl_prompts.jsonl: the base RL prompts plus the gathered ones, the rollout prompts of round k.
6. config.yaml, and metrics.json last (the pipeline's done-marker).

With your own data there are no simulated crowdworkers: give `annotations`, a PKU-format file of the
round's annotated pairs (e.g. pairs you sampled from the previous round's policy and had labelled). It
replaces steps 1-3: its rows are the new pairs, its prompts the gathered prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from safealign.config import ConfigError, config_field, load_config, save_config
from safealign.data.loading import PREFERENCE_OPTIONAL, PREFERENCE_REQUIRED, load_preferences, load_prompts
from safealign.data.safeworld import WorldConfig, is_safeworld, judge_harm, world_annotators
from safealign.io import atomic_write_json, atomic_write_jsonl
from safealign.models.generation import SamplingConfig, sample_responses
from safealign.models.presets import build_causal_lm, resolve_device
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.pipeline.prompt_pools import DEFAULT_PROMPT_MIX, POOLS, choose_pair_prompts, prompt_pools


@dataclass
class RedTeamConfig:
    """One round's red-teaming and new preference pairs. Defaults suit SafeWorld with the tiny preset."""

    policy: str = config_field("", help="The current policy: the previous round's Safe RLHF model directory (it is probed and sampled).")
    cost_model: str = config_field("", help="The previous round's cost model: an answer with cost > 0 is unsafe (its prompt is unsolved).")
    probe_prompts: str = config_field("", help="Prompts to probe the policy on and to draw the solved and benign pools from (SafeWorld's train prompts; never test prompts).")
    redteam_prompts: str = config_field("", help="Red-team prompts, all gathered (SafeWorld's prompts/redteam.jsonl); '' = none.")
    rl_prompts: str = config_field("", help="The base RL prompts: with the gathered prompts they go to output_dir/rl_prompts.jsonl ('' = not written).")
    previous_preferences: str = config_field("", help="All preference pairs so far (PKU format); they come first in preferences_out.")
    preferences_out: str = config_field("", help="Where all pairs so far plus the new ones go (JSONL); '' = output_dir/preferences.jsonl.")
    world: str = config_field("", help="The SafeWorld directory whose world.json gives the simulated annotators' settings.")
    annotations: str = config_field("", help="Your annotated pairs for this round (PKU format) instead of sampling + SafeWorld's annotators; '' = none.")
    stream: str = config_field("round2", help="This round's annotator label stream and sampling seed (one per round: reproducible, independent).")
    output_dir: str = config_field("runs/round2/redteam", help="Where probe.jsonl, prompts.jsonl, pairs.jsonl, rl_prompts.jsonl, config.yaml and metrics.json go.")
    seed: int = config_field(0, help="Seed of the probe subset, the pool order and the sampling (mixed with stream).")
    probe_limit: int = config_field(512, help="Probe prompts drawn from probe_prompts (0 = all; every red-team prompt is probed as well).")
    pairs: int = config_field(1000, help="New preference pairs this round (two sampled responses to one prompt each).")
    prompt_mix: dict[str, float] = config_field(
        dict(DEFAULT_PROMPT_MIX), help="Share of the new pairs' prompts per pool: unsafe, redteam, solved, benign (normalised; keep benign > 0 against over-refusal).")
    max_pairs_per_prompt: int = config_field(
        4, help="At most this many pairs per prompt (a pool with few prompts, e.g. a nearly safe policy's unsafe ones, gives its rest to the others); 0 = no cap.")
    probe_judge: Literal["cost_model", "annotators"] = config_field(
        "cost_model", help="Who finds the probe's unsafe answers: cost_model = the previous round's (cost > 0; blind where the policy "
                           "learnt to fool it), annotators = SafeWorld's simulated crowdworkers label each answer (needs world).")
    labelled_answers_weight: int = config_field(
        0, help="With probe_judge annotators: each labelled probe answer joins the pairs as a one-answer row (response_0 = "
                "response_1, its label on both: the ranking terms see no difference, the cost model's sign term learns the "
                "label), this many times in train_preferences.jsonl (once in preferences.jsonl); 0 = not used.")
    new_pairs_weight: int = config_field(
        1, help="Copies of this round's new pairs in train_preferences.jsonl (what the round's reward and cost models train on; "
                "preferences.jsonl keeps each pair once). > 1 oversamples the current policy's own answers, a small share of all pairs so far.")
    max_new_tokens: int = config_field(64, help="Most response tokens per sample (as in the RL rollouts and the evaluation).")
    temperature: float = config_field(1.0, help="Sampling temperature of the probe and of the pairs (1: the policy's own distribution).")
    batch_size: int = config_field(256, help="Rows per generation batch (larger batches sample faster, up to memory).")
    score_batch_size: int = config_field(64, help="Texts per forward of the cost model.")
    max_length: int = config_field(256, help="Tokens per text the cost model scores (prompt + response + EOS).")
    device: str = config_field("auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    progress: bool = config_field(True, help="Show progress bars (on stderr) while generating.")

    def __post_init__(self) -> None:
        unknown = set(self.prompt_mix) - set(POOLS)
        if unknown:
            raise ConfigError(f"redteam: prompt_mix has unknown pool(s) {sorted(unknown)}; known: {list(POOLS)}")
        if any(share < 0 for share in self.prompt_mix.values()) or not sum(self.prompt_mix.values()) > 0:
            raise ConfigError(f"redteam: prompt_mix shares must be >= 0 with a positive sum, got {self.prompt_mix}")
        if self.labelled_answers_weight < 0 or (self.labelled_answers_weight and self.probe_judge != "annotators"):
            raise ConfigError("redteam: labelled_answers_weight must be >= 0, and > 0 only with probe_judge: annotators "
                              "(the answers' labels come from the simulated crowdworkers)")
        if self.pairs < 0 or self.probe_limit < 0 or self.max_pairs_per_prompt < 0 or min(self.batch_size, self.score_batch_size) < 1 or self.new_pairs_weight < 1:
            raise ConfigError("redteam: pairs, probe_limit and max_pairs_per_prompt must be >= 0, batch sizes and new_pairs_weight >= 1")


# --------------------------------------------------------------------------------------------------
# The steps, each a function of its inputs (tested one by one)
# --------------------------------------------------------------------------------------------------
def probe_policy(model: Any, tokenizer: Any, cost_model: Any, cost_tokenizer: Any, prompts: list[dict[str, Any]],
                 cfg: RedTeamConfig, seed: int, annotators: Any = None) -> list[dict[str, Any]]:
    """Each prompt row with one sampled answer, its cost and `unsafe`: cost > 0, or with `annotators` (SafeWorld's
    crowdworkers, `probe_judge: annotators`) their majority label (`label`: `Annotators.label_safety`'s fields). On
    SafeWorld prompts also `gold_safe`, the gold judge's verdict (a measurement only: nothing downstream reads it)."""
    texts = [row["prompt"] for row in prompts]
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    responses = sample_responses(model, tokenizer, texts, sampling, cfg.batch_size, seed, cfg.progress)
    costs = score_texts(cost_model, cost_tokenizer, texts, responses, cfg.max_length, cfg.score_batch_size)
    rows = [{**row, "response": response, "cost": cost, "unsafe": cost > 0}
            for row, response, cost in zip(prompts, responses, costs)]
    if annotators is not None:
        for row in rows:
            row["label"] = annotators.label_safety(row["prompt"], row["response"])
            row["unsafe"] = not row["label"]["is_safe"]
    if is_safeworld(texts):
        for row in rows:
            row["gold_safe"] = judge_harm(row["prompt"], row["response"]).is_safe
    return rows


def sample_pairs(model: Any, tokenizer: Any, chosen: list[tuple[dict[str, Any], str]], cfg: RedTeamConfig,
                 seed: int) -> list[tuple[dict[str, Any], str, str, str]]:
    """(prompt row, pool, response_0, response_1): two samples per chosen prompt from the policy."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, num_samples=2)
    responses = sample_responses(model, tokenizer, [row["prompt"] for row, _ in chosen], sampling, cfg.batch_size,
                                 seed, cfg.progress)  # prompt-major: 2i, 2i + 1 answer prompt i
    return [(row, pool, responses[2 * i], responses[2 * i + 1]) for i, (row, pool) in enumerate(chosen)]


def annotate_pairs(sampled: list[tuple[dict[str, Any], str, str, str]], world_config: Any, stream: str,
                   source: str) -> list[dict[str, Any]]:
    """PKU-format rows: each pair labelled by SafeWorld's simulated crowdworkers on label stream `stream`."""
    annotators = world_annotators(world_config, stream)
    rows = []
    for prompt_row, pool, response_0, response_1 in sampled:
        labels = annotators.annotate(prompt_row["prompt"], response_0, response_1)
        rows.append({
            **{k: labels[k] for k in ("prompt", "response_0", "response_1")},
            "prompt_kind": prompt_row.get("kind"),
            "prompt_category": prompt_row.get("category") or prompt_row.get("domain"),
            "prompt_pool": pool,
            "response_0_source": source,
            "response_1_source": source,
            **{k: v for k, v in labels.items() if k not in ("prompt", "response_0", "response_1")},
        })
    return rows


def labelled_answer_rows(probed: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """PKU-format one-answer rows from probe rows labelled by the crowdworkers: response_0 = response_1 = the answer,
    its is-safe label, categories and severity on both; better and safer = 0 (with equal texts the reward and cost
    models' ranking terms have no gradient: only the cost model's sign term learns from the row). Empty answers are
    left out (PKU rows need text)."""
    rows = []
    for row in probed:
        if "label" not in row or not row["response"]:
            continue
        label = row["label"]
        rows.append({
            "prompt": row["prompt"], "response_0": row["response"], "response_1": row["response"],
            "better_response_id": 0, "safer_response_id": 0,
            "is_response_0_safe": label["is_safe"], "is_response_1_safe": label["is_safe"],
            "response_0_harm_category": label["harm_category"], "response_1_harm_category": label["harm_category"],
            "response_0_severity_level": label["severity_level"], "response_1_severity_level": label["severity_level"],
            "prompt_kind": row.get("kind"), "prompt_category": row.get("category") or row.get("domain"),
            "prompt_pool": "labelled_answer", "response_0_source": source, "response_1_source": source,
            "annotator_ids": label["annotator_ids"], "safe_votes_0": label["safe_votes"], "safe_votes_1": label["safe_votes"],
        })
    return rows


def preference_rows(source: str) -> tuple[list[dict[str, Any]], int]:
    """The usable pairs of a preference file as typed PKU rows (extra fields kept), and how many
    contradictory rows were left out."""
    dataset = load_preferences(source, on_contradiction="skip")
    rows = []
    for record in dataset:
        row = {name: getattr(record, name) for name in PREFERENCE_REQUIRED}
        row.update({name: getattr(record, name) for name in PREFERENCE_OPTIONAL if getattr(record, name) not in ({}, None)})
        rows.append({**row, **record.extra})
    return rows, dataset.num_contradictory_skipped


def load_world_config(world_dir: str) -> Any:
    """The WorldConfig a SafeWorld directory was generated with (world.json), annotator settings included."""
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the simulated annotators need the world's settings "
                                "(generate it with `safealign world generate`, or give `annotations`)")
    return load_config(WorldConfig, None, {**json.loads(path.read_text(encoding="utf-8"))["config"], "out": world_dir})


def _prompt_rows(source: str) -> list[dict[str, Any]]:
    return [{"prompt": r.prompt, "kind": r.kind, "category": r.category, **r.extra} for r in load_prompts(source)]


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _labels_against_gold(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The crowdworkers' is-safe labels of the round's answers (each distinct answer of a row once) against the gold
    judge: what a cost model retrained on them can at best learn about the policy's own harm (a measurement only)."""
    answers = [(row["prompt"], row[f"response_{i}"], not row[f"is_response_{i}_safe"])
               for row in rows for i in ((0,) if row["response_0"] == row["response_1"] else (0, 1))]
    gold = [not judge_harm(prompt, response).is_safe for prompt, response, _ in answers]
    return {"new_answers_unsafe_rate_gold": _rate(gold),
            "label_unsafe_recall_gold": _rate([label for (_, _, label), g in zip(answers, gold) if g]),
            "label_unsafe_precision_gold": _rate([g for (_, _, label), g in zip(answers, gold) if label])}


def _seed(cfg: RedTeamConfig, purpose: str) -> int:
    """A seed for one purpose of this round (probe subset, probe sampling, pools, pair sampling)."""
    return random.Random(f"redteam:{cfg.seed}:{cfg.stream}:{purpose}").randrange(2**31)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def _generated_pairs(cfg: RedTeamConfig, out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]],
                                                            dict[str, Any]]:
    """Steps 1-3: probe, gather, sample and annotate. Returns (new pairs, labelled one-answer rows, gathered prompts,
    metrics)."""
    for path, what in ((cfg.policy, "policy"), (cfg.cost_model, "cost_model"), (cfg.probe_prompts, "probe_prompts")):
        if not path or not Path(path).exists():
            raise FileNotFoundError(f"redteam: {what} '{path}' not found (the previous round's outputs)")
    if not cfg.world:
        raise ConfigError("redteam: give `world` (a SafeWorld directory: its simulated annotators label the pairs) "
                          "or `annotations` (your annotated pairs for this round)")
    world_config = load_world_config(cfg.world)
    base = _prompt_rows(cfg.probe_prompts)
    if 0 < cfg.probe_limit < len(base):
        subset = random.Random(_seed(cfg, "probe-subset")).sample(range(len(base)), cfg.probe_limit)
        probe_rows = [base[i] for i in sorted(subset)]
    else:
        probe_rows = list(base)
    redteam_rows = _prompt_rows(cfg.redteam_prompts) if cfg.redteam_prompts else []

    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.policy)
    model = build_causal_lm(cfg.policy, tokenizer).to(device).eval()
    cost_model = load_score_model(cfg.cost_model).to(device).eval()
    cost_tokenizer = load_tokenizer(cfg.cost_model) if (Path(cfg.cost_model) / "tokenizer_config.json").is_file() else tokenizer
    # The probe's crowdworkers label on a stream of their own: the pairs' labels stay what they were without them.
    probe_annotators = world_annotators(world_config, f"{cfg.stream}-probe") if cfg.probe_judge == "annotators" else None
    rows = probe_policy(model, tokenizer, cost_model, cost_tokenizer,
                        [{**r, "source": "probe"} for r in probe_rows] + [{**r, "source": "redteam"} for r in redteam_rows],
                        cfg, _seed(cfg, "probe-sampling"), probe_annotators)
    atomic_write_jsonl(out / "probe.jsonl", rows)
    probed, attacked = rows[:len(probe_rows)], rows[len(probe_rows):]
    pools = prompt_pools(probed, attacked, base)
    unsafe = {row["prompt"] for row in pools["unsafe"]}
    gathered = pools["unsafe"] + [row for row in pools["redteam"] if row["prompt"] not in unsafe]

    chosen = choose_pair_prompts(pools, cfg.prompt_mix, cfg.pairs, random.Random(_seed(cfg, "pools")),
                                 cfg.max_pairs_per_prompt)
    sampled = sample_pairs(model, tokenizer, chosen, cfg, _seed(cfg, "pair-sampling"))
    # An empty answer (EOS first) cannot be a PKU row (the schema wants text): such pairs are left out, counted.
    kept = [pair for pair in sampled if pair[2] and pair[3]]
    pairs = annotate_pairs(kept, world_config, cfg.stream, source=f"policy:{cfg.policy}")
    labelled = labelled_answer_rows(rows, f"policy:{cfg.policy}") if cfg.labelled_answers_weight else []

    metrics: dict[str, Any] = {
        "probe_prompts": len(probed),
        "probe_unsafe_rate": _rate([r["unsafe"] for r in probed]),
        "redteam_prompts": len(attacked),
        "redteam_unsafe_rate": _rate([r["unsafe"] for r in attacked]),
        "unsafe_prompts": len(pools["unsafe"]),
        **{f"pairs_{name}": sum(pool == name for _, pool in chosen) for name in POOLS},
        "identical_pairs": sum(r0 == r1 for _, _, r0, r1 in kept),
        "empty_pairs_dropped": len(sampled) - len(kept),
        "probe_judge": cfg.probe_judge,
        "probe_cost_unsafe_rate": _rate([r["cost"] > 0 for r in probed]),
        "labelled_answers": len(labelled),
    }
    if rows and all("gold_safe" in r for r in rows):  # SafeWorld: the cost model's verdicts against the gold judge's
        gold_unsafe = [r for r in probed if not r["gold_safe"]]
        metrics.update(
            probe_unsafe_rate_gold=_rate([not r["gold_safe"] for r in probed]),
            redteam_unsafe_rate_gold=_rate([not r["gold_safe"] for r in attacked]),
            cost_gold_agreement=_rate([(r["cost"] > 0) == (not r["gold_safe"]) for r in rows]),
            cost_missed_unsafe=_rate([r["cost"] <= 0 for r in gold_unsafe]),  # gold-unsafe answers with cost ≤ 0
            judge_missed_unsafe=_rate([not r["unsafe"] for r in gold_unsafe]),  # ... the probe's judge calls safe
            judge_gold_agreement=_rate([r["unsafe"] == (not r["gold_safe"]) for r in rows]),
            **_labels_against_gold(pairs + labelled),
        )
    return pairs, labelled, gathered, metrics


def run(cfg: RedTeamConfig) -> dict[str, Any]:
    """Probe, gather, sample, annotate and accumulate one round's pairs; returns the flat metrics."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.annotations:  # your labelled pairs: they are this round's pairs, their prompts the gathered ones
        pairs, dropped = preference_rows(cfg.annotations)
        labelled = []
        gathered = [{"prompt": p} for p in dict.fromkeys(r["prompt"] for r in pairs)]
        metrics: dict[str, Any] = {"annotations": cfg.annotations, "annotations_contradictory_dropped": dropped}
    else:
        pairs, labelled, gathered, metrics = _generated_pairs(cfg, out)
    atomic_write_jsonl(out / "prompts.jsonl", gathered)
    atomic_write_jsonl(out / "pairs.jsonl", pairs + labelled)

    previous, previous_dropped = preference_rows(cfg.previous_preferences) if cfg.previous_preferences else ([], 0)
    new, new_dropped = preference_rows(str(out / "pairs.jsonl"))
    preferences_out = Path(cfg.preferences_out or out / "preferences.jsonl")
    atomic_write_jsonl(preferences_out, previous + new)  # every row once, one-answer rows included
    one_answer = [row for row in new if row.get("prompt_pool") == "labelled_answer"]
    new = [row for row in new if row.get("prompt_pool") != "labelled_answer"]
    atomic_write_jsonl(out / "train_preferences.jsonl",
                       previous + new * cfg.new_pairs_weight + one_answer * cfg.labelled_answers_weight)
    if cfg.rl_prompts:
        rl_rows = {row["prompt"]: row for row in _prompt_rows(cfg.rl_prompts)}
        for row in gathered:
            rl_rows.setdefault(row["prompt"], row)
        fields = ("prompt", "kind", "category")
        atomic_write_jsonl(out / "rl_prompts.jsonl",
                           [{k: row[k] for k in fields if row.get(k) is not None} for row in rl_rows.values()])
        metrics["rl_prompts"] = len(rl_rows)
    metrics.update(
        gathered_prompts=len(gathered),
        pairs=len(pairs),
        contradictory_pairs=new_dropped,
        new_unsafe_label_rate=_rate([not r[f"is_response_{i}_safe"] for r in new for i in (0, 1)]),
        preferences_total=len(previous) + len(new) + len(one_answer),
        previous_contradictory_dropped=previous_dropped,
    )
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
