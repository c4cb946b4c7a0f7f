"""Every loss of safealign as a pure function of tensors (the maths of docs/maths.md, section by section).

Trainers call these; tests pin them on hand-computed tensors. Shapes: B batch, L sequence length,
V vocabulary. Masks are 1 on real tokens. log σ is computed stably with `F.logsigmoid`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from safealign.data.formatting import IGNORE_INDEX


# --------------------------------------------------------------------------------------------------
# Supervised fine-tuning
# --------------------------------------------------------------------------------------------------
def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_label_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on labelled (response) tokens.

        L = Σ_{b,t: labels[b,t+1] ≠ ignore} −log p(labels[b,t+1] | x_{≤t}) / N

    N = `num_label_tokens` when given: the number of labelled tokens in the whole optimiser step
    (all micro-batches, all processes), so that gradient accumulation gives exactly the gradient of
    one big batch. Otherwise N is this batch's count.
    logits: (B, L, V); labels: (B, L) with IGNORE_INDEX on prompt and padding positions.
    """
    shift_logits = logits[:, :-1, :]  # size = (B, L-1, V)
    shift_labels = labels[:, 1:]  # size = (B, L-1)
    return label_cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), num_label_tokens)


def label_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                        num_label_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i −log p(targets_i) / N over the rows whose target is not IGNORE_INDEX (N as in `sft_loss`).

    logits: (N_rows, V), already aligned with targets: (N_rows,). `sft_loss` calls it on every shifted
    position; the SFT step calls it directly on the logits of the label positions only (same value).
    """
    token_loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")  # size = ()
    if num_label_tokens is None:
        num_label_tokens = (targets != IGNORE_INDEX).sum()
    return token_loss_sum / torch.as_tensor(num_label_tokens, dtype=token_loss_sum.dtype).clamp(min=1)


# --------------------------------------------------------------------------------------------------
# Score models (docs/maths.md §2)
# --------------------------------------------------------------------------------------------------
def _l2_regulariser(*scores: torch.Tensor) -> torch.Tensor:
    """mean(x²) over all the given scores together: η·mean(r_b², r_w²) in the spec."""
    return torch.cat([s.reshape(-1) for s in scores]).square().mean()


def reward_loss(better_scores: torch.Tensor, worse_scores: torch.Tensor, l2_coeff: float = 1e-3) -> torch.Tensor:
    """Bradley-Terry loss of the reward model on the helpfulness preference.

        L_R = mean_B[ −log σ(r_b − r_w) ] + η · mean(r_b², r_w²)

    better_scores, worse_scores: (B,) end scores r_b, r_w of the more / less helpful response.
    """
    pairwise = -F.logsigmoid(better_scores - worse_scores).mean()  # size = ()
    return pairwise + l2_coeff * _l2_regulariser(better_scores, worse_scores)


def cost_loss(
    unsafer_scores: torch.Tensor,
    safer_scores: torch.Tensor,
    unsafer_sign: torch.Tensor,
    safer_sign: torch.Tensor,
    l2_coeff: float = 1e-3,
    use_pairwise: bool = True,
) -> torch.Tensor:
    """Cost-model loss: Bradley-Terry on the harmlessness preference plus the safety-sign terms.

        L_C = mean_B[ −log σ(c_u − c_s) − log σ(s(y_u)·c_u) − log σ(s(y_s)·c_s) ] + η · mean(c_u², c_s²)

    Sign convention: cost > 0 means unsafe. s(y) = +1 if response y is labelled unsafe, −1 if safe.
    unsafer_scores c_u, safer_scores c_s: (B,); unsafer_sign s(y_u), safer_sign s(y_s): (B,) in {−1, +1}.
    `use_pairwise=False` drops the first term: the "classifier" cost model of the paper's ablation.
    """
    sign_terms = -F.logsigmoid(unsafer_sign * unsafer_scores) - F.logsigmoid(safer_sign * safer_scores)  # (B,)
    per_pair = sign_terms
    if use_pairwise:
        per_pair = per_pair - F.logsigmoid(unsafer_scores - safer_scores)  # size = (B,)
    return per_pair.mean() + l2_coeff * _l2_regulariser(unsafer_scores, safer_scores)


def soft_reward_loss(scores: torch.Tensor, first_better: torch.Tensor, l2_coeff: float = 1e-3) -> torch.Tensor:
    """Bradley-Terry with a soft label (annotators who disagree: vote shares, Dawid–Skene posteriors, smoothing).

        L_R = mean_B[ −q·log σ(r_0 − r_1) − (1 − q)·log σ(r_1 − r_0) ] + η · mean(r_0², r_1²)

    scores: (B, 2) end scores of response_0, response_1; first_better: (B,) q = P(response_0 is the more helpful).
    q ∈ {0, 1} is `reward_loss` on (better, worse).
    """
    margin = scores[:, 0] - scores[:, 1]  # size = (B,)
    pairwise = -(first_better * F.logsigmoid(margin) + (1 - first_better) * F.logsigmoid(-margin)).mean()  # size = ()
    return pairwise + l2_coeff * _l2_regulariser(scores)


PROBIT_SLOPE = math.sqrt(2 * math.pi)  # DPL's logistic stand-in for the normal CDF: Φ(z) ≈ σ(√(2π)·z)


def mean_variance_reward_loss(means: torch.Tensor, stds: torch.Tensor, first_better: torch.Tensor,
                              l2_coeff: float = 1e-3) -> torch.Tensor:
    """The mean-variance (distributional) reward model of DPL (Siththaranjan et al. 2024): each response's reward is
    N(μ, σ²), so P(response_0 preferred) = Φ(z) ≈ σ(√(2π)·z) with z = (μ_0 − μ_1)/√(σ_0² + σ_1²).

        L = mean_B[ −q·log σ(√(2π)·z) − (1 − q)·log σ(−√(2π)·z) ] + η · mean(μ_0², μ_1²)

    means, stds: (B, 2) of response_0, response_1 (stds > 0: softplus of the model's second output); first_better:
    (B,) q = P(response_0 is the more helpful), hard (0/1) or soft (vote shares). A pair the annotators contest can
    be fitted by a large σ instead of equal means: σ is where disagreement goes. The reference code
    (cassidylaidlaw/hidden-context) has the hard-label case.
    """
    z = (means[:, 0] - means[:, 1]) / torch.sqrt(stds[:, 0] ** 2 + stds[:, 1] ** 2)  # size = (B,)
    pairwise = -(first_better * F.logsigmoid(PROBIT_SLOPE * z)
                 + (1 - first_better) * F.logsigmoid(-PROBIT_SLOPE * z)).mean()  # size = ()
    return pairwise + l2_coeff * _l2_regulariser(means)


def soft_cost_loss(costs: torch.Tensor, first_safer: torch.Tensor, unsafe: torch.Tensor, l2_coeff: float = 1e-3,
                   use_pairwise: bool = True) -> torch.Tensor:
    """The cost model's loss with soft labels.

        L_C = mean_B[ −q·log σ(c_1 − c_0) − (1 − q)·log σ(c_0 − c_1)
                      − Σ_k ( u_k·log σ(c_k) + (1 − u_k)·log σ(−c_k) ) ] + η · mean(c_0², c_1²)

    costs: (B, 2) of response_0, response_1; first_safer: (B,) q = P(response_0 is the more harmless); unsafe: (B, 2)
    u_k = P(response_k is unsafe). Hard labels (q, u ∈ {0, 1}) give `cost_loss`: the pair term is −log σ(c_u − c_s)
    and each sign term −log σ(s(y)·c).
    """
    sign_terms = -(unsafe * F.logsigmoid(costs) + (1 - unsafe) * F.logsigmoid(-costs)).sum(dim=1)  # size = (B,)
    per_pair = sign_terms
    if use_pairwise:
        margin = costs[:, 1] - costs[:, 0]  # size = (B,): > 0 when response_0 costs less
        per_pair = per_pair - (first_safer * F.logsigmoid(margin) + (1 - first_safer) * F.logsigmoid(-margin))
    return per_pair.mean() + l2_coeff * _l2_regulariser(costs)


def safety_sign(is_safe: torch.Tensor) -> torch.Tensor:
    """s(y): +1 for a response labelled unsafe, −1 for one labelled safe. is_safe: (B,) bool."""
    return torch.where(is_safe.bool(), -1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Direct preference optimisation: DPO, its noisy-label forms, IPO, SafeDPO's margin (docs/maths.md §6)
# --------------------------------------------------------------------------------------------------
def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log π(y|x) of each row's response: the sum (or, `average`, the mean) over its label tokens.

    logits: (B, L, V) of the rows prompt + response; labels: (B, L), IGNORE_INDEX off the response. -> (B,).
    Position t's logits predict token t + 1, so the response slice is exactly the labelled tokens.
    """
    targets = labels[:, 1:]  # size = (B, L-1)
    keep = targets != IGNORE_INDEX  # size = (B, L-1)
    token_log_probs = gather_log_probs(logits[:, :-1], targets.clamp(min=0)) * keep  # size = (B, L-1)
    total = token_log_probs.sum(dim=1)  # size = (B,)
    return total / keep.sum(dim=1).clamp(min=1) if average else total


def grouped_log_probs(label_logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, num_groups: int,
                      average: bool = False) -> torch.Tensor:
    """Σ (or, `average`, mean) of log p(target) per group: the log-probs of whole responses from their tokens' logits.

    label_logits: (N, V), the logits that predict targets: (N,); groups: (N,), the response (0 .. num_groups − 1) each
    token belongs to. -> (num_groups,); a group without tokens gets 0.
    """
    token_log_probs = gather_log_probs(label_logits.unsqueeze(0), targets.unsqueeze(0))[0]  # size = (N,)
    total = token_log_probs.new_zeros(num_groups).index_add(0, groups, token_log_probs)  # size = (G,)
    if not average:
        return total
    counts = total.new_zeros(num_groups).index_add(0, groups, torch.ones_like(token_log_probs))  # size = (G,)
    return total / counts.clamp(min=1)


def label_log_probs(label_logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """`sequence_log_probs` from the logits of the label positions only (`models.label_logits`).

    label_logits: (N, V), the positions that predict a label, row-major; labels: (B, L). -> (B,): each row's sum (or,
    `average`, mean) of log p over its label tokens; a row without one gets 0.
    """
    keep = labels[:, 1:] != IGNORE_INDEX  # size = (B, L-1)
    rows = keep.nonzero()[:, 0]  # size = (N,): the row of each label token
    return grouped_log_probs(label_logits, labels[:, 1:][keep], rows, labels.size(0), average)


def dpo_loss(chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid", margins: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair losses of DPO (Rafailov et al. 2023) and its variants. -> (B,).

        h = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]      (chosen_log_ratios − rejected_log_ratios)
        z = β·h − m                                                                 (m: `margins`, SafeDPO's (h̃_l − h̃_w)·Δ; 0 if None)
        sigmoid (DPO; cDPO with ε = label_smoothing): (1 − ε)·(−log σ(z)) + ε·(−log σ(−z))
        robust  (rDPO, Ray Chowdhury et al. 2024):   [(1 − ε)·(−log σ(z)) − ε·(−log σ(−z))] / (1 − 2ε)
        ipo     (Azar et al. 2023, τ = β):           (h − 1/(2β))²   (the caller passes per-token mean log-ratios, as TRL)

    chosen_log_ratios, rejected_log_ratios: (B,); margins: (B,) or None.
    """
    h = chosen_log_ratios - rejected_log_ratios  # size = (B,)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)).square()
    z = beta * h - (margins if margins is not None else 0.0)  # size = (B,)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "robust":
        return (-(1.0 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1.0 - 2.0 * label_smoothing)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}: sigmoid, robust or ipo")


def soft_label_dpo_loss(chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, beta: float,
                        preference_probs: torch.Tensor) -> torch.Tensor:
    """DPO on soft labels (C-DPO's step at a fixed λ, Liu et al. 2024, from the paper's summary). -> (B,).

        L = −p·log σ(β·h) − (1 − p)·log σ(−β·h),   p = P(y_w ≻ y_l) = σ(r_λ(y_w) − r_λ(y_l)),  r_λ = r − λ·c

    h as in `dpo_loss`; preference_probs: (B,) in [0, 1] (p = 1 − ε for every pair is cDPO).
    """
    z = beta * (chosen_log_ratios - rejected_log_ratios)  # size = (B,)
    return -preference_probs * F.logsigmoid(z) - (1.0 - preference_probs) * F.logsigmoid(-z)


def modpo_loss(chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, chosen_margins: torch.Tensor,
               rejected_margins: torch.Tensor, beta: float, weight: float) -> torch.Tensor:
    """MODPO with one margin objective (Zhou et al. 2023; reference code ZHZisZZ/modpo, `MODPOTrainer.modpo_loss`). -> (B,).

        R(y) = (β·[log π_θ(y) − log π_ref(y)] − (1 − w)·m(y)) / w
        L    = −log σ(R(y_w) − R(y_l))

    The policy is trained on one preference (here helpfulness, weight w = `weight`) while the other objective, whose
    reward m(y) is already known (higher = better: the safety reward −cost, or a DPO model's implicit reward), enters
    as a margin: the optimum is the policy of the combined reward w·r + (1 − w)·m.
    chosen_log_ratios, rejected_log_ratios, chosen_margins, rejected_margins: (B,).
    """
    chosen = beta * chosen_log_ratios - (1.0 - weight) * chosen_margins  # size = (B,)
    rejected = beta * rejected_log_ratios - (1.0 - weight) * rejected_margins  # size = (B,)
    return -F.logsigmoid((chosen - rejected) / weight)


def bfpo_loss(chosen_log_ratios: torch.Tensor, rejected_log_ratios: torch.Tensor, chosen_safe: torch.Tensor,
              rejected_safe: torch.Tensor, beta: float, b1: float = 3.0, alpha: float = 0.5) -> torch.Tensor:
    """BFPO (Zhang et al. 2024; reference code wx-zhang/bfpo, `BFPOTrainer.bfpo`): IPO's squared loss toward a target
    set by the pair's safety labels. -> (B,).

        h      = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]     (log-probs summed, as the code)
        target = B1·B3·I_safe(y_w) − B3·I_safe(y_l) − α,   B3 = 1 / (B1 − 1)
        L      = (h − target / β)²

    y_w is the helpfulness-preferred response; I_safe = 1 for a safe response (BFPO's convention, the opposite of
    SafeDPO's h). With B1 = 3, α = 0.5 the target is +0.5 (both safe), +1 (only y_w safe), −1 (only y_l safe: the
    pair is reversed), −0.5 (both unsafe). chosen_safe, rejected_safe: (B,) of 0/1.
    """
    b3 = 1.0 / (b1 - 1.0)
    target = b1 * b3 * chosen_safe - b3 * rejected_safe - alpha  # size = (B,)
    return (chosen_log_ratios - rejected_log_ratios - target / beta).square()


# --------------------------------------------------------------------------------------------------
# Reinforcement learning: PPO, PPO-Lagrangian, reward shaping (docs/maths.md §3–§5)
# Shapes: B rollout rows, T response tokens. `mask` is the response mask: 1 on response tokens up to
# and including EOS, 0 on the padding after it. Tensors returned for the loop are detached where the
# spec says so (signals, advantages, returns); the two PPO losses keep their graph.
# --------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_mean(x, m) = mean_B[ Σ_t x·m / Σ_t m ]: a per-sequence token mean, then a batch mean.

    x, mask: (B, T) -> (). A row without any real token counts as 0 (it cannot occur in a rollout:
    every response has at least one token).
    """
    mask = mask.to(x.dtype)
    per_sequence = (x * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # size = (B,)
    return per_sequence.mean()


def gather_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[b, t] | ·) from the logits that predict them: (B, T, V), (B, T) -> (B, T), float32."""
    log_probs = logits.float().log_softmax(dim=-1)  # size = (B, T, V)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # size = (B, T)


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) on the sampled tokens (docs/maths.md §3). (B, T), (B, T) -> (B, T).

        k1:  KL_t = log π_t − log π_ref_t                       (the reference's; unbiased, can be < 0)
        k3:  KL_t = (r_t − 1) − log r_t,  r_t = π_ref_t / π_t   (unbiased, always ≥ 0, lower variance)
    """
    log_ratio = log_probs - ref_log_probs  # size = (B, T): log π − log π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r − 1) − log r with log r = −log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def end_of_response_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last response token (EOS when generated) of each row: (B, T) -> (B,)."""
    positions = torch.arange(mask.size(-1), device=mask.device)  # size = (T,)
    return (positions * mask.long()).amax(dim=-1)  # size = (B,)


def token_signal(end_scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_weight: float,
                 clip_score: float) -> torch.Tensor:
    """The per-token signal of one stream (docs/maths.md §3): a KL term on every token plus the end score on the last.

        s_t = clip( kl_weight·KL_t + 1[t = last response token]·S , −clip_score, +clip_score ) · mask_t

    Reward stream: kl_weight = −β, S = R  (r_t = −β·KL_t + R at the end).
    Cost stream:   kl_weight = +β, S = C  (c_t = +β·KL_t + C at the end).
    end_scores (B,), kl (B, T), mask (B, T) -> (B, T), detached; 0 after EOS.
    """
    end_index = end_of_response_index(mask)  # size = (B,)
    signal = kl_weight * kl.detach().float()  # size = (B, T)
    signal = signal.scatter_add(-1, end_index.unsqueeze(-1), end_scores.detach().float().unsqueeze(-1))  # size = (B, T)
    signal = signal.clamp(min=-clip_score, max=clip_score)  # size = (B, T)
    return signal * mask.to(signal.dtype)


def reward_signal(end_rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coeff: float,
                  clip_score: float = 50.0) -> torch.Tensor:
    """r_t = clip(−β·KL_t (+ R at the last response token), ±clip_score). See `token_signal`. -> (B, T)."""
    return token_signal(end_rewards, kl, mask, -kl_coeff, clip_score)


def cost_signal(end_costs: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coeff: float,
                clip_score: float = 50.0) -> torch.Tensor:
    """c_t = clip(+β·KL_t (+ C at the last response token), ±clip_score). See `token_signal`. -> (B, T).

    With A = (A^R − λ·A^C)/(1 + λ) the KL term weighs (β + λβ)/(1 + λ) = β for every λ. (The reference
    puts β/2 in each stream, an effective β/2; safealign follows the paper's formula.)
    """
    return token_signal(end_costs, kl, mask, kl_coeff, clip_score)


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   gae_lambda: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (docs/maths.md §4), one stream at a time.

        δ_t = r_t + γ·V_{t+1} − V_t ;   A_t = δ_t + γ·λ_GAE·A_{t+1} ;   returns_t = A_t + V_t

    Positions after EOS (mask 0) carry zero reward and zero value, and V_T = A_T = 0 (bootstrap 0), so a
    row ends at its own EOS. rewards, values, mask: (B, T) -> (advantages, returns), each (B, T), detached.
    """
    mask = mask.to(torch.float32)
    rewards = rewards.detach().float() * mask  # size = (B, T)
    values = values.detach().float() * mask  # size = (B, T)
    num_tokens = rewards.size(-1)
    advantages_reversed = []
    next_advantage = torch.zeros_like(rewards[:, 0])  # size = (B,)
    next_value = torch.zeros_like(values[:, 0])  # size = (B,)
    for t in reversed(range(num_tokens)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # size = (B,)
        next_advantage = delta + gamma * gae_lambda * next_advantage  # size = (B,)
        next_value = values[:, t]
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)  # size = (B, T)
    returns = advantages + values  # size = (B, T)
    return advantages * mask, returns * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean)/std over the real tokens of the batch (advantage whitening; off by default, as in the reference)."""
    m = mask.to(x.dtype)
    count = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / count
    var = (((x - mean) * m) ** 2).sum() / count
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def combined_advantage(reward_advantages: torch.Tensor, cost_advantages: torch.Tensor,
                       lagrange_multiplier: float | torch.Tensor, reward_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Safe RLHF's actor advantage (docs/maths.md §5): A_t = (A^R_t − λ·A^C_t) / (1 + λ). (B, T), (B, T) -> (B, T).

    Elementwise, any shape: GRPO-Lag combines its per-answer advantages (B,) with it, safe P3O its end scores (B,).
    The context-aware constraints (docs/maths.md §10) give each row its own λ (its prompt category's, (B, 1) or (B,))
    and a reward weight w = 1 + μ on the prompts under the over-refusal guard:
        A = (w·A^R − λ·A^C) / (w + λ)          (w = 1: Safe RLHF's, bit for bit)
    """
    if isinstance(reward_weight, float) and reward_weight == 1.0:
        return (reward_advantages - lagrange_multiplier * cost_advantages) / (1.0 + lagrange_multiplier)
    return (reward_weight * reward_advantages - lagrange_multiplier * cost_advantages) / (reward_weight + lagrange_multiplier)


# --------------------------------------------------------------------------------------------------
# Critic-free RL: advantages from a group of samples of the same prompt (docs/maths.md §8), P3O's pairwise loss (§9)
# --------------------------------------------------------------------------------------------------
def group_advantages(scores: torch.Tensor, group_size: int, estimator: str = "grpo", scale: bool = True,
                     eps: float = 1e-8) -> torch.Tensor:
    """Each sample's advantage against the other samples of its prompt. scores (B,), rows in groups of `group_size`
    consecutive samples of one prompt -> (B,).

        grpo:  A_i = (s_i − mean_g s) / (std_g s + eps)      (Shao et al. 2024; std unbiased, as TRL's GRPOTrainer;
               `scale` False: A_i = s_i − mean_g s, Dr. GRPO's unscaled form)
        rloo:  A_i = s_i − (Σ_{j≠i} s_j) / (k − 1) = k/(k − 1) · (s_i − mean_g s)     (Ahmadian et al. 2024)

    A group whose scores do not vary gets exactly 0: it says nothing about which sample is better (without the
    explicit zero, rounding in the mean would be divided by eps). Each stream (reward, cost) is normalised on its
    own before they are combined (Constrained GRPO, arXiv 2602.05863: scalarise advantages, not rewards).
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"group_advantages: {scores.numel()} scores do not split into groups of {group_size} (>= 2)")
    groups = scores.double().view(-1, group_size)  # size = (G, k)
    centred = groups - groups.mean(dim=1, keepdim=True)  # size = (G, k)
    if estimator == "rloo":
        advantages = centred * (group_size / (group_size - 1))
    elif estimator == "grpo":
        advantages = centred / (groups.std(dim=1, keepdim=True) + eps) if scale else centred
    else:
        raise ValueError(f"unknown group advantage {estimator!r}: use 'grpo' or 'rloo'")
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)  # size = (G, 1)
    return advantages.masked_fill(constant, 0.0).view(-1).to(scores.dtype)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The KL to the reference as a loss term (GRPO), k3 on the sampled tokens with gradient through log π:

        L_KL = masked_mean( exp(log π_ref − log π) − (log π_ref − log π) − 1 )

    log_probs (B, T) with grad; ref_log_probs, mask (B, T) -> (). ≥ 0, and 0 exactly where π = π_ref.
    """
    return masked_mean(kl_estimate(log_probs, ref_log_probs.detach(), "k3"), mask)


def p3o_loss(log_ratios: torch.Tensor, old_log_ratios: torch.Tensor, score_diffs: torch.Tensor, kl_coeff: float,
             clip_range: float = 0.2, clip_range_ratio: float = 10.0,
             num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Trajectory-level P3O (Wu et al. 2023, arXiv 2310.00212, docs/maths.md §9): the clipped pairwise policy gradient
    on the two answers y_0, y_1 of each prompt, as the author's code (thwu1/trlx, `AccelerateP3OTrainer.p3o_loss`,
    clip_tokenwise=False). Per pair, with ℓ_i = Σ_t [log π_θ(y_i,t) − log π_ref(y_i,t)] and ℓ_i^old the same under
    π_old (the policy that sampled the pair):

        q       = (s_0 − s_1) − β·(ℓ_0^old − ℓ_1^old)                   (KL-regularised score difference; detached)
        w       = clamp( exp((ℓ_0 − ℓ_0^old) + (ℓ_1 − ℓ_1^old)), 1/c, c )  (the pair's joint importance weight; detached)
        Δ       = ℓ_0 − ℓ_1,   Δ^old = ℓ_0^old − ℓ_1^old
        L1      = −q·w·Δ,      L1_clip = −q·w·clamp(Δ, Δ^old − ε, Δ^old + ε)
        L       = Σ_pairs max(L1, L1_clip) / N

    ε = `clip_range` bounds the change of the pair's log-likelihood gap (a trust region on Δ, not PPO's ratio clip);
    c = `clip_range_ratio` > 1. N = `num_tokens` (the response tokens of both answers of every pair here: the author's
    default avg_tokenwise), or 2·pairs when None (the author's mean(max(L1, L1_clip))/2). The gradient is the pairwise
    policy gradient (s_0 − s_1)·∇(log π(y_0) − log π(y_1)): invariant to any shift of both scores of a prompt.
    The author's q uses the current ℓ (detached), equal to ℓ^old on the first pass over a rollout; here q is fixed at
    sampling time, as a reward is.

    log_ratios (P, 2) with grad; old_log_ratios (P, 2); score_diffs (P,) = s_0 − s_1 -> ().
    """
    old = old_log_ratios.detach()  # size = (P, 2)
    old_gap = old[:, 0] - old[:, 1]  # size = (P,): Δ^old
    q = score_diffs.detach() - kl_coeff * old_gap  # size = (P,)
    weight = torch.exp((log_ratios.detach() - old).sum(-1)).clamp(1.0 / clip_range_ratio, clip_range_ratio)  # size = (P,)
    gap = log_ratios[:, 0] - log_ratios[:, 1]  # size = (P,): Δ, with grad
    unclipped = -q * weight * gap  # size = (P,)
    clipped = -q * weight * torch.clamp(gap, old_gap - clip_range, old_gap + clip_range)  # size = (P,)
    total = torch.maximum(unclipped, clipped).sum()  # size = ()
    normaliser = 2 * gap.numel() if num_tokens is None else num_tokens
    return total / torch.as_tensor(normaliser, dtype=total.dtype, device=total.device).clamp(min=1)


def ppo_actor_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, clip_range: float = 0.2) -> torch.Tensor:
    """Clipped surrogate (docs/maths.md §5): ρ_t = exp(log π_new − log π_old),

        L_actor = −masked_mean( min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) )

    log_probs (B, T) with grad; old_log_probs, advantages, mask (B, T) -> ().
    """
    ratio = torch.exp(log_probs - old_log_probs.detach())  # size = (B, T)
    unclipped = ratio * advantages.detach()  # size = (B, T)
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages.detach()  # size = (B, T)
    return -masked_mean(torch.minimum(unclipped, clipped), mask)


def ppo_critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                    clip_range_value: float = 5.0) -> torch.Tensor:
    """Clipped value loss (docs/maths.md §5), for each critic:

        V_clip = clamp(V_new, V_old − c_v, V_old + c_v);  L_V = ½·masked_mean( max((V_new − G)², (V_clip − G)²) )

    values (B, T) with grad; old_values, returns, mask (B, T) -> ().
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.maximum(torch.minimum(values, old_values + clip_range_value), old_values - clip_range_value)  # (B, T)
    squared = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)  # size = (B, T)
    return 0.5 * masked_mean(squared, mask)


def lagrange_multiplier_update(log_lambda: float, episode_cost: float, threshold: float, lambda_lr: float,
                               lambda_max: float | None = None) -> float:
    """One step of gradient ascent on the dual, in log space (docs/maths.md §5); returns the new log λ.

        log_λ ← log_λ + α · λ · (J_C − d)        then   log_λ ← min(log_λ, log λ_max)

    (α·λ·(J_C − d) is the SGD step on −λ·(J_C − d) with respect to log λ, as in the reference.) λ rises
    while the mean episode cost J_C exceeds the threshold d and falls below it; λ = exp(log_λ) > 0 always.
    `lambda_max` None or ≤ 0: no upper bound.
    """
    lagrange_multiplier = math.exp(log_lambda)
    log_lambda = log_lambda + lambda_lr * lagrange_multiplier * (episode_cost - threshold)
    if lambda_max is not None and lambda_max > 0:
        log_lambda = min(log_lambda, math.log(lambda_max))
    return log_lambda


def lagrange_multipliers_update(log_multipliers: torch.Tensor, episode_costs: torch.Tensor, thresholds: torch.Tensor,
                                lambda_lr: float, lambda_max: float | None = None,
                                observed: torch.Tensor | None = None) -> torch.Tensor:
    """`lagrange_multiplier_update` for a vector of constraints (one λ_k per prompt category, the over-refusal guard's
    μ): log λ_k ← min(log λ_k + α·λ_k·(J_k − d_k), log λ_max) for each k. (K,), (K,), (K,) -> (K,).

    `observed` (K,) bool: a constraint with no observation yet (its window is empty, J_k undefined) keeps its λ_k."""
    updated = log_multipliers + lambda_lr * log_multipliers.exp() * (episode_costs - thresholds)  # size = (K,)
    if lambda_max is not None and lambda_max > 0:
        updated = updated.clamp(max=math.log(lambda_max))
    return updated if observed is None else torch.where(observed, updated, log_multipliers)


def approx_kl(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Approximate KL(π_old ‖ π_new) of the update (CleanRL's diagnostic): masked_mean((ρ − 1) − log ρ). -> ()."""
    log_ratio = (log_probs - old_log_probs).detach()  # size = (B, T)
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def clip_fraction(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor,
                  clip_range: float = 0.2) -> torch.Tensor:
    """Fraction of tokens whose ratio left [1−ε, 1+ε] (the clip was active): masked_mean(|ρ − 1| > ε). -> ()."""
    ratio = torch.exp((log_probs - old_log_probs).detach())  # size = (B, T)
    return masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[G − V] / Var[G] over the real tokens of the batch (1: perfect critic; ≤ 0: useless). -> ().

    NaN when the returns have no variance.
    """
    keep = mask.bool()
    values, returns = values.detach().float()[keep], returns.detach().float()[keep]  # size = (N,)
    var_returns = returns.var(unbiased=False)
    if var_returns.item() == 0.0:
        return torch.tensor(float("nan"))
    return 1.0 - (returns - values).var(unbiased=False) / var_returns
