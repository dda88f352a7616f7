import pytest
import torch

from rebelrl.losses import rebel_loss


def test_rebel_loss_hand_derived():
    """Two pairs, eta = 2.

    pair 0: log-ratios (-1.0 - -1.5, -2.0 - -2.0) = (0.5, 0.0) -> predicted 0.5;
            target 2 * (1.0 - 0.25) = 1.5; residual -1.0; squared 1.0
    pair 1: log-ratios (-0.5 - -0.25, -1.0 - -1.5) = (-0.25, 0.5) -> predicted -0.75;
            target 2 * (0.0 - 0.5) = -1.0; residual 0.25; squared 0.0625
    loss = (1.0 + 0.0625) / 2 = 0.53125
    """
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -1.0]])
    old = torch.tensor([[-1.5, -2.0], [-0.25, -1.5]])
    rewards = torch.tensor([[1.0, 0.25], [0.0, 0.5]])
    loss, metrics = rebel_loss(logps, old, rewards, eta=2.0)
    assert loss.item() == pytest.approx(0.53125, abs=1e-7)
    assert metrics["rebel/predicted_mean"] == pytest.approx((0.5 - 0.75) / 2)
    assert metrics["rebel/target_mean"] == pytest.approx((1.5 - 1.0) / 2)
    assert metrics["rebel/residual_abs"] == pytest.approx((1.0 + 0.25) / 2)


def test_rebel_loss_matches_formula_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    logps, old, rewards = (torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(3))
    eta = 0.7
    loss, _ = rebel_loss(logps, old, rewards, eta)
    expected = sum(
        ((logps[b, 0] - old[b, 0]) - (logps[b, 1] - old[b, 1]) - eta * (rewards[b, 0] - rewards[b, 1])) ** 2 for b in range(64)
    ) / 64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_rebel_loss_gradient_hand_derived():
    """One pair, eta = 1: residual r = (a - 0) - (b - 0) - (1 - 0) with a = 0.5, b = 0 -> r = -0.5;
    d loss / d a = 2 r = -1.0, d loss / d b = -2 r = 1.0; old log-probs get no gradient."""
    logps = torch.tensor([[0.5, 0.0]], requires_grad=True)
    old = torch.zeros(1, 2, requires_grad=True)
    loss, _ = rebel_loss(logps, old, torch.tensor([[1.0, 0.0]]), eta=1.0)
    loss.backward()
    assert logps.grad.tolist() == [[-1.0, 1.0]]
    assert old.grad is None


def test_rebel_loss_is_zero_when_log_ratios_fit_the_rewards():
    old = torch.tensor([[-3.0, -4.0]])
    rewards = torch.tensor([[0.3, 0.1]])
    logps = old + torch.tensor([[0.5 * 0.2, 0.0]])  # eta * reward gap
    loss, _ = rebel_loss(logps, old, rewards, eta=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(4,), (4, 3), (2, 2, 2)])
def test_rebel_loss_rejects_non_pair_shapes(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        rebel_loss(x, x, x, 1.0)
