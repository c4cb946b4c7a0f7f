"""The RL maths of algorithms/losses.py (docs/maths.md §3–§5) on small hand-computed tensors.

Expected numbers are written from the formulas with plain Python floats and loops, never with the
torch operations under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from safealign.algorithms.losses import (
    approx_kl,
    clip_fraction,
    combined_advantage,
    cost_signal,
    explained_variance,
    gae_advantages,
    gather_log_probs,
    kl_estimate,
    lagrange_multiplier_update,
    masked_mean,
    masked_whiten,
    ppo_actor_loss,
    ppo_critic_loss,
    reward_signal,
)

T = torch.tensor
MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]  # row 0: 3 response tokens (EOS last), row 1: 2


def plain_masked_mean(x: list[list[float]], mask: list[list[int]]) -> float:
    rows = [sum(v * m for v, m in zip(xr, mr)) / sum(mr) for xr, mr in zip(x, mask)]
    return sum(rows) / len(rows)


def test_masked_mean_is_a_per_sequence_token_mean_then_a_batch_mean():
    x = [[1.0, 2.0, 3.0, 100.0], [10.0, 20.0, -7.0, 5.0]]
    # Row means 2 and 15 (padding ignored); a token mean over the batch would give 36/5 = 7.2 instead.
    assert masked_mean(T(x), T(MASK)).item() == pytest.approx(8.5)
    assert plain_masked_mean(x, MASK) == pytest.approx(8.5)


def test_gather_log_probs_picks_the_log_softmax_of_each_token():
    logits = [[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]]
    tokens = [[2, 0]]
    expected = [math.log(math.exp(2) / (1 + math.e + math.exp(2))), math.log(math.exp(3) / (math.exp(3) + 2))]
    assert gather_log_probs(T(logits), T(tokens)).tolist()[0] == pytest.approx(expected, rel=1e-6)


LOGP = [[-1.0, -0.5, -2.0, -0.1], [-0.2, -3.0, -1.0, -1.0]]
REF_LOGP = [[-1.5, -0.5, -1.0, -4.0], [-0.4, -2.0, -1.0, -1.0]]


def test_kl_estimators_k1_and_k3():
    k1 = [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(LOGP, REF_LOGP)]
    got_k1 = kl_estimate(T(LOGP), T(REF_LOGP)).tolist()
    assert [v for row in got_k1 for v in row] == pytest.approx([v for row in k1 for v in row])
    # k3 = (r − 1) − log r with r = π_ref / π
    k3 = [[(math.exp(b - a) - 1) - (b - a) for a, b in zip(ra, rb)] for ra, rb in zip(LOGP, REF_LOGP)]
    got = kl_estimate(T(LOGP), T(REF_LOGP), "k3")
    assert [v for row in got.tolist() for v in row] == pytest.approx([v for row in k3 for v in row], rel=1e-5)
    assert (got >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(T(LOGP), T(REF_LOGP), "k2")


def test_reward_and_cost_signals_put_the_end_score_on_the_last_response_token_and_clip():
    kl = [[0.5, 0.0, -1.0, 9.0], [0.2, -1.0, 3.0, 3.0]]
    beta, clip = 0.1, 1.0
    rewards = reward_signal(T([0.7, -5.0]), T(kl), T(MASK), kl_coeff=beta, clip_score=clip).tolist()
    # r_t = −β·KL_t, + R at the last token (t=2 for row 0, t=1 for row 1), clipped to ±1 after the addition, 0 after.
    expected_rewards = [[-0.05, 0.0, 0.1 + 0.7, 0.0], [-0.02, max(-1.0, 0.1 - 5.0), 0.0, 0.0]]
    assert rewards[0] == pytest.approx(expected_rewards[0]) and rewards[1] == pytest.approx(expected_rewards[1])
    costs = cost_signal(T([0.7, -5.0]), T(kl), T(MASK), kl_coeff=beta, clip_score=clip).tolist()
    expected_costs = [[0.05, 0.0, -0.1 + 0.7, 0.0], [0.02, max(-1.0, -0.1 - 5.0), 0.0, 0.0]]
    assert costs[0] == pytest.approx(expected_costs[0]) and costs[1] == pytest.approx(expected_costs[1])
    # Large end scores hit the clip on the positive side too.
    assert reward_signal(T([80.0]), T([[0.0, 0.0]]), T([[1, 1]]), 0.1, 50.0).tolist() == [[0.0, 50.0]]


def plain_gae(rewards, values, mask, gamma, lam):
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        r_row = [r * m for r, m in zip(r_row, m_row)]
        v_row = [v * m for v, m in zip(v_row, m_row)]
        adv = [0.0] * len(r_row)
        next_adv, next_value = 0.0, 0.0
        for t in reversed(range(len(r_row))):
            delta = r_row[t] + gamma * next_value - v_row[t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v_row[t]
            adv[t] = next_adv
        advantages.append([a * m for a, m in zip(adv, m_row)])
        returns.append([(a + v) * m for a, v, m in zip(adv, v_row, m_row)])
    return advantages, returns


def test_gae_matches_the_recursion_and_ignores_everything_after_eos():
    rewards = [[0.1, -0.2, 1.5, 7.0], [0.3, -0.6, 4.0, 4.0]]  # positions after EOS hold garbage
    values = [[0.5, 0.4, 0.2, 9.0], [-0.1, 0.3, 5.0, 5.0]]
    gamma, lam = 0.9, 0.8
    adv, ret = gae_advantages(T(rewards), T(values), T(MASK), gamma, lam)
    exp_adv, exp_ret = plain_gae(rewards, values, MASK, gamma, lam)
    for got, want in [(adv, exp_adv), (ret, exp_ret)]:
        assert [v for row in got.tolist() for v in row] == pytest.approx([v for row in want for v in row], abs=1e-6)
    # Hand check of row 1 (2 tokens, bootstrap 0): δ_1 = −0.6 − 0.3, δ_0 = 0.3 + 0.9·0.3 + 0.1; A_0 = δ_0 + 0.72·δ_1
    d1, d0 = -0.6 - 0.3, 0.3 + 0.9 * 0.3 + 0.1
    assert adv[1].tolist() == pytest.approx([d0 + 0.72 * d1, d1, 0.0, 0.0], abs=1e-6)
    assert ret[1].tolist() == pytest.approx([d0 + 0.72 * d1 - 0.1, d1 + 0.3, 0.0, 0.0], abs=1e-6)


def test_gae_defaults_gamma_1_lambda_095_and_detaches():
    rewards = T([[0.0, 1.0]], requires_grad=True)
    values = T([[0.5, 0.25]], requires_grad=True)
    adv, ret = gae_advantages(rewards, values, T([[1, 1]]))
    d1 = 1.0 - 0.25
    d0 = 0.0 + 0.25 - 0.5
    assert adv.tolist()[0] == pytest.approx([d0 + 0.95 * d1, d1])
    assert not adv.requires_grad and not ret.requires_grad


def test_actor_loss_is_the_clipped_surrogate_with_masked_mean():
    old = [[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]]
    new = [[-1.0 + math.log(1.5), -1.0 + math.log(0.5), -1.0 + math.log(1.1), 0.0], [-2.0 + math.log(0.7), -2.0 + math.log(1.3), 0.0, 0.0]]
    adv = [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 5.0, 5.0]]
    eps = 0.2
    ratios = [[1.5, 0.5, 1.1, 0.0], [0.7, 1.3, 0.0, 0.0]]
    terms = [[min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a in zip(rr, ar)] for rr, ar in zip(ratios, adv)]
    # row 0: min(1.5, 1.2)=1.2; min(−1.0, −1.6)=−1.6; min(0.55, 0.55)=0.55 -> mean 0.05
    # row 1: min(1.4, 1.6)=1.4; min(−1.3, −1.2)=−1.3 -> mean 0.05
    expected = -plain_masked_mean(terms, MASK)
    assert expected == pytest.approx(-0.05)
    log_probs = T(new, requires_grad=True)
    loss = ppo_actor_loss(log_probs, T(old), T(adv), T(MASK), eps)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # Where the clipped term is the minimum (row 0, t = 0 and 1) and after EOS, no gradient; elsewhere some.
    grad = log_probs.grad
    assert grad[0, 0] == 0 and grad[0, 1] == 0 and grad[0, 3] == 0 and grad[1, 2:].abs().sum() == 0
    assert grad[0, 2] != 0 and grad[1, 0] != 0 and grad[1, 1] != 0


def test_critic_loss_is_half_the_masked_mean_of_the_larger_squared_error():
    values = [[1.0, 8.0, -3.0, 0.0], [0.5, 2.0, 0.0, 0.0]]
    old = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    returns = [[2.0, 1.0, -1.0, 0.0], [0.0, 6.0, 0.0, 0.0]]
    cv = 5.0
    def term(v, o, g):
        clipped = min(max(v, o - cv), o + cv)
        return max((v - g) ** 2, (clipped - g) ** 2)
    squared = [[term(v, o, g) for v, o, g in zip(vr, orow, gr)] for vr, orow, gr in zip(values, old, returns)]
    # row 0: 1, max(49, 16)=49, 4 -> 18;  row 1: 0.25, 16 -> 8.125
    expected = 0.5 * plain_masked_mean(squared, MASK)
    assert expected == pytest.approx(0.5 * (18 + 8.125) / 2)
    assert ppo_critic_loss(T(values), T(old), T(returns), T(MASK), cv).item() == pytest.approx(expected)
    # The clip is what bites when the new value runs away in the direction of the return.
    assert ppo_critic_loss(T([[9.0]]), T([[0.0]]), T([[10.0]]), T([[1]]), cv).item() == pytest.approx(0.5 * 25.0)


def test_combined_advantage_is_a_reward_minus_lambda_cost_over_one_plus_lambda():
    a_r, a_c = [[1.0, -2.0]], [[0.5, 3.0]]
    for lam in (0.0, 0.5, 1.0, 4.0):
        expected = [(r - lam * c) / (1 + lam) for r, c in zip(a_r[0], a_c[0])]
        assert combined_advantage(T(a_r), T(a_c), lam).tolist()[0] == pytest.approx(expected)


def test_kl_weight_of_the_combined_signal_is_exactly_beta_for_every_lambda():
    kl = [[0.3, -0.2, 1.1, 0.0], [2.0, 0.4, 0.0, 0.0]]
    beta = 0.01
    zero = T([0.0, 0.0])
    r = reward_signal(zero, T(kl), T(MASK), beta)
    c = cost_signal(zero, T(kl), T(MASK), beta)
    values = torch.zeros(2, 4)
    a_r, _ = gae_advantages(r, values, T(MASK), 1.0, 0.95)
    a_c, _ = gae_advantages(c, values, T(MASK), 1.0, 0.95)
    expected_signal = [[-beta * k * m for k, m in zip(kr, mr)] for kr, mr in zip(kl, MASK)]
    expected_adv, _ = plain_gae(expected_signal, [[0.0] * 4] * 2, MASK, 1.0, 0.95)
    for lam in (0.0, 0.3, 1.0, 5.0, 100.0):
        combined_signal = combined_advantage(r, c, lam)  # (r − λc)/(1+λ) = −β·KL for every λ
        assert [v for row in combined_signal.tolist() for v in row] == pytest.approx(
            [v for row in expected_signal for v in row], rel=1e-6, abs=1e-12)
        combined = combined_advantage(a_r, a_c, lam)
        assert [v for row in combined.tolist() for v in row] == pytest.approx(
            [v for row in expected_adv for v in row], abs=1e-7)


def test_lagrange_multiplier_rises_above_the_threshold_and_falls_below():
    log_lambda, alpha, d = 0.0, 0.1, 0.0  # λ = 1
    up = lagrange_multiplier_update(log_lambda, episode_cost=2.0, threshold=d, lambda_lr=alpha)
    assert up == pytest.approx(0.0 + 0.1 * 1.0 * 2.0)
    down = lagrange_multiplier_update(log_lambda, episode_cost=-3.0, threshold=d, lambda_lr=alpha)
    assert down == pytest.approx(-0.3)
    assert math.exp(up) > 1.0 > math.exp(down) > 0.0
    # The step scales with λ: from λ = e^0.5 with J_C − d = 1: log λ + 0.1·e^0.5.
    assert lagrange_multiplier_update(0.5, 1.5, 0.5, 0.1) == pytest.approx(0.5 + 0.1 * math.exp(0.5))
    assert lagrange_multiplier_update(1.0, 1.0, 1.0, 0.1) == 1.0  # at the threshold: unchanged
    # Clamped at log λ_max.
    assert lagrange_multiplier_update(math.log(4.9), 100.0, 0.0, 0.1, lambda_max=5.0) == pytest.approx(math.log(5.0))
    assert lagrange_multiplier_update(math.log(4.9), 100.0, 0.0, 0.1) > math.log(5.0)  # no bound given


def test_approx_kl_and_clip_fraction():
    old = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    log_r = [[math.log(1.5), math.log(0.9), 0.0, 5.0], [math.log(0.7), math.log(1.1), 5.0, 5.0]]
    kl_terms = [[(math.exp(x) - 1) - x for x in row] for row in log_r]
    assert approx_kl(T(log_r), T(old), T(MASK)).item() == pytest.approx(plain_masked_mean(kl_terms, MASK), rel=1e-5)
    # |ρ − 1| > 0.2: row 0 -> 1.5 only (1 of 3); row 1 -> 0.7 (1 of 2)
    assert clip_fraction(T(log_r), T(old), T(MASK), 0.2).item() == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_explained_variance_over_real_tokens():
    values = [[1.0, 2.0, 3.0, 50.0], [0.0, 1.0, -9.0, 9.0]]
    returns = [[1.5, 2.0, 2.0, 0.0], [0.5, 1.5, 3.0, 3.0]]
    g = [1.5, 2.0, 2.0, 0.5, 1.5]
    v = [1.0, 2.0, 3.0, 0.0, 1.0]
    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)
    expected = 1 - var([a - b for a, b in zip(g, v)]) / var(g)
    assert explained_variance(T(values), T(returns), T(MASK)).item() == pytest.approx(expected, rel=1e-5)
    assert explained_variance(T(returns), T(returns), T(MASK)).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(T([[1.0]]), T([[2.0]]), T([[1]])).item())


def test_masked_whiten_has_zero_mean_unit_variance_on_real_tokens():
    x = T([[1.0, 2.0, 3.0, 40.0], [4.0, 5.0, 6.0, 7.0]])
    w = masked_whiten(x, T(MASK))
    real = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(real) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in real) / 5)
    assert w[0, :3].tolist() == pytest.approx([(r - mean) / std for r in real[:3]], rel=1e-5)
    assert w[0, 3].item() == 0.0 and w[1, 2:].tolist() == [0.0, 0.0]
