"""The offline losses against numbers derived by hand: SFT's token mean, the reward model's
Bradley-Terry loss with its margin and centring term, and HyPO's KL term, whose expected gradient
must be the gradient of KL(pi || pi_ref) itself."""

import math

import pytest
import torch

from rebelrl.losses import bradley_terry_loss, hypo_kl_loss, sft_loss


def test_sft_loss_is_the_mean_over_target_tokens():
    """Targets 1, 2 (row 0) and 3 (row 1) hold log-probs -1, -2, -3: loss (1 + 2 + 3) / 3 = 2; the
    non-target entries (-5, -7) weigh nothing."""
    logps = torch.tensor([[-1.0, -2.0, -5.0], [-3.0, -7.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = sft_loss(logps, targets)
    assert loss.item() == pytest.approx(2.0) and metrics["sft/tokens"] == 3
    loss.backward()
    assert torch.allclose(logps.grad, -targets.float() / 3)


def test_bradley_terry_loss_with_centring_hand_derived():
    """r+ = [1, 0], r- = [0, 1]: mean(-log sigmoid(1), -log sigmoid(-1)) = mean(0.313262, 1.313262) =
    0.813262; centring 0.01 * mean(1^2, 1^2) = 0.01; total 0.823262. d/dr+_0 = -(1 - sigmoid(1)) / 2
    + 0.01 * 2 * 1 / 2 = -0.134471 + 0.01 = -0.124471."""
    chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    assert loss.item() == pytest.approx(0.823262, abs=1e-6)
    assert metrics["rewards/accuracies"] == 0.5 and metrics["rewards/margins"] == 0.0
    loss.backward()
    assert chosen.grad[0].item() == pytest.approx(-0.124471, abs=1e-6)


def test_bradley_terry_margin_asks_for_a_larger_gap():
    """margin [0.5, 0]: mean(-log sigmoid(1 - 0.5), -log sigmoid(-1)) = mean(0.474077, 1.313262) = 0.893670."""
    loss, _ = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.0]))
    assert loss.item() == pytest.approx(0.893670, abs=1e-6)


def test_hypo_kl_loss_hand_derived():
    """One prompt, two samples with log pi_t = [-1, -3] and log pi_ref = [-2, -2]: log-ratios l = [1, -1],
    leave-one-out advantages [1 - (-1), -1 - 1] = [2, -2]; loss = 0.5 * mean(2 * -1, -2 * -3) = 0.5 * 2
    = 1; d loss / d logps = 0.5 * A / 2 = [0.5, -0.5]."""
    old = torch.tensor([[-1.0, -3.0]])
    logps = old.clone().requires_grad_(True)
    loss, metrics = hypo_kl_loss(logps, old, torch.tensor([[-2.0, -2.0]]), kl_coef=0.5)
    assert loss.item() == pytest.approx(1.0) and metrics["hypo/kl"] == pytest.approx(0.0)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[0.5, -0.5]]))


def test_hypo_kl_loss_expected_gradient_is_the_kls():
    """A policy over three outcomes, softmax(theta), and a uniform reference. Averaging the gradient of
    the loss over every pair of samples (i, j), weighted by its probability p_i p_j, gives exactly
    kl_coef * grad KL(pi || pi_ref): the score-function estimate is unbiased. The plain derivative of the
    sampled log-ratio (what differentiating l on fixed samples gives) averages to grad sum_i p_i l_i's
    first term only, E[grad log pi] = 0, and misses it."""
    theta = torch.tensor([0.2, -0.1, 0.5], requires_grad=True)
    ref = torch.log(torch.full((3,), 1 / 3))
    kl_coef = 0.3

    log_p = torch.log_softmax(theta, 0)
    kl = (log_p.exp() * (log_p - ref)).sum()
    (exact,) = torch.autograd.grad(kl_coef * kl, theta)

    expected = torch.zeros(3)
    p = torch.softmax(theta, 0).detach()
    for i in range(3):
        for j in range(3):
            log_p = torch.log_softmax(theta, 0)
            logps = log_p[[i, j]].view(1, 2)
            loss, _ = hypo_kl_loss(logps, logps.detach(), ref[[i, j]].view(1, 2), kl_coef)
            (grad,) = torch.autograd.grad(loss, theta)
            expected += p[i] * p[j] * grad
    torch.testing.assert_close(expected, exact, atol=1e-6, rtol=1e-5)

    naive = torch.zeros(3)  # differentiating the sampled log-ratio itself
    for i in range(3):
        log_p = torch.log_softmax(theta, 0)
        (grad,) = torch.autograd.grad(kl_coef * (log_p[i] - ref[i]), theta)
        naive += p[i] * grad
    assert naive.abs().max().item() < 1e-6 and exact.abs().max().item() > 1e-2


def test_offline_losses_refuse_bad_shapes():
    with pytest.raises(ValueError, match="k >= 2"):
        hypo_kl_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), 0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        sft_loss(torch.zeros(3), torch.zeros(3))
    assert math.isfinite(bradley_terry_loss(torch.tensor([1e4]), torch.tensor([-1e4]))[0].item())
