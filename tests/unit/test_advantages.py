import math
import statistics

import pytest
import torch

from rebelrl.losses import astar_values, gae, group_normalized_advantages, kl_k1, kl_k3, rloo_advantages, whiten


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# RLOO


def test_rloo_advantages_hand_derived():
    """k = 4. Row 0, rewards (1, 2, 3, 6), sum 12; the baseline of each is the mean of the other three:
      A0 = 1 - (12 - 1) / 3 = 1 - 11/3 = -8/3
      A1 = 2 - (12 - 2) / 3 = 2 - 10/3 = -4/3
      A2 = 3 - (12 - 3) / 3 = 3 - 3    =  0
      A3 = 6 - (12 - 6) / 3 = 6 - 2    =  4
    Row 1, rewards (0, 0, 1, 1), sum 2: A = (0 - 2/3, 0 - 2/3, 1 - 1/3, 1 - 1/3) = (-2/3, -2/3, 2/3, 2/3).
    """
    advantages = rloo_advantages(_t([[1, 2, 3, 6], [0, 0, 1, 1]]))
    expected = _t([[-8 / 3, -4 / 3, 0, 4], [-2 / 3, -2 / 3, 2 / 3, 2 / 3]])
    assert torch.allclose(advantages, expected, atol=1e-12)


def test_rloo_advantages_match_a_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 5, generator=g, dtype=torch.float64)
    advantages = rloo_advantages(rewards)
    for b in range(7):
        for i in range(5):
            others = [rewards[b, j].item() for j in range(5) if j != i]
            assert advantages[b, i].item() == pytest.approx(rewards[b, i].item() - sum(others) / 4, abs=1e-12)


def test_rloo_advantages_are_k_over_k_minus_one_times_the_centred_rewards():
    """r_i - (S - r_i)/(k-1) = (k r_i - S)/(k-1) = k/(k-1) (r_i - S/k); rows sum to zero."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 3, generator=g, dtype=torch.float64)
    advantages = rloo_advantages(rewards)
    assert torch.allclose(advantages, 1.5 * (rewards - rewards.mean(dim=1, keepdim=True)), atol=1e-12)
    assert torch.allclose(advantages.sum(dim=1), torch.zeros(4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape", [(4,), (4, 1), (2, 2, 2)])
def test_rloo_advantages_reject_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"\(B, k\).*k >= 2"):
        rloo_advantages(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------
# GRPO / Dr. GRPO


def test_group_normalized_advantages_hand_derived_with_the_unbiased_std():
    """Row 0, rewards (2, 3, 4): mean 3, deviations (-1, 0, 1), sum of squares 2.
    Unbiased variance 2 / (3 - 1) = 1, std 1, so A = (-1, 0, 1) / (1 + 1e-4) = (-0.99990001, 0, 0.99990001).
    (The biased std sqrt(2/3) = 0.8165 would give +-1.2246: the test tells the two apart.)
    Row 1, rewards (5, 5, 5): deviations 0, std 0: A = 0 / (0 + 1e-4) = 0."""
    advantages = group_normalized_advantages(_t([[2, 3, 4], [5, 5, 5]]))
    a = 1 / 1.0001
    assert torch.allclose(advantages, _t([[-a, 0, a], [0, 0, 0]]), atol=1e-12)


def test_dr_grpo_advantages_are_not_scaled():
    """scale=False: rewards (0, 2, 7), mean 3, A = (-3, -1, 4) whatever the std (here sqrt(13))."""
    advantages = group_normalized_advantages(_t([[0, 2, 7]]), scale=False)
    assert advantages.tolist() == [[-3.0, -1.0, 4.0]]


def test_group_normalized_advantages_match_a_loop_with_statistics_stdev():
    """statistics.stdev is the sample (n - 1) standard deviation, computed independently of torch."""
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(6, 8, generator=g, dtype=torch.float64) * 3
    scaled = group_normalized_advantages(rewards, eps=1e-4)
    centred = group_normalized_advantages(rewards, scale=False)
    for b in range(6):
        row = rewards[b].tolist()
        mean, std = statistics.fmean(row), statistics.stdev(row)
        for i in range(8):
            assert centred[b, i].item() == pytest.approx(row[i] - mean, abs=1e-12)
            assert scaled[b, i].item() == pytest.approx((row[i] - mean) / (std + 1e-4), rel=1e-12)


def test_group_normalized_advantages_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        group_normalized_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="eps > 0"):
        group_normalized_advantages(torch.zeros(3, 2), eps=0.0)


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_hand_unrolled_for_three_tokens():
    """gamma = 0.5, gae_lambda = 0.5 (gamma * lambda = 0.25), rewards (1, 0, 3), values (1, 2, 1),
    and V = 0 after the last token:
      delta_2 = 3 + 0.5 * 0 - 1 =  2
      delta_1 = 0 + 0.5 * 1 - 2 = -1.5
      delta_0 = 1 + 0.5 * 2 - 1 =  1
      A_2 = 2
      A_1 = -1.5 + 0.25 * 2     = -1
      A_0 = 1 + 0.25 * (-1)     =  0.75
    returns = A + V = (1.75, 1, 3).
    Row 1 has mask (1, 1, 0) and garbage (99) on the pad: rewards (1, 3), values (1, 1):
      delta_1 = 3 + 0 - 1 = 2, A_1 = 2; delta_0 = 1 + 0.5 * 1 - 1 = 0.5, A_0 = 0.5 + 0.25 * 2 = 1
    returns (2, 3), and 0 on the pad."""
    rewards = _t([[1, 0, 3], [1, 3, 99]])
    values = _t([[1, 2, 1], [1, 1, 99]])
    mask = _t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, gae_lambda=0.5)
    assert torch.allclose(advantages, _t([[0.75, -1, 2], [1, 2, 0]]), atol=1e-12)
    assert torch.allclose(returns, _t([[1.75, 1, 3], [2, 3, 0]]), atol=1e-12)
    inf = float("inf")
    rewards[1, 2], values[1, 2] = inf, -inf  # a multiply by the mask would make these nan
    assert torch.equal(gae(rewards, values, mask, gamma=0.5, gae_lambda=0.5)[0], advantages)


def test_gae_limits_lambda_zero_is_td_error_and_lambda_one_is_monte_carlo():
    """Same row. lambda = 0: A_t = delta_t = (1, -1.5, 2).
    gamma = lambda = 1: A_t = sum_{s >= t} r_s - V_t: (4 - 1, 3 - 2, 3 - 1) = (3, 1, 2); returns
    are the undiscounted returns-to-go (4, 3, 3)."""
    rewards, values, mask = _t([[1, 0, 3]]), _t([[1, 2, 1]]), torch.ones(1, 3)
    td, _ = gae(rewards, values, mask, gamma=0.5, gae_lambda=0.0)
    assert torch.allclose(td, _t([[1, -1.5, 2]]), atol=1e-12)
    mc, mc_returns = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    assert torch.allclose(mc, _t([[3, 1, 2]]), atol=1e-12)
    assert torch.allclose(mc_returns, _t([[4, 3, 3]]), atol=1e-12)


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one row at a time, on python floats: A_t = sum_l (gamma lam)^l delta_{t+l}."""
    n, t_len = len(rewards), len(rewards[0])
    advantages = [[0.0] * t_len for _ in range(n)]
    for i in range(n):
        length = lengths[i]
        deltas = [
            rewards[i][t] + gamma * (values[i][t + 1] if t + 1 < length else 0.0) - values[i][t] for t in range(length)
        ]
        for t in range(length):
            advantages[i][t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(length - t))
    return advantages


def test_gae_matches_the_textbook_sum_on_random_padded_rows():
    g = torch.Generator().manual_seed(3)
    n, t_len = 6, 7
    rewards = torch.randn(n, t_len, generator=g, dtype=torch.float64)
    values = torch.randn(n, t_len, generator=g, dtype=torch.float64)
    lengths = [7, 1, 4, 0, 6, 3]
    mask = torch.tensor([[1.0] * k + [0.0] * (t_len - k) for k in lengths], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, gae_lambda=0.8)
    expected = _gae_loop(rewards.tolist(), values.tolist(), lengths, 0.9, 0.8)
    assert torch.allclose(advantages, _t(expected), atol=1e-12)
    assert torch.allclose(returns, (_t(expected) + values) * mask, atol=1e-12)


def test_gae_passes_no_gradient_and_rejects_bad_masks():
    values = torch.ones(1, 3, requires_grad=True)
    advantages, returns = gae(torch.ones(1, 3), values, torch.ones(1, 3), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.ones(1, 3), torch.ones(1, 3), _t([[1, 0, 1]]), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        gae(torch.ones(1, 3), torch.ones(1, 2), torch.ones(1, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gae(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 3), 1.5, 0.95)


# ---------------------------------------------------------------------------------------------
# Whitening


def test_whiten_hand_derived_with_the_unbiased_variance():
    """Unmasked values 0, 4, 8 (the fourth, 100, is padding): mean 4, deviations (-4, 0, 4),
    sum of squares 32, unbiased variance 32 / (3 - 1) = 16, std 4: whitened (-1, 0, 1), 0 on the pad.
    (The biased variance 32/3 would give +-1.2247.) shift_mean=False adds the mean back: (3, 4, 5)."""
    values = _t([[0, 4], [8, 100]])
    mask = _t([[1, 1], [1, 0]])
    scale = 4 / math.sqrt(16 + 1e-8)
    assert torch.allclose(whiten(values, mask), _t([[-scale, 0], [scale, 0]]), atol=1e-12)
    assert torch.allclose(whiten(values, mask, shift_mean=False), _t([[4 - scale, 4], [4 + scale, 0]]), atol=1e-12)
    values[1, 1] = float("inf")  # padding may hold anything
    assert torch.allclose(whiten(values, mask), _t([[-scale, 0], [scale, 0]]), atol=1e-12)


def test_whiten_gives_zero_mean_unit_sample_variance_over_the_mask():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(5, 6, generator=g, dtype=torch.float64) * 7 + 3
    mask = (torch.rand(5, 6, generator=g) > 0.3).double()
    out = whiten(values, mask)
    kept = out[mask.bool()].tolist()
    assert statistics.fmean(kept) == pytest.approx(0.0, abs=1e-12)
    assert statistics.stdev(kept) == pytest.approx(1.0, abs=1e-8)
    assert (out[~mask.bool()] == 0).all()


def test_whiten_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.ones(1, 3), _t([[1, 0, 0]]))


# ---------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_hand_derived():
    """logp = 0, ref = log 2: u = ref - logp = log 2, k3 = e^u - u - 1 = 2 - log 2 - 1 = 0.3068528;
    k1 = -log 2. logp = log 2, ref = 0: u = -log 2, k3 = 1/2 + log 2 - 1 = 0.1931472; k1 = log 2.
    Equal log-probs: both 0."""
    logps = _t([0.0, math.log(2), -1.3])
    ref = _t([math.log(2), 0.0, -1.3])
    assert kl_k3(logps, ref).tolist() == pytest.approx([1 - math.log(2), math.log(2) - 0.5, 0.0], abs=1e-12)
    assert kl_k1(logps, ref).tolist() == pytest.approx([-math.log(2), math.log(2), 0.0], abs=1e-12)


def test_kl_estimators_average_to_the_exact_kl_under_the_sampling_policy():
    """p = (1/2, 1/4, 1/4), ref = (1/4, 1/4, 1/2): KL(p || ref) = 1/2 log 2 + 0 + 1/4 log(1/2) = 1/4 log 2.
    Weighted by p, both estimators are unbiased: sum_x p(x) k(x) = 0.1732868."""
    p = _t([0.5, 0.25, 0.25])
    ref = _t([0.25, 0.25, 0.5])
    for estimator in (kl_k1, kl_k3):
        assert (p * estimator(p.log(), ref.log())).sum().item() == pytest.approx(0.25 * math.log(2), abs=1e-12)


def test_kl_k3_is_non_negative_and_zero_at_equality():
    g = torch.Generator().manual_seed(5)
    logps = torch.randn(1000, generator=g) * 3
    for scale in (1.0, 1e-3, 1e-7):
        ref = logps + scale * torch.randn(1000, generator=g)
        assert (kl_k3(logps, ref) >= 0).all()
    assert (kl_k3(logps, logps) == 0).all()


def test_kl_estimators_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        kl_k3(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same shape"):
        kl_k1(torch.zeros(2, 3), torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# A*-PO optimal values


def test_astar_values_hand_derived():
    """Rewards (0, log 3), beta1 = 1: V = log((e^0 + e^{log 3}) / 2) = log(4 / 2) = log 2.
    Binary rewards (0, 0, 0, 1), beta1 = 0.5: V = 0.5 * log((3 + e^2) / 4) = 0.5 * log(2.5972640)
    = 0.5 * 0.9544586 = 0.4772293."""
    assert astar_values(_t([[0, math.log(3)]]), beta1=1.0).item() == pytest.approx(math.log(2), abs=1e-12)
    v = astar_values(_t([[0, 0, 0, 1]]))  # the default beta1 = 0.5
    assert v.item() == pytest.approx(0.5 * math.log((3 + math.e**2) / 4), abs=1e-12)
    assert v.item() == pytest.approx(0.4772293, abs=1e-7)


def test_astar_values_tend_to_the_max_as_beta1_shrinks_and_to_the_mean_as_it_grows():
    """V = max + beta1 * log(mean_i exp((r_i - max) / beta1)), so max - beta1 log N <= V <= max;
    at beta1 = 1e-3 with rewards (0.2, 1, 0.5) V = 1 - 1e-3 log 3 (the others vanish). For large
    beta1, V = mean + Var / (2 beta1) + O(beta1^-2): at beta1 = 1e6, |V - mean| < 1e-6."""
    rewards = _t([[0.2, 1.0, 0.5]])
    small = astar_values(rewards, beta1=1e-3).item()
    assert small == pytest.approx(1.0 - 1e-3 * math.log(3), abs=1e-12)
    assert astar_values(rewards, beta1=1e6).item() == pytest.approx(rewards.mean().item(), abs=1e-6)


def test_astar_values_lie_between_mean_and_max_and_stay_finite_for_large_rewards():
    """Jensen: mean <= V <= max for any beta1. Rewards 1000 with beta1 = 0.5: exp(2000) overflows
    float64, but logsumexp gives V = 1000 exactly."""
    g = torch.Generator().manual_seed(6)
    rewards = torch.randn(16, 8, generator=g, dtype=torch.float64)
    for beta1 in (0.1, 0.5, 3.0):
        v = astar_values(rewards, beta1)
        assert (v >= rewards.mean(dim=1) - 1e-12).all() and (v <= rewards.max(dim=1).values + 1e-12).all()
    assert astar_values(torch.full((2, 4), 1000.0), beta1=0.5).tolist() == [1000.0, 1000.0]


def test_astar_values_reject_bad_arguments():
    with pytest.raises(ValueError, match="beta1 > 0"):
        astar_values(torch.zeros(2, 4), beta1=0.0)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        astar_values(torch.zeros(4), beta1=0.5)
