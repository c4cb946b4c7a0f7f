"""The losses of algorithms/losses.py on small hand-computed tensors (expected values from math, not torch)."""

from __future__ import annotations

import math

import pytest
import torch

from safealign.algorithms.losses import (bfpo_loss, cost_loss, dpo_loss, label_log_probs, modpo_loss, reward_loss, safety_sign,
                                         sequence_log_probs, sft_loss, soft_cost_loss, soft_label_dpo_loss,
                                         soft_reward_loss, mean_variance_reward_loss)
from safealign.data.formatting import IGNORE_INDEX


def neg_log_sigmoid(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x})."""
    return math.log1p(math.exp(-x))


def neg_log_softmax(row: list[float], index: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[index]


# --------------------------------------------------------------------------------------------------
# sft_loss
# --------------------------------------------------------------------------------------------------
LOGITS = [  # (B=2, L=3, V=3)
    [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 0.0]],
    [[0.0, 1.0, 3.0], [-1.0, 0.0, 1.0], [2.0, 2.0, 2.0]],
]
LABELS = [[IGNORE_INDEX, 2, 1], [IGNORE_INDEX, IGNORE_INDEX, 0]]  # labels[b, t+1] is predicted at t
# Labelled predictions: (b=0, t=0 -> 2), (b=0, t=1 -> 1), (b=1, t=1 -> 0).
SFT_TERMS = [neg_log_softmax(LOGITS[0][0], 2), neg_log_softmax(LOGITS[0][1], 1), neg_log_softmax(LOGITS[1][1], 0)]


def test_sft_loss_is_the_mean_cross_entropy_on_labelled_tokens():
    loss = sft_loss(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert loss.item() == pytest.approx(sum(SFT_TERMS) / 3, rel=1e-6)


def test_sft_loss_normalises_by_the_given_token_count():
    # Gradient accumulation: the sum over this micro-batch divided by the whole step's count.
    loss = sft_loss(torch.tensor(LOGITS), torch.tensor(LABELS), num_label_tokens=10)
    assert loss.item() == pytest.approx(sum(SFT_TERMS) / 10, rel=1e-6)
    loss = sft_loss(torch.tensor(LOGITS), torch.tensor(LABELS), num_label_tokens=torch.tensor(6))
    assert loss.item() == pytest.approx(sum(SFT_TERMS) / 6, rel=1e-6)


def test_sft_loss_ignores_ignored_positions_whatever_their_logits():
    changed = torch.tensor(LOGITS)
    changed[1, 0] = torch.tensor([9.0, -9.0, 4.0])  # predicts labels[1, 1] = IGNORE
    changed[:, 2] = torch.tensor([5.0, -5.0, 0.0])  # last position: predicts nothing
    assert sft_loss(changed, torch.tensor(LABELS)).item() == pytest.approx(sum(SFT_TERMS) / 3, rel=1e-6)


def test_sft_loss_gradient_is_zero_on_ignored_positions():
    logits = torch.tensor(LOGITS, requires_grad=True)
    sft_loss(logits, torch.tensor(LABELS)).backward()
    grad = logits.grad
    assert torch.all(grad[1, 0] == 0) and torch.all(grad[:, 2] == 0)
    for b, t in [(0, 0), (0, 1), (1, 1)]:
        assert grad[b, t].abs().sum() > 0
    # d/dz of −log softmax(z)[y] / N is (softmax(z) − onehot(y)) / N.
    z, y = LOGITS[0][1], 1
    probs = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    expected = [(p - (i == y)) / 3 for i, p in enumerate(probs)]
    assert grad[0, 1].tolist() == pytest.approx(expected, rel=1e-5)


def test_sft_loss_without_labels_is_zero_not_nan():
    labels = torch.full((2, 3), IGNORE_INDEX)
    assert sft_loss(torch.tensor(LOGITS), labels).item() == 0.0


# --------------------------------------------------------------------------------------------------
# reward_loss:  mean_B[−log σ(r_b − r_w)] + η · mean(r_b², r_w²)
# --------------------------------------------------------------------------------------------------
def test_reward_loss_value_includes_the_l2_regulariser():
    better, worse, eta = [1.0, -0.5], [0.0, 0.5], 0.1
    pairwise = (neg_log_sigmoid(1.0 - 0.0) + neg_log_sigmoid(-0.5 - 0.5)) / 2
    l2 = (1.0**2 + 0.5**2 + 0.0**2 + 0.5**2) / 4
    loss = reward_loss(torch.tensor(better), torch.tensor(worse), l2_coeff=eta)
    assert loss.item() == pytest.approx(pairwise + eta * l2, rel=1e-6)
    assert reward_loss(torch.tensor(better), torch.tensor(worse), l2_coeff=0.0).item() == pytest.approx(pairwise, rel=1e-6)


def test_reward_loss_default_regulariser_is_the_reference_1e_3():
    better, worse = torch.tensor([2.0]), torch.tensor([1.0])
    expected = neg_log_sigmoid(1.0) + 1e-3 * (4.0 + 1.0) / 2
    assert reward_loss(better, worse).item() == pytest.approx(expected, rel=1e-6)


def test_reward_loss_gradient_raises_the_better_and_lowers_the_worse_score():
    better = torch.tensor([0.3, -1.0], requires_grad=True)
    worse = torch.tensor([0.1, 2.0], requires_grad=True)
    reward_loss(better, worse, l2_coeff=0.0).backward()
    assert torch.all(better.grad < 0) and torch.all(worse.grad > 0)  # descent: r_b up, r_w down
    # dL/dr_b = −(1 − σ(r_b − r_w)) / B
    expected = [-(1 - 1 / (1 + math.exp(-(b - w)))) / 2 for b, w in [(0.3, 0.1), (-1.0, 2.0)]]
    assert better.grad.tolist() == pytest.approx(expected, rel=1e-5)
    assert worse.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# cost_loss:  mean_B[−log σ(c_u − c_s) − log σ(s_u·c_u) − log σ(s_s·c_s)] + η · mean(c_u², c_s²)
# s = +1 unsafe, −1 safe; cost > 0 means unsafe.
# --------------------------------------------------------------------------------------------------
UNSAFER, SAFER = [2.0, 0.5], [-1.0, 1.0]
UNSAFER_SIGN, SAFER_SIGN = [1.0, 1.0], [-1.0, 1.0]  # pair 2: both responses labelled unsafe


def _cost_terms(pairwise: bool) -> float:
    total = 0.0
    for c_u, c_s, s_u, s_s in zip(UNSAFER, SAFER, UNSAFER_SIGN, SAFER_SIGN):
        total += neg_log_sigmoid(s_u * c_u) + neg_log_sigmoid(s_s * c_s)
        if pairwise:
            total += neg_log_sigmoid(c_u - c_s)
    return total / len(UNSAFER)


def _cost(unsafer, safer, unsafer_sign, safer_sign, **kwargs) -> float:
    t = torch.tensor
    return cost_loss(t(unsafer), t(safer), t(unsafer_sign), t(safer_sign), **kwargs).item()


def test_cost_loss_value_includes_sign_terms_and_the_l2_regulariser():
    eta = 0.05
    l2 = (2.0**2 + 0.5**2 + 1.0**2 + 1.0**2) / 4
    assert _cost(UNSAFER, SAFER, UNSAFER_SIGN, SAFER_SIGN, l2_coeff=eta) == pytest.approx(
        _cost_terms(pairwise=True) + eta * l2, rel=1e-6)


def test_cost_loss_without_pairwise_term_keeps_only_the_sign_terms():
    assert _cost(UNSAFER, SAFER, UNSAFER_SIGN, SAFER_SIGN, l2_coeff=0.0, use_pairwise=False) == pytest.approx(
        _cost_terms(pairwise=False), rel=1e-6)


def test_cost_loss_sign_convention_positive_cost_is_unsafe():
    # A confident, correct cost model: the unsafe response far above 0, the safe one far below.
    correct = _cost([20.0], [-20.0], [1.0], [-1.0], l2_coeff=0.0)
    assert correct < 1e-8
    # The same scores with the safety labels flipped: each sign term is about 20.
    flipped = _cost([20.0], [-20.0], [-1.0], [1.0], l2_coeff=0.0)
    assert flipped == pytest.approx(neg_log_sigmoid(40.0) + 2 * neg_log_sigmoid(-20.0), rel=1e-6)
    assert flipped > 39.0
    # Scores on the wrong side of 0 with correct labels cost as much.
    assert _cost([-20.0], [20.0], [1.0], [-1.0], l2_coeff=0.0) > 59.0


def test_cost_loss_gradient_pushes_unsafe_costs_up_and_safe_costs_down():
    unsafer = torch.tensor([0.0], requires_grad=True)
    safer = torch.tensor([0.0], requires_grad=True)
    cost_loss(unsafer, safer, torch.tensor([1.0]), torch.tensor([-1.0]), l2_coeff=0.0).backward()
    # At 0 every σ is ½: d/dc_u = −½ (pairwise) − ½ (sign) = −1; d/dc_s = +½ + ½ = +1.
    assert unsafer.grad.item() == pytest.approx(-1.0) and safer.grad.item() == pytest.approx(1.0)


def test_safety_sign_is_minus_one_for_safe_plus_one_for_unsafe():
    assert safety_sign(torch.tensor([True, False])).tolist() == [-1.0, 1.0]
    assert safety_sign(torch.tensor([1, 0])).tolist() == [-1.0, 1.0]
    assert safety_sign(torch.tensor([True])).dtype.is_floating_point


def test_a_one_answer_row_teaches_the_cost_model_its_label_and_the_reward_model_nothing():
    # A labelled single answer enters as a pair of one text twice (pipeline.redteam.labelled_answer_rows): both
    # models score it once; the ranking terms are log 2 with no gradient, the sign terms pull c toward the label.
    c = torch.tensor([0.7, -0.4], requires_grad=True)  # one unsafe-labelled answer, one safe-labelled answer
    sign = safety_sign(torch.tensor([False, True]))
    loss = cost_loss(c, c, sign, sign, l2_coeff=0.0)
    expected = (math.log(2) + 2 * -math.log(torch.sigmoid(torch.tensor(0.7)).item())
                + math.log(2) + 2 * -math.log(torch.sigmoid(torch.tensor(0.4)).item())) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert c.grad[0] < 0 and c.grad[1] > 0  # descent raises the unsafe answer's cost, lowers the safe one's
    r = torch.tensor([1.3], requires_grad=True)
    reward_loss(r, r, l2_coeff=0.0).backward()
    assert r.grad.abs().item() == 0.0


def _nls(x: float) -> float:
    """−log σ(x), by hand."""
    return math.log(1.0 + math.exp(-x))


def test_dpo_losses_match_their_formulas_by_hand():
    # h = (−1.0 − −1.5) − (−2.0 − −1.0) = 0.5 + 1.0 = 1.5; β = 0.5 → z = 0.75
    chosen, rejected = torch.tensor([-1.0 - -1.5]), torch.tensor([-2.0 - -1.0])
    assert dpo_loss(chosen, rejected, 0.5).item() == pytest.approx(_nls(0.75), rel=1e-6)
    eps = 0.1
    assert dpo_loss(chosen, rejected, 0.5, eps).item() == pytest.approx(0.9 * _nls(0.75) + 0.1 * _nls(-0.75), rel=1e-6)
    assert dpo_loss(chosen, rejected, 0.5, eps, "robust").item() == pytest.approx(
        (0.9 * _nls(0.75) - 0.1 * _nls(-0.75)) / 0.8, rel=1e-6)
    assert dpo_loss(chosen, rejected, 0.5, 0.0, "ipo").item() == pytest.approx((1.5 - 1.0) ** 2, rel=1e-6)  # 1/(2β) = 1
    # SafeDPO's margin m enters as σ(βh − m): with m = 10 the same pair is far from done.
    margin = dpo_loss(chosen, rejected, 0.5, margins=torch.tensor([10.0])).item()
    assert margin == pytest.approx(_nls(0.75 - 10.0), rel=1e-6) and margin > 9.0
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(chosen, rejected, 0.5, loss_type="hinge")


def test_soft_label_modpo_and_bfpo_losses_match_their_formulas_by_hand():
    chosen, rejected = torch.tensor([0.5]), torch.tensor([-1.0])  # h = 1.5
    # soft labels: p = 0.8, β = 0.5 → z = 0.75
    assert soft_label_dpo_loss(chosen, rejected, 0.5, torch.tensor([0.8])).item() == pytest.approx(
        0.8 * _nls(0.75) + 0.2 * _nls(-0.75), rel=1e-6)
    assert soft_label_dpo_loss(chosen, rejected, 0.5, torch.tensor([0.9])).item() == pytest.approx(
        dpo_loss(chosen, rejected, 0.5, 0.1).item(), rel=1e-6)  # p = 1 − ε is cDPO
    # MODPO, β = 0.5, w = 0.25: R(y_w) = (0.25 − 0.75·(−1)) / 0.25 = 4, R(y_l) = (−0.5 − 0.75·2) / 0.25 = −8
    value = modpo_loss(chosen, rejected, torch.tensor([-1.0]), torch.tensor([2.0]), 0.5, 0.25).item()
    assert value == pytest.approx(_nls(12.0), rel=1e-5)
    # when y_w is already the safer by m, the policy's own log-ratio must exceed (1 − w)·Δm before helpfulness counts:
    # R(y_w) − R(y_l) = (0.25 − 0.75·3 − (−0.5)) / 0.25 = −6
    assert modpo_loss(chosen, rejected, torch.tensor([3.0]), torch.tensor([0.0]), 0.5, 0.25).item() == pytest.approx(_nls(-6.0), rel=1e-6)
    # BFPO, β = 0.1, B1 = 3 (B3 = 0.5), α = 0.5; h = 1.5. Targets: both safe 1.5 − 0.5 − 0.5 = 0.5 → (1.5 − 5)²;
    # only y_w safe 1.5 − 0.5 = 1 → (1.5 − 10)²; only y_l safe −0.5 − 0.5 = −1 → (1.5 + 10)²; none −0.5 → (1.5 + 5)²
    cases = {(1, 1): (1.5 - 5.0) ** 2, (1, 0): (1.5 - 10.0) ** 2, (0, 1): (1.5 + 10.0) ** 2, (0, 0): (1.5 + 5.0) ** 2}
    for (w_safe, l_safe), expected in cases.items():
        value = bfpo_loss(chosen, rejected, torch.tensor([float(w_safe)]), torch.tensor([float(l_safe)]), 0.1).item()
        assert value == pytest.approx(expected, rel=1e-6), (w_safe, l_safe)


def test_sequence_log_probs_sum_exactly_the_response_tokens():
    # One row: prompt token 0, response tokens 1, 2 (labels), vocabulary 3. Position t predicts token t + 1.
    logits = torch.log(torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]]]))  # (1, 3, 3), rows sum to 1
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    expected = math.log(0.5) + math.log(0.8)  # p(1 | pos 0) · p(2 | pos 1); the last position predicts nothing
    assert sequence_log_probs(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert sequence_log_probs(logits, labels, average=True).item() == pytest.approx(expected / 2, rel=1e-6)


def test_label_log_probs_from_the_label_positions_alone_sum_each_rows_tokens():
    # Two rows, vocabulary 3: row 0 labels tokens 1, 2 (positions 0, 1 predict them); row 1 labels token 0 only (position
    # 1). The label logits are those three positions, row-major; a third row without labels gets 0.
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])  # (N = 3, V), each row sums to 1
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 0], [IGNORE_INDEX] * 3])
    row0, row1 = math.log(0.5) + math.log(0.8), math.log(0.7)
    assert label_log_probs(torch.log(p), labels).tolist() == pytest.approx([row0, row1, 0.0], rel=1e-6)
    assert label_log_probs(torch.log(p), labels, average=True).tolist() == pytest.approx([row0 / 2, row1, 0.0], rel=1e-6)
    full = torch.randn(3, 3, 3)  # the full logits' label positions give sequence_log_probs' values
    label_logits = full[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    torch.testing.assert_close(label_log_probs(label_logits, labels), sequence_log_probs(full, labels))


def test_soft_label_score_losses_match_their_formulas_by_hand():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    scores, q = torch.tensor([[1.0, 0.0], [-0.5, 2.0]]), torch.tensor([0.75, 1 / 3])
    by_hand = (-(0.75 * math.log(sig(1.0)) + 0.25 * math.log(sig(-1.0)))
               - (1 / 3 * math.log(sig(-2.5)) + 2 / 3 * math.log(sig(2.5)))) / 2 + 0.1 * (1 + 0.25 + 4) / 4
    assert soft_reward_loss(scores, q, l2_coeff=0.1).item() == pytest.approx(by_hand, rel=1e-6)
    costs, safer, unsafe = torch.tensor([[0.5, -1.0]]), torch.tensor([0.2]), torch.tensor([[0.9, 0.4]])
    pair = -(0.2 * math.log(sig(-1.5)) + 0.8 * math.log(sig(1.5)))
    signs = -(0.9 * math.log(sig(0.5)) + 0.1 * math.log(sig(-0.5))) - (0.4 * math.log(sig(-1.0)) + 0.6 * math.log(sig(1.0)))
    assert soft_cost_loss(costs, safer, unsafe, l2_coeff=0.0).item() == pytest.approx(pair + signs, rel=1e-6)
    assert soft_cost_loss(costs, safer, unsafe, 0.0, use_pairwise=False).item() == pytest.approx(signs, rel=1e-6)


def test_soft_label_score_losses_with_hard_labels_are_the_bradley_terry_losses():
    torch.manual_seed(0)
    scores = torch.randn(6, 2)
    better = torch.tensor([0, 1, 1, 0, 0, 1])
    first_better = (better == 0).float()
    rows = torch.arange(6)
    assert soft_reward_loss(scores, first_better).item() == pytest.approx(
        reward_loss(scores[rows, better], scores[rows, 1 - better]).item(), rel=1e-6)
    safer, is_safe = torch.tensor([1, 0, 0, 1, 1, 0]), torch.tensor([[0, 1], [1, 1], [1, 0], [0, 0], [1, 1], [0, 1]]).bool()
    unsafer_sign, safer_sign = safety_sign(is_safe[rows, 1 - safer]), safety_sign(is_safe[rows, safer])
    hard = cost_loss(scores[rows, 1 - safer], scores[rows, safer], unsafer_sign, safer_sign)
    assert soft_cost_loss(scores, (safer == 0).float(), (~is_safe).float()).item() == pytest.approx(hard.item(), rel=1e-6)


def test_the_mean_variance_reward_loss_matches_its_formula_by_hand():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    k = math.sqrt(2 * math.pi)
    means, stds, q = torch.tensor([[1.0, 0.0], [-0.5, 2.0]]), torch.tensor([[0.6, 0.8], [1.0, 2.0]]), torch.tensor([1.0, 0.25])
    z0, z1 = 1.0 / math.sqrt(0.36 + 0.64), -2.5 / math.sqrt(1.0 + 4.0)
    by_hand = (-math.log(sig(k * z0)) - (0.25 * math.log(sig(k * z1)) + 0.75 * math.log(sig(-k * z1)))) / 2 \
        + 0.1 * (1 + 0.25 + 4) / 4
    assert mean_variance_reward_loss(means, stds, q, l2_coeff=0.1).item() == pytest.approx(by_hand, rel=1e-6)
    # a contested pair (q = 1/2) is fitted better by a larger σ at the same means; a clear one by a smaller σ
    contested, clear = torch.tensor([0.5]), torch.tensor([1.0])
    pair = torch.tensor([[1.0, 0.0]])
    wide, narrow = torch.tensor([[3.0, 3.0]]), torch.tensor([[0.3, 0.3]])
    assert mean_variance_reward_loss(pair, wide, contested, 0.0) < mean_variance_reward_loss(pair, narrow, contested, 0.0)
    assert mean_variance_reward_loss(pair, narrow, clear, 0.0) < mean_variance_reward_loss(pair, wide, clear, 0.0)
