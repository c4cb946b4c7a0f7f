"""Best-of-n and safe best-of-n: choose one of n sampled answers with the value models, at inference, no training.

For a prompt x, draw n answers y_1 .. y_n ~ π(·|x) (the policy's sampling distribution), score each with the reward
model (r_k) and the cost model (c_k), and keep one:

    reward      k* = argmax_k r_k                                   best-of-n (Stiennon et al. 2020, Nakano et al. 2021)
    safe        k* = argmax_{k: c_k ≤ d} r_k     when some c_k ≤ d  Safe RLHF's constraint, answer by answer
                k* = argmin_k c_k                otherwise          flagged: no feasible candidate
    lagrangian  k* = argmax_k (r_k − λ·c_k)                         Safe RLHF's Lagrangian at a fixed λ

Safe RLHF's convention: cost > 0 means unsafe, so the default d = 0 keeps the answers the cost model calls safe. Ties
go to the lowest index, so the choice is a function of the n scores in draw order. Each mode takes the top of one
total order on the candidates, written (`selection_keys`) as a pair (tier, value) compared lexicographically:
reward (0, r); lagrangian (0, r − λ·c); safe (1, r) when c ≤ d, else (0, −c).

KL to the policy. When no two outcomes tie in that order, best-of-n draws y with probability
    π_n(y) = F(y)^n − F⁻(y)^n,        F(y) = π(Y ⪯ y),   F⁻(y) = π(Y ≺ y)
and KL(π_n ‖ π) ≤ log n − (n − 1)/n (`best_of_n_kl_bound`; Beirami et al. 2024, "Theoretical guarantees on the
best-of-n alignment policy", arXiv 2401.01879). The often-quoted expression is only an upper bound: near it when
every outcome has a small probability, loose when the mass gathers on few outcomes, and 0 against log n − (n − 1)/n
when all n draws are one answer (the same refusal), since then π_n = π.

`best_of_n_kl_estimate` is a plug-in estimate, NOT the tighter estimator Beirami et al. propose (their §4): no stored
copy of the paper's text was at hand to check that estimator's formula against, so it is not implemented here. The
plug-in replaces π by the distribution of the candidates' distinct texts, each weighted by its policy probability and
normalised,
    q_j = π(y_j|x) / Σ_{distinct i} π(y_i|x),
and computes the KL of best-of-n under q exactly. Texts that tie in the order form one class C; best-of-n picks a
class, then (as the lowest index among i.i.d. draws does) a member in proportion to q, so π_n/q is constant on a class
and the KL over texts is the KL over classes: with Q(C) = Σ_{j∈C} q_j and F⁻(C) the q-mass of the classes below C,
    P_n(C) = (F⁻(C) + Q(C))^n − F⁻(C)^n,        KL̂ = Σ_C P_n(C) · log(P_n(C) / Q(C)).
It is 0 when the draws are one text (or all tie), never above the bound (the bound holds for any q), and exact when the
distinct candidates are the policy's whole support. When the policy spreads its mass over many texts and the n draws
are all distinct, q sees at most n of them and the estimate is low (n = 2 distinct, equally likely draws give
0.75·log 3 − log 2 = 0.131, where a policy that never repeats an answer has a KL near log 2 − 1/2 = 0.193): read it
as how far best-of-n moved from what the policy said about these candidates, not as the policy-wide KL.

Shapes: P rows (one per prompt and answer slot), n candidates each, in draw order.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

SelectionMode = Literal["reward", "safe", "lagrangian"]
SELECTION_MODES = ("reward", "safe", "lagrangian")


def selection_keys(rewards: torch.Tensor, costs: torch.Tensor | None, mode: SelectionMode, threshold: float = 0.0,
                   lagrange: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The order each mode selects by, as (tier, value), both (P, n): candidate i ranks above j when
    tier_i > tier_j, or tier_i = tier_j and value_i > value_j.

        reward      (0, r)
        lagrangian  (0, r − λ·c)
        safe        (1, r) if c ≤ d else (0, −c)

    rewards, costs: (P, n); costs may be None in `reward` mode only.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
    if costs is None and mode != "reward":
        raise ValueError(f"mode {mode!r} needs the candidates' costs")
    if mode == "reward":
        return torch.zeros_like(rewards, dtype=torch.long), rewards  # size = (P, n) each
    if mode == "lagrangian":
        return torch.zeros_like(rewards, dtype=torch.long), rewards - lagrange * costs
    feasible = costs <= threshold  # size = (P, n)
    return feasible.long(), torch.where(feasible, rewards, -costs)


def _pairwise_order(tier: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """above[p, i, j]: candidate i ranks strictly above j; tied[p, i, j]: the same key. (P, n, n) each."""
    tier_i, tier_j = tier[:, :, None], tier[:, None, :]  # size = (P, n, 1), (P, 1, n)
    value_i, value_j = value[:, :, None], value[:, None, :]
    above = (tier_i > tier_j) | ((tier_i == tier_j) & (value_i > value_j))  # size = (P, n, n)
    tied = (tier_i == tier_j) & (value_i == value_j)  # size = (P, n, n)
    return above, tied


def select_best_of_n(rewards: torch.Tensor, costs: torch.Tensor | None = None, mode: SelectionMode = "safe",
                     threshold: float = 0.0, lagrange: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen candidate of each row, and whether the row had no feasible candidate. -> (P,) long, (P,) bool.

        reward      k* = argmax_k r_k
        safe        k* = argmax_{k: c_k ≤ d} r_k   if some c_k ≤ d,   else argmin_k c_k
        lagrangian  k* = argmax_k (r_k − λ·c_k)
    ties to the lowest index (d = `threshold`, λ = `lagrange`). no_feasible = no c_k ≤ d in the row (every mode
    reports it when costs are given; all False without costs).
    rewards, costs: (P, n).
    """
    tier, value = selection_keys(rewards, costs, mode, threshold, lagrange)
    above, _ = _pairwise_order(tier, value)
    unbeaten = ~above.any(dim=1)  # size = (P, n): no candidate j ranks above candidate i
    chosen = unbeaten.long().argmax(dim=-1)  # size = (P,): the first of the best (argmax returns the first maximum)
    if costs is None:
        return chosen, torch.zeros_like(chosen, dtype=torch.bool)
    return chosen, ~(costs <= threshold).any(dim=-1)


def best_of_n_kl_bound(n: int) -> float:
    """log n − (n − 1)/n: an upper bound on KL(π_n ‖ π) (Beirami et al. 2024), not its value. 0 at n = 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_kl_estimate(log_probs: torch.Tensor, text_ids: torch.Tensor, rewards: torch.Tensor,
                          costs: torch.Tensor | None = None, mode: SelectionMode = "safe", threshold: float = 0.0,
                          lagrange: float = 1.0) -> torch.Tensor:
    """The plug-in estimate of KL(π_n ‖ π) per row (module docstring; not Beirami et al.'s estimator). -> (P,).

        q_j = π(y_j) / Σ_{distinct i} π(y_i),   Q(C) = Σ_{j∈C} q_j,   F⁻(C) = q-mass ranked below class C
        P_n(C) = (F⁻(C) + Q(C))^n − F⁻(C)^n,     KL̂ = Σ_C P_n(C) · log(P_n(C) / Q(C))

    n = the number of columns; classes = candidates tied in the selection order of `mode` (`selection_keys`).
    log_probs: (P, n) log π(y_k|x) under the sampling distribution; text_ids: (P, n), equal where two candidates are
    the same text (a text's first draw gives its log-prob, repeats add no mass); rewards, costs: (P, n).
    """
    n = log_probs.size(-1)
    tier, value = selection_keys(rewards, costs, mode, threshold, lagrange)
    above, tied = _pairwise_order(tier, value)  # size = (P, n, n) each
    same_text = text_ids[:, :, None] == text_ids[:, None, :]  # size = (P, n, n)
    earlier = torch.ones(n, n, dtype=torch.bool, device=log_probs.device).tril(diagonal=-1)  # [i, j]: j < i
    first = ~(same_text & earlier).any(dim=-1)  # size = (P, n): the first draw of its text
    q = torch.where(first, log_probs.double(), -math.inf).softmax(dim=-1)  # size = (P, n), 0 on repeats
    below = (above.double() * q[:, None, :]).sum(dim=-1)  # size = (P, n): F⁻ of candidate i's class
    mass = (tied.double() * q[:, None, :]).sum(dim=-1)  # size = (P, n): Q of candidate i's class
    p_n = (below + mass) ** n - below ** n  # size = (P, n): P_n of candidate i's class
    share = torch.where(first & (mass > 0), q / mass, 0.0)  # size = (P, n): each distinct text's part of its class
    log_ratio = torch.where(p_n > 0, p_n.log() - mass.log(), 0.0)  # size = (P, n)
    return (share * p_n * log_ratio).sum(dim=-1).to(log_probs.dtype)  # size = (P,)
