"""Labels from several annotators who disagree: majority, soft (vote shares), Dawid–Skene.

Votes are read from a preference row's optional fields (SafeWorld writes them for every pair; real data may carry them):
    better_votes    [0 | 1, ...]     each annotator's more helpful response
    safer_votes     [0 | 1, ...]     each annotator's more harmless response
    safe_votes_0    [bool, ...]      each annotator's "response_0 is safe" (safe_votes_1: response_1's)
    annotator_ids   [str, ...]       who voted, in the same order (needed by Dawid–Skene only)
A pair's targets are four probabilities, `PairTargets`: P(response_0 more helpful), P(response_0 more harmless),
P(response_0 unsafe), P(response_1 unsafe). The score models' losses take them as soft labels
(`losses.soft_reward_loss`, `losses.soft_cost_loss`); 0/1 targets give the hard-label losses exactly.
    majority      the row's own labels (better_response_id, ...: the majority vote in SafeWorld)
    soft          the vote shares (a 2-of-3 pair weighs 2/3 : 1/3)
    dawid-skene   the posterior of the true label under Dawid & Skene's model (1979): each annotator has a 2×2
                  confusion matrix, estimated with the class prior by EM over every vote of the file (Laplace
                  smoothing 1); a reliable annotator's vote counts more than a careless one's
A row without votes keeps its hard labels (counted: `rows_without_votes`). `label_smoothing` ε then pulls every target
toward 1/2: q ← (1 − ε)·q + ε/2 (label smoothing of the Bradley-Terry likelihood, as cDPO does for DPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from safealign.data.schema import DataError, PreferenceRecord

LabelMode = Literal["majority", "soft", "dawid-skene"]
LABEL_MODES = ("majority", "soft", "dawid-skene")
VOTE_FIELDS = ("better_votes", "safer_votes", "safe_votes_0", "safe_votes_1")


@dataclass(frozen=True)
class PairTargets:
    better: float  # P(response_0 is the more helpful)
    safer: float  # P(response_0 is the more harmless)
    unsafe: tuple[float, float]  # P(response_k is unsafe), k = 0, 1

    def smoothed(self, epsilon: float) -> "PairTargets":
        pull = lambda q: (1.0 - epsilon) * q + epsilon / 2  # noqa: E731
        return PairTargets(pull(self.better), pull(self.safer), (pull(self.unsafe[0]), pull(self.unsafe[1])))


def hard_targets(record: PreferenceRecord) -> PairTargets:
    return PairTargets(float(record.better_response_id == 0), float(record.safer_response_id == 0),
                       (float(not record.is_response_0_safe), float(not record.is_response_1_safe)))


def record_votes(record: PreferenceRecord, where: str = "") -> dict[str, list[int]] | None:
    """The row's votes as 0/1 lists (safe_votes as "unsafe" = 1), or None when it has none; a DataError when they are
    malformed (not lists of 0/1, or of different lengths)."""
    present = [name for name in VOTE_FIELDS if name in record.extra]
    if not present:
        return None
    votes = {}
    for name in VOTE_FIELDS:
        raw = record.extra.get(name)
        if not isinstance(raw, list) or not raw or any(v not in (0, 1, True, False) for v in raw):
            raise DataError(where or "preference data", f"votes must be a non-empty list of 0/1 (or booleans), got {raw!r}",
                            field=name)
        votes[name] = [int(not v) if name.startswith("safe_votes") else int(v) for v in raw]  # 1 = unsafe
    if len({len(v) for v in votes.values()}) != 1:
        raise DataError(where or "preference data", "better_votes, safer_votes and safe_votes_* differ in length",
                        field="better_votes")
    return votes


def dawid_skene(items: Sequence[Sequence[tuple[str, int]]], iterations: int = 100, smoothing: float = 1.0,
                tolerance: float = 1e-8) -> tuple[list[float], dict[str, list[list[float]]], float]:
    """Dawid–Skene for a binary label by EM.

    items: per item, its (annotator, vote ∈ {0, 1}) pairs. Returns the posterior P(true label = 1) per item, each
    annotator's confusion matrix θ[c][v] = P(votes v | true c), and the prior P(true = 1).
        E-step: P(z_i = c | votes) ∝ π_c · Π_j θ_j[c][v_ij]
        M-step: π_c = mean_i T_ic;  θ_j[c][v] = (Σ_i T_ic [v_ij = v] + α) / (Σ_i T_ic [j voted on i] + 2α)
    Started from the vote shares (the soft labels), so that class 1 keeps its meaning."""
    posterior = [sum(v for _, v in votes) / len(votes) if votes else 0.5 for votes in items]
    annotators = sorted({a for votes in items for a, _ in votes})
    confusion: dict[str, list[list[float]]] = {}
    prior = 0.5
    for _ in range(iterations):
        prior = min(max(sum(posterior) / len(posterior), 1e-6), 1 - 1e-6)
        counts = {a: [[smoothing, smoothing], [smoothing, smoothing]] for a in annotators}
        for t, votes in zip(posterior, items):
            for a, v in votes:
                counts[a][1][v] += t
                counts[a][0][v] += 1.0 - t
        confusion = {a: [[c[k][v] / (c[k][0] + c[k][1]) for v in (0, 1)] for k in (0, 1)] for a, c in counts.items()}
        updated = []
        for votes in items:
            log_one, log_zero = math.log(prior), math.log(1 - prior)
            for a, v in votes:
                log_one += math.log(confusion[a][1][v])
                log_zero += math.log(confusion[a][0][v])
            updated.append(1.0 / (1.0 + math.exp(log_zero - log_one)))
        change = max(abs(a - b) for a, b in zip(updated, posterior)) if items else 0.0
        posterior = updated
        if change < tolerance:
            break
    return posterior, confusion, prior


def label_targets(records: Sequence[PreferenceRecord], mode: LabelMode, label_smoothing: float = 0.0,
                  source: str = "") -> tuple[list[PairTargets], dict[str, Any]]:
    """Every record's targets under `mode` (see the module docstring), and what was done (rows without votes, and for
    Dawid–Skene each annotator's estimated accuracy on each question)."""
    if mode not in LABEL_MODES:
        raise ValueError(f"labels must be one of {list(LABEL_MODES)}, got {mode!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    votes = [record_votes(r, source) if mode != "majority" else None for r in records]
    info: dict[str, Any] = {"labels": mode, "label_smoothing": label_smoothing,
                            "rows_without_votes": sum(v is None for v in votes) if mode != "majority" else 0}
    targets = [hard_targets(r) for r in records]
    voted = [i for i, v in enumerate(votes) if v is not None]
    if mode == "soft":
        for i in voted:
            share = {name: sum(values) / len(values) for name, values in votes[i].items()}
            # better_votes / safer_votes name the chosen response: P(response_0) = share of 0 votes
            targets[i] = PairTargets(1 - share["better_votes"], 1 - share["safer_votes"],
                                     (share["safe_votes_0"], share["safe_votes_1"]))
    elif mode == "dawid-skene" and voted:
        ids = []
        for i in voted:
            annotators = records[i].extra.get("annotator_ids")
            if not isinstance(annotators, list) or len(annotators) != len(votes[i]["better_votes"]):
                raise DataError(source or "preference data", f"Dawid-Skene needs annotator_ids, one per vote (the pair "
                                f"of prompt {records[i].prompt[:60]!r} has {annotators!r})", field="annotator_ids")
            ids.append([str(a) for a in annotators])
        better, better_confusion, _ = dawid_skene([list(zip(a, votes[i]["better_votes"])) for a, i in zip(ids, voted)])
        safer, safer_confusion, _ = dawid_skene([list(zip(a, votes[i]["safer_votes"])) for a, i in zip(ids, voted)])
        unsafe, unsafe_confusion, unsafe_prior = dawid_skene(
            [list(zip(a, votes[i][f"safe_votes_{k}"])) for a, i in zip(ids, voted) for k in (0, 1)])
        for n, i in enumerate(voted):
            targets[i] = PairTargets(1 - better[n], 1 - safer[n], (unsafe[2 * n], unsafe[2 * n + 1]))
        info["annotator_accuracy"] = {
            question: {a: round((m[0][0] + m[1][1]) / 2, 4) for a, m in sorted(confusion.items())}
            for question, confusion in (("better", better_confusion), ("safer", safer_confusion),
                                        ("safe", unsafe_confusion))}
        info["unsafe_prior"] = unsafe_prior
    if label_smoothing:
        targets = [t.smoothed(label_smoothing) for t in targets]
    return targets, info
