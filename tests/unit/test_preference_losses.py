import math

import pytest
import torch

from rebelrl.losses import chipo_loss, dpo_loss, ipo_loss


def _pair(chosen: float, rejected: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor([[chosen, rejected]], dtype=torch.float64, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------
# DPO


def test_dpo_loss_is_log_two_when_margin_is_zero():
    """Both log-ratios are 0.5, so Delta = 0 and loss = -log sigmoid(0) = log 2 = 0.693147..."""
    logps = torch.tensor([[-1.0, -3.0], [-2.0, -0.5]])
    ref = logps - 0.5
    loss, metrics = dpo_loss(logps, ref, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["dpo/reward_chosen"] == pytest.approx(0.05)
    assert metrics["dpo/reward_rejected"] == pytest.approx(0.05)
    assert metrics["dpo/margin"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["dpo/accuracy"] == 0.0


def test_dpo_loss_hand_derived():
    """beta = 0.5, log-ratios chosen (-1.0 - -2.0) = 1.0, rejected (-3.0 - -2.0) = -1.0.

    Delta = 2, beta * Delta = 1, loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617...
    rewards: chosen 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5, margin 1.0; Delta > 0 so accuracy 1.
    """
    loss, metrics = dpo_loss(_pair(-1.0, -3.0), _pair(-2.0, -2.0), beta=0.5)
    assert loss.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert metrics["dpo/reward_chosen"] == pytest.approx(0.5)
    assert metrics["dpo/reward_rejected"] == pytest.approx(-0.5)
    assert metrics["dpo/margin"] == pytest.approx(1.0)
    assert metrics["dpo/accuracy"] == 1.0


def test_dpo_loss_gradient_hand_derived():
    """Same pair as above. d/dx of -log sigmoid(x) is -sigmoid(-x), and d(beta * Delta) / d logps[0,0]
    is beta, so d loss / d logps[0,0] = -beta * sigmoid(-beta * Delta) = -0.5 * sigmoid(-1)
    = -0.5 * 0.2689414 = -0.1344707; logps[0,1] enters Delta with a minus sign: +0.1344707.
    The reference gets no gradient."""
    logps = _pair(-1.0, -3.0, requires_grad=True)
    ref = _pair(-2.0, -2.0, requires_grad=True)
    loss, _ = dpo_loss(logps, ref, beta=0.5)
    loss.backward()
    expected = 0.5 / (1.0 + math.e)  # beta * sigmoid(-1)
    assert logps.grad[0, 0].item() == pytest.approx(-expected, abs=1e-12)
    assert logps.grad[0, 1].item() == pytest.approx(expected, abs=1e-12)
    assert ref.grad is None


def test_dpo_loss_matches_a_loop_over_rows():
    g = torch.Generator().manual_seed(0)
    logps, ref = (torch.randn(64, 2, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    beta = 0.3
    loss, metrics = dpo_loss(logps, ref, beta)
    total, correct = 0.0, 0
    for b in range(64):
        delta = (logps[b, 0] - ref[b, 0]).item() - (logps[b, 1] - ref[b, 1]).item()
        total += math.log1p(math.exp(-beta * delta))
        correct += delta > 0
    assert loss.item() == pytest.approx(total / 64, rel=1e-12)
    assert metrics["dpo/accuracy"] == pytest.approx(correct / 64)


def test_dpo_loss_is_finite_for_a_badly_wrong_pair():
    """Delta = -1000, beta = 1: -log sigmoid(-1000) = 1000 + log(1 + e^-1000) = 1000 exactly in
    float32, where log(sigmoid(-1000)) would be log 0 = -inf. The gradient is -beta * sigmoid(1000)
    = -1 on the chosen log-prob."""
    logps = torch.tensor([[-1000.0, 0.0]], requires_grad=True)
    loss, _ = dpo_loss(logps, torch.zeros(1, 2), beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1000.0)
    assert logps.grad.tolist() == [[-1.0, 1.0]]


# ---------------------------------------------------------------------------------------------
# IPO


def test_ipo_loss_hand_derived_on_per_token_averages():
    """Summed log-probs over replies of 2 (chosen) and 4 (rejected) tokens.
    Chosen: (-1.0 - -2.0) / 2 = 0.5 per token; rejected: (-6.0 - -4.0) / 4 = -0.5 per token; Delta = 1.
    beta = 0.25 gives the target 1 / (2 * 0.25) = 2, loss = (1 - 2)^2 = 1.
    d loss / d logps[0,0] = 2 * (Delta - 2) / 2 = -1, d loss / d logps[0,1] = -2 * (Delta - 2) / 4 = +0.5."""
    logps = _pair(-1.0, -6.0, requires_grad=True)
    loss, metrics = ipo_loss(logps, _pair(-2.0, -4.0), beta=0.25, lengths=_pair(2.0, 4.0))
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    assert logps.grad.tolist() == [[-1.0, 0.5]]
    assert metrics["ipo/margin"] == pytest.approx(1.0)
    assert metrics["ipo/accuracy"] == 1.0


def test_ipo_loss_does_not_depend_on_reply_length():
    """The same per-token log-ratios over replies 10x longer give the same loss: the summed form
    would put the margin 10x further from the target 1 / (2 beta)."""
    short, _ = ipo_loss(_pair(-1.0, -6.0), _pair(-2.0, -4.0), 0.25, lengths=_pair(2.0, 4.0))
    long, _ = ipo_loss(_pair(-10.0, -60.0), _pair(-20.0, -40.0), 0.25, lengths=_pair(20.0, 40.0))
    assert long.item() == pytest.approx(short.item(), abs=1e-12)


def test_ipo_loss_is_zero_at_the_target_margin_and_penalises_overshoot():
    """beta = 0.1: target margin 1 / 0.2 = 5 per token. Delta = 5 gives 0; Delta = 7 gives (7 - 5)^2 = 4,
    unlike DPO, which keeps rewarding a larger margin."""
    ref, ones = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    loss_at, _ = ipo_loss(torch.tensor([[2.0, -3.0]], dtype=torch.float64), ref, beta=0.1, lengths=ones)
    loss_over, _ = ipo_loss(torch.tensor([[4.0, -3.0]], dtype=torch.float64), ref, beta=0.1, lengths=ones)
    assert loss_at.item() == pytest.approx(0.0, abs=1e-12)
    assert loss_over.item() == pytest.approx(4.0, abs=1e-12)


def test_ipo_loss_matches_a_loop_over_rows():
    g = torch.Generator().manual_seed(1)
    logps, ref = (torch.randn(32, 2, generator=g, dtype=torch.float64) for _ in range(2))
    lengths = torch.randint(1, 9, (32, 2), generator=g).double()
    beta = 0.5
    loss, _ = ipo_loss(logps, ref, beta, lengths)
    expected = sum(
        (((logps[b, 0] - ref[b, 0]) / lengths[b, 0] - (logps[b, 1] - ref[b, 1]) / lengths[b, 1]).item() - 1.0) ** 2 for b in range(32)
    ) / 32
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ipo_loss_rejects_missing_or_zero_lengths():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="token counts"):
        ipo_loss(x, x, 0.1, lengths=torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------
# chi-PO


def test_chipo_loss_is_log_two_at_the_reference():
    """log z = 0 for both: phi(1) = 1 + log 1 = 1 for both, difference 0, loss = log 2.
    The metrics: implicit rewards beta * phi = 0.5 each, margin 0, accuracy 0."""
    logps = torch.tensor([[-4.0, -7.0]])
    loss, metrics = chipo_loss(logps, logps.clone(), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["chipo/reward_chosen"] == pytest.approx(0.5)
    assert metrics["chipo/reward_rejected"] == pytest.approx(0.5)
    assert metrics["chipo/margin"] == pytest.approx(0.0)
    assert metrics["chipo/accuracy"] == 0.0
    assert metrics["chipo/clipped_frac"] == 0.0 and metrics["chipo/overflow_frac"] == 0.0


def test_chipo_loss_hand_derived():
    """beta = 1, log z+ = log 2, log z- = 0.

    phi(2) - phi(1) = (2 + log 2) - (1 + 0) = 1 + log 2 = 1.6931472;
    loss = log(1 + exp(-(1 + log 2))) = log(1 + 1 / (2e)) = 0.1688476...
    Gradients, with s = sigmoid(-(1 + log 2)) = 1 / (1 + 2e) = 0.1553624 and d phi(e^u) / du = e^u + 1:
      d loss / d logps[0,0] = -s * (2 + 1) = -3 / (1 + 2e) = -0.4660872
      d loss / d logps[0,1] = +s * (1 + 1) = 2 / (1 + 2e) = 0.3107248
    """
    logps = _pair(math.log(2), 0.0, requires_grad=True)
    loss, metrics = chipo_loss(logps, _pair(0.0, 0.0), beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log1p(1 / (2 * math.e)), abs=1e-12)
    assert loss.item() == pytest.approx(0.1688476234983058, abs=1e-12)
    assert logps.grad[0, 0].item() == pytest.approx(-3 / (1 + 2 * math.e), abs=1e-12)
    assert logps.grad[0, 1].item() == pytest.approx(2 / (1 + 2 * math.e), abs=1e-12)
    assert metrics["chipo/reward_chosen"] == pytest.approx(2 + math.log(2))
    assert metrics["chipo/reward_rejected"] == pytest.approx(1.0)
    assert metrics["chipo/margin"] == pytest.approx(1 + math.log(2))
    assert metrics["chipo/accuracy"] == 1.0


def test_chipo_gradient_at_the_reference_is_dpo_with_twice_beta():
    """At log z = 0, d phi(e^u) / du = e^0 + 1 = 2 while d log z / du = 1, so the chi-PO gradient
    is -beta * sigmoid(0) * 2 = -beta, the DPO gradient with 2 * beta: -2 * beta * sigmoid(0)."""
    beta = 0.3
    a = _pair(-2.0, -5.0, requires_grad=True)
    b = _pair(-2.0, -5.0, requires_grad=True)
    ref = _pair(-2.0, -5.0)
    chipo_loss(a, ref, beta)[0].backward()
    dpo_loss(b, ref, 2 * beta)[0].backward()
    assert a.grad[0, 0].item() == pytest.approx(-beta, abs=1e-12)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_chipo_loss_near_the_reference_is_close_to_dpo_with_twice_beta():
    """phi(e^u) - phi(e^v) = 2 (u - v) + (u^2 - v^2) / 2 + ..., so for log-ratios of size eps the two
    losses differ by O(eps^2)."""
    g = torch.Generator().manual_seed(2)
    logps, ref = (torch.randn(16, 2, generator=g, dtype=torch.float64) for _ in range(2))
    for eps in (1e-2, 1e-3):
        near = ref + eps * logps
        chipo, _ = chipo_loss(near, ref, beta=0.5)
        dpo, _ = dpo_loss(near, ref, beta=1.0)
        assert abs(chipo.item() - dpo.item()) < 10 * eps**2


def test_chipo_loss_matches_a_loop_over_rows():
    g = torch.Generator().manual_seed(3)
    logps, ref = (torch.randn(32, 2, generator=g, dtype=torch.float64) for _ in range(2))
    beta = 0.2
    loss, _ = chipo_loss(logps, ref, beta)
    total = 0.0
    for b in range(32):
        u = (logps[b, 0] - ref[b, 0]).item()
        v = (logps[b, 1] - ref[b, 1]).item()
        margin = beta * ((math.exp(u) + u) - (math.exp(v) + v))
        total += math.log1p(math.exp(-margin))
    assert loss.item() == pytest.approx(total / 32, rel=1e-12)


def test_chipo_margin_clip_of_the_paper():
    """Algorithm 1 clips beta * (phi+ - phi-) to [-2 R_max, 2 R_max]. beta = 1, log z+ = log 2,
    log z- = 0: the margin 1 + log 2 = 1.693 is clipped to 2 * 0.5 = 1 with r_max = 0.5, so
    loss = log(1 + e^-1) = 0.3132617 and no gradient passes; with r_max = 1 (clip at 2) nothing is
    clipped and the loss is the unclipped 0.1688476 of the hand-derived case above."""
    logps = _pair(math.log(2), 0.0, requires_grad=True)
    loss, metrics = chipo_loss(logps, _pair(0.0, 0.0), beta=1.0, r_max=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-12)
    assert logps.grad.tolist() == [[0.0, 0.0]]
    assert metrics["chipo/clipped_frac"] == 1.0 and metrics["chipo/margin"] == pytest.approx(1.0)
    wide, metrics = chipo_loss(_pair(math.log(2), 0.0), _pair(0.0, 0.0), beta=1.0, r_max=1.0)
    assert wide.item() == pytest.approx(0.1688476234983058, abs=1e-12)
    assert metrics["chipo/clipped_frac"] == 0.0
    low, _ = chipo_loss(_pair(0.0, math.log(2)), _pair(0.0, 0.0), beta=1.0, r_max=0.5)  # clipped at -1
    assert low.item() == pytest.approx(math.log1p(math.e), abs=1e-12)


def test_chipo_loss_stays_finite_for_a_huge_log_ratio_on_the_rejected_side():
    """log z- = 1000 (exp would overflow), log z+ = 0, beta = 1, no clip. Past the overflow guard
    z = e^80: margin = phi(1) - (e^80 + 1000), loss = -log sigmoid(margin) = -margin = e^80 + 999 up
    to float32 rounding. Since sigmoid(-margin) = 1:
      d loss / d logps[0,0] = -(e^0 + 1) = -2
      d loss / d logps[0,1] = +1 (past the guard only the log z term passes gradient)
    """
    logps = torch.tensor([[0.0, 1000.0]], requires_grad=True)
    loss, metrics = chipo_loss(logps, torch.zeros(1, 2), beta=1.0)
    loss.backward()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(math.exp(80) + 999, rel=1e-6)
    assert logps.grad.tolist() == [[-2.0, 1.0]]
    assert metrics["chipo/overflow_frac"] == 0.5
    assert all(math.isfinite(v) for v in metrics.values())


def test_chipo_loss_stays_finite_for_a_huge_log_ratio_on_the_chosen_side():
    """log z+ = 1000: the margin is about e^80, so loss = log(1 + e^-margin) = 0 and the gradients
    are 0, all finite."""
    logps = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    loss, _ = chipo_loss(logps, torch.zeros(1, 2), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logps.grad).all()


def test_chipo_loss_in_bf16_computes_in_float32():
    """log z+ = log 2 in bf16 (rounded to 0.69140625), beta = 1: computed in float32, the loss is
    the float32 value on the rounded input, and the gradient comes back in bf16."""
    u = torch.tensor(math.log(2), dtype=torch.bfloat16).item()
    logps = torch.tensor([[u, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = chipo_loss(logps, torch.zeros(1, 2, dtype=torch.bfloat16), beta=1.0)
    loss.backward()
    margin = (math.exp(u) + u) - 1.0
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-6)
    assert logps.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Argument checks


def _ipo_with_unit_lengths(logps, ref_logps, beta):
    return ipo_loss(logps, ref_logps, beta, torch.ones(logps.shape) if logps.dim() == 2 and logps.shape[-1] == 2 else torch.ones(4, 2))


LOSSES = [dpo_loss, _ipo_with_unit_lengths, chipo_loss]


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize("shape", [(4,), (4, 3), (2, 2, 2), (4, 1)])
def test_preference_losses_reject_non_pair_shapes(loss_fn, shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        loss_fn(x, x, 0.1)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_preference_losses_reject_mismatched_shapes(loss_fn):
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        loss_fn(torch.zeros(4, 2), torch.zeros(3, 2), 0.1)


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_preference_losses_reject_non_positive_beta(loss_fn, beta):
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="beta > 0"):
        loss_fn(x, x, beta)
