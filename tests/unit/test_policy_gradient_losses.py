import math
from functools import partial

import pytest
import torch

from rebelrl.losses import (
    astar_po_loss,
    clipped_policy_loss,
    grpo_loss,
    rloo_loss,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
    value_loss,
)


def _t(rows, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def _close(tensor: torch.Tensor, rows) -> bool:
    return torch.allclose(tensor, _t(rows), rtol=0.0, atol=1e-12)


def _random_token_batch(seed: int, n: int = 6, t_len: int = 5):
    """Random (N, T) logps, old_logps, ref_logps, token advantages and a right-padded mask whose rows
    have different lengths (one of them T, none empty)."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, t_len, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(n, t_len, generator=g, dtype=torch.float64)
    ref = logps + 0.4 * torch.randn(n, t_len, generator=g, dtype=torch.float64)
    advantages = torch.randn(n, t_len, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t_len + 1, (n,), generator=g)
    lengths[0] = t_len
    mask = (torch.arange(t_len).unsqueeze(0) < lengths.unsqueeze(1)).double()
    return logps, old, ref, advantages, mask


# ---------------------------------------------------------------------------------------------
# PPO-clip surrogate


def test_clipped_policy_loss_hand_derived_clips_on_both_sides():
    """old log-probs 0, so ratio = exp(logps); clip_eps = 0.2 (ratio kept in [0.8, 1.2]); token mean.
      t0: ratio 1.5, A = +1: min(1.5, 1.2) = 1.2   -> l = -1.2, clipped (high side): no gradient
      t1: ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> l =  0.8, clipped (low side): no gradient
      t2: ratio 0.5, A = +2: min(1.0, 1.6) = 1.0    -> l = -1.0, unclipped: dl/dlogp = -ratio * A = -1
      t3: ratio 1.5, A = -2: min(-3.0, -2.4) = -3.0 -> l =  3.0, unclipped: dl/dlogp = -ratio * A = +3
      t4: padding (ratio e^5, A = 10): ignored.
    loss = (-1.2 + 0.8 - 1.0 + 3.0) / 4 = 0.4; gradients (0, 0, -1/4, 3/4, 0).
    Metrics: clip_frac_low = clip_frac_high = 1/4; ratio mean (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1, max 1.5;
    approx KL = mean of ratio - 1 - log ratio = (2 (0.5 - log 1.5) + 2 (-0.5 + log 2)) / 4
    = log(4/3) / 2 = 0.1438410."""
    logps = _t([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), 5.0]], requires_grad=True)
    old = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    advantages = _t([[1.0, -1.0, 2.0, -2.0, 10.0]])
    mask = _t([[1, 1, 1, 1, 0]])
    loss, metrics = clipped_policy_loss(logps, old, advantages, mask, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.4, abs=1e-12)
    assert _close(logps.grad, [[0.0, 0.0, -0.25, 0.75, 0.0]])
    assert old.grad is None
    assert metrics["policy/clip_frac_low"] == 0.25
    assert metrics["policy/clip_frac_high"] == 0.25
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0)
    assert metrics["policy/ratio_max"] == pytest.approx(1.5)
    assert metrics["policy/approx_kl"] == pytest.approx(math.log(4 / 3) / 2, abs=1e-12)


def test_clip_eps_high_widens_only_the_upper_side():
    """Ratios (1.25, 0.75), advantages (+1, -1), clip_eps = 0.2.
    Symmetric clip: t0 min(1.25, 1.2) = 1.2 clipped; t1 min(-0.75, -0.8) = -0.8 clipped:
      loss = (-1.2 + 0.8) / 2 = -0.2, no gradient anywhere, both sides clipped.
    clip_eps_high = 0.28 (DAPO): t0 min(1.25, 1.25) = 1.25 unclipped, gradient -1.25 / 2 = -0.625;
      t1 still clipped at 0.8: loss = (-1.25 + 0.8) / 2 = -0.225."""
    ratios = [[math.log(1.25), math.log(0.75)]]
    advantages, mask, old = _t([[1.0, -1.0]]), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.float64)
    logps = _t(ratios, requires_grad=True)
    loss, metrics = clipped_policy_loss(logps, old, advantages, mask, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-0.2, abs=1e-12)
    assert logps.grad.tolist() == [[0.0, 0.0]]
    assert metrics["policy/clip_frac_high"] == 0.5 and metrics["policy/clip_frac_low"] == 0.5
    logps = _t(ratios, requires_grad=True)
    loss, metrics = clipped_policy_loss(logps, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    loss.backward()
    assert loss.item() == pytest.approx(-0.225, abs=1e-12)
    assert _close(logps.grad, [[-0.625, 0.0]])
    assert metrics["policy/clip_frac_high"] == 0.0 and metrics["policy/clip_frac_low"] == 0.5


def test_the_three_aggregations_hand_derived():
    """On-policy (ratio 1), so each token's loss is -A. Row 0 has 1 token with A = 4, row 1 has 3
    tokens with A = 1 ((N,) sequence advantages broadcast to the tokens).
      token_mean:              -(4 + 1 + 1 + 1) / 4 tokens              = -1.75
      seq_mean_token_mean:     -(4/1 + 3/3) / 2 rows                    = -2.5
      seq_mean_token_sum_norm: -(4/3 + 3/3) / 2 rows, max_len 3         = -7/6
    Gradients on the real tokens (-A times the token's weight):
      token_mean: row 0 -4/4 = -1, row 1 -1/4 each; seq_mean_token_mean: row 0 -4/2 = -2, row 1
      -1/(3*2) = -1/6 each; seq_mean_token_sum_norm: row 0 -4/6 = -2/3, row 1 -1/6 each."""
    base = _t([[-1.0, 0.0, 0.0], [-2.0, -0.5, -0.1]])
    mask = _t([[1, 0, 0], [1, 1, 1]])
    advantages = _t([4.0, 1.0])
    cases = [
        (token_mean, -1.75, [[-1.0, 0, 0], [-0.25] * 3]),
        (seq_mean_token_mean, -2.5, [[-2.0, 0, 0], [-1 / 6] * 3]),
        (partial(seq_mean_token_sum_norm, max_len=3), -7 / 6, [[-2 / 3, 0, 0], [-1 / 6] * 3]),
    ]
    for aggregate, expected_loss, expected_grad in cases:
        logps = base.clone().requires_grad_(True)
        loss, _ = clipped_policy_loss(logps, base, advantages, mask, aggregate=aggregate)
        loss.backward()
        assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
        assert _close(logps.grad, expected_grad)


def _clipped_loop(logps, old, advantages, mask, clip_eps, clip_eps_high):
    """Per-token PPO-clip on python floats; returns per-token losses and the row lengths."""
    per_token, lengths = [], []
    for i in range(len(logps)):
        row = []
        for t in range(len(logps[i])):
            if mask[i][t]:
                ratio = math.exp(logps[i][t] - old[i][t])
                clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps_high)
                row.append(-min(ratio * advantages[i][t], clipped * advantages[i][t]))
        per_token.append(row)
        lengths.append(len(row))
    return per_token, lengths


def test_clipped_policy_loss_matches_a_loop_for_each_aggregation():
    logps, old, _, advantages, mask = _random_token_batch(0)
    per_token, lengths = _clipped_loop(logps.tolist(), old.tolist(), advantages.tolist(), mask.tolist(), 0.2, 0.28)
    n, t_len = logps.shape
    expected = {
        "token_mean": sum(map(sum, per_token)) / sum(lengths),
        "seq_mean_token_mean": sum(sum(row) / len(row) for row in per_token) / n,
        "seq_mean_token_sum_norm": sum(sum(row) / t_len for row in per_token) / n,
    }
    reducers = {
        "token_mean": token_mean,
        "seq_mean_token_mean": seq_mean_token_mean,
        "seq_mean_token_sum_norm": partial(seq_mean_token_sum_norm, max_len=t_len),
    }
    for name, aggregate in reducers.items():
        loss, _ = clipped_policy_loss(logps, old, advantages, mask, 0.2, 0.28, aggregate=aggregate)
        assert loss.item() == pytest.approx(expected[name], rel=1e-12), name


def test_clipped_policy_loss_in_bf16_computes_in_float32():
    """bf16 inputs: the ratio and the loss are float32 (loss dtype float32), the gradient comes back
    in bf16. logps = log 2 rounded to bf16 (0.69140625), A = -1, on-policy old = 0.69140625 - 0.25:
    ratio e^0.25 = 1.2840 > 1.2 with A < 0, so unclipped: loss = e^0.25 = 1.2840254."""
    u = torch.tensor(math.log(2), dtype=torch.bfloat16)
    logps = u.reshape(1, 1).clone().requires_grad_(True)
    old = (u - 0.25).reshape(1, 1)
    loss, _ = clipped_policy_loss(logps, old, -torch.ones(1, 1, dtype=torch.bfloat16), torch.ones(1, 1))
    loss.backward()
    ratio = math.exp(u.item() - old.item())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ratio, rel=1e-6)
    assert logps.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# GRPO


def test_grpo_loss_hand_derived_with_the_k3_penalty():
    """One completion of 2 tokens, on-policy (logps = old = 0), A = 1, beta = 0.1, ref = (log 2, 0).
    k3 per token: u = ref - logp: t0 e^{log 2} - log 2 - 1 = 1 - log 2 = 0.3068528, t1 0.
    Per-token loss -A + beta k3: (-1 + 0.0306853, -1); mean over the 2 tokens (then over 1 row):
      loss = (-2 + 0.1 (1 - log 2)) / 2 = -0.95 - 0.05 log 2 = -0.9846574.
    Gradient: the surrogate gives -ratio A = -1 per token; d k3 / d logp = 1 - e^{ref - logp}, i.e.
    1 - 2 = -1 on t0 and 0 on t1. So (-1 + 0.1 * -1, -1) / 2 = (-0.55, -0.5).
    grpo/kl = mean k3 = (1 - log 2) / 2 = 0.1534264."""
    logps = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref = _t([[math.log(2), 0.0]], requires_grad=True)
    loss, metrics = grpo_loss(logps, torch.zeros(1, 2), ref, _t([1.0]), torch.ones(1, 2), beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-0.95 - 0.05 * math.log(2), abs=1e-12)
    assert _close(logps.grad, [[-0.55, -0.5]])
    assert ref.grad is None
    assert metrics["grpo/kl"] == pytest.approx((1 - math.log(2)) / 2, abs=1e-12)


def test_grpo_loss_without_kl_is_the_clipped_loss_with_the_sequence_mean():
    logps, old, ref, advantages, mask = _random_token_batch(1)
    seq_adv = advantages[:, 0]  # (N,) sequence advantages, as GRPO uses
    grpo, metrics = grpo_loss(logps, old, ref, seq_adv, mask, beta=0.0)
    ppo, ppo_metrics = clipped_policy_loss(logps, old, seq_adv, mask, aggregate=seq_mean_token_mean)
    assert grpo.item() == pytest.approx(ppo.item(), rel=1e-12)
    assert metrics["grpo/clip_frac_low"] == ppo_metrics["policy/clip_frac_low"]
    assert metrics["grpo/kl"] > 0  # reported even when beta is 0


def test_grpo_loss_matches_a_loop():
    """Per-sequence token mean of -min(ratio A, clip(ratio) A) + beta k3, then the mean over rows."""
    logps, old, ref, advantages, mask = _random_token_batch(2)
    beta = 0.04
    seq_adv = advantages[:, 0]
    loss, _ = grpo_loss(logps, old, ref, seq_adv, mask, clip_eps=0.2, beta=beta)
    broadcast = seq_adv.unsqueeze(1).expand_as(logps).tolist()
    per_token, _ = _clipped_loop(logps.tolist(), old.tolist(), broadcast, mask.tolist(), 0.2, 0.2)
    total = 0.0
    for i, row in enumerate(per_token):
        u = [ref[i, t].item() - logps[i, t].item() for t in range(len(row))]
        kl = [math.exp(x) - x - 1 for x in u]
        total += sum(l + beta * k for l, k in zip(row, kl)) / len(row)
    assert loss.item() == pytest.approx(total / len(per_token), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# RLOO


def test_rloo_loss_hand_derived_with_a_sequence_level_ratio():
    """clip_eps = 0.2. Sequence 0: token log-ratios (log 2, log 0.75) sum to log 1.5, ratio 1.5,
    A = +1: min(1.5, 1.2) = 1.2 clipped, l = -1.2, no gradient. (A per-token ratio would have clipped
    only the first token: the sequence ratio is what TRL's RLOO clips.)
    Sequence 1: token log-ratios (log 0.5, 0) and a padded token: ratio 0.5, A = +2:
    min(1.0, 1.6) = 1.0, l = -1.0; d l / d logps = -ratio A = -1 on each real token.
    loss = (-1.2 - 1.0) / 2 = -1.1; gradients (0, 0, 0) and (-0.5, -0.5, 0).
    Metrics over sequences: clip_frac_high 1/2, low 0, ratio mean 1, max 1.5."""
    logps = _t([[math.log(2), math.log(0.75), 0.0], [math.log(0.5), 0.0, 7.0]], requires_grad=True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = _t([[1, 1, 0], [1, 1, 0]])
    loss, metrics = rloo_loss(logps, old, _t([1.0, 2.0]), mask, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.1, abs=1e-12)
    assert _close(logps.grad, [[0.0, 0.0, 0.0], [-0.5, -0.5, 0.0]])
    assert metrics["rloo/clip_frac_high"] == 0.5 and metrics["rloo/clip_frac_low"] == 0.0
    assert metrics["rloo/ratio_mean"] == pytest.approx(1.0)
    assert metrics["rloo/ratio_max"] == pytest.approx(1.5)


def test_rloo_loss_on_policy_is_reinforce_with_the_advantage_on_every_token():
    """ratio 1 everywhere: d loss / d logps[n, t] = -A_n / N on real tokens, 0 on padding."""
    logps, _, _, _, mask = _random_token_batch(3)
    advantages = torch.randn(logps.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaf = logps.clone().requires_grad_(True)
    loss, metrics = rloo_loss(leaf, logps, advantages, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-12)
    assert torch.allclose(leaf.grad, -advantages.unsqueeze(1) * mask / logps.shape[0], atol=1e-12)
    assert metrics["rloo/approx_kl"] == 0.0


def test_rloo_loss_matches_a_loop():
    logps, old, _, advantages, mask = _random_token_batch(4)
    seq_adv = advantages[:, 0]
    loss, _ = rloo_loss(logps, old, seq_adv, mask, clip_eps=0.2)
    total = 0.0
    for i in range(logps.shape[0]):
        log_ratio = sum(logps[i, t].item() - old[i, t].item() for t in range(logps.shape[1]) if mask[i, t])
        ratio, a = math.exp(log_ratio), seq_adv[i].item()
        total += -min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
    assert loss.item() == pytest.approx(total / logps.shape[0], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Value loss


def test_value_loss_hand_derived_clips_on_both_sides():
    """clip_eps_value = 0.2; per token 0.5 * max((v - R)^2, (v_clip - R)^2), v_clip = old + clip(v - old).
      t0: v 1.5, old 1.0, R 2.0: v_clip 1.2; (0.5)^2 = 0.25 vs (0.8)^2 = 0.64 -> 0.64, clipped: no gradient
      t1: v 0.5, old 1.0, R 0.0: v_clip 0.8; 0.25 vs 0.64 -> 0.64, clipped (low side): no gradient
      t2: v 1.5, old 1.0, R 0.0: v_clip 1.2; 2.25 vs 1.44 -> 2.25, unclipped: grad 0.5 * 2 * 1.5 = 1.5
      t3: v 1.1, old 1.0, R 2.1: inside the range; 1 vs 1 -> 1, grad 0.5 * 2 * (1.1 - 2.1) = -1
      t4: padding.
    loss = 0.5 * (0.64 + 0.64 + 2.25 + 1) / 4 = 0.56625; gradients (0, 0, 1.5, -1) / 4 = (0, 0, 0.375, -0.25).
    clip_frac 2/4; error = mean (v - R)^2 = (0.25 + 0.25 + 2.25 + 1) / 4 = 0.9375.
    Without the clip: 0.5 * 0.9375 = 0.46875, gradients (v - R) / 4 = (-0.125, 0.125, 0.375, -0.25)."""
    v = [[1.5, 0.5, 1.5, 1.1, 9.0]]
    old, returns, mask = _t([[1.0, 1.0, 1.0, 1.0, 0.0]]), _t([[2.0, 0.0, 0.0, 2.1, -9.0]]), _t([[1, 1, 1, 1, 0]])
    values = _t(v, requires_grad=True)
    loss, metrics = value_loss(values, old, returns, mask, clip_eps_value=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.56625, abs=1e-12)
    assert _close(values.grad, [[0.0, 0.0, 0.375, -0.25, 0.0]])
    assert metrics["value/clip_frac"] == 0.5
    assert metrics["value/error"] == pytest.approx(0.9375, abs=1e-12)
    values = _t(v, requires_grad=True)
    loss, metrics = value_loss(values, old, returns, mask, clip_eps_value=None)
    loss.backward()
    assert loss.item() == pytest.approx(0.46875, abs=1e-12)
    assert _close(values.grad, [[-0.125, 0.125, 0.375, -0.25, 0.0]])
    assert metrics["value/clip_frac"] == 0.0


def test_token_losses_ignore_non_finite_padding():
    """Padding may hold -inf or inf log-probs and values (a masked multiply would give inf * 0 = nan):
    the losses, metrics and gradients equal those of the same batch with zeros on the padding."""
    logps, old, ref, advantages, mask = _random_token_batch(8)
    pad = mask == 0
    assert pad.any()
    inf = float("inf")
    dirty = {
        "logps": logps.masked_fill(pad, inf),
        "old": old.masked_fill(pad, -inf),
        "ref": ref.masked_fill(pad, -inf),
        "advantages": advantages.masked_fill(pad, float("nan")),
    }
    clean = {"logps": logps, "old": old, "ref": ref, "advantages": advantages}
    clean = {name: x.masked_fill(pad, 0.0) for name, x in clean.items()}

    def run(batch):
        leaf = batch["logps"].clone().requires_grad_(True)
        results = [
            clipped_policy_loss(leaf, batch["old"], batch["advantages"], mask),
            grpo_loss(leaf, batch["old"], batch["ref"], batch["advantages"], mask, beta=0.1),
            rloo_loss(leaf, batch["old"], batch["advantages"][:, 0], mask),
            value_loss(leaf, batch["old"], batch["advantages"], mask),
        ]
        sum(loss for loss, _ in results).backward()
        return [loss.item() for loss, _ in results], [m for _, m in results], leaf.grad

    dirty_losses, dirty_metrics, dirty_grad = run(dirty)
    clean_losses, clean_metrics, clean_grad = run(clean)
    assert all(math.isfinite(x) for x in dirty_losses)
    assert dirty_losses == pytest.approx(clean_losses, rel=1e-12)
    assert dirty_metrics == clean_metrics
    assert torch.isfinite(dirty_grad).all() and torch.equal(dirty_grad, clean_grad)


# ---------------------------------------------------------------------------------------------
# Micro-batching: two half-batches with the right weights reproduce the full batch


def _loss_and_grad(fn, leaf_value, split, weights):
    leaf = leaf_value.clone().requires_grad_(True)
    if split is None:
        loss = fn(leaf, slice(None))
    else:
        loss = weights[0] * fn(leaf, slice(0, split)) + weights[1] * fn(leaf, slice(split, None))
    loss.backward()
    return loss.item(), leaf.grad


def test_token_mean_micro_batches_weighted_by_token_counts_equal_the_full_batch():
    """token_mean divides by the batch's token count. Micro-batch j's loss is a mean over its own
    tokens, so the loop must weight it by tokens_j / tokens_total: sum_j (tokens_j / total) *
    (S_j / tokens_j) = sum_j S_j / total. Equal weights (1/2) are wrong when the halves differ in
    tokens, which the random masks make sure of."""
    logps, old, ref, advantages, mask = _random_token_batch(5, n=6, t_len=7)
    tokens = mask.sum()
    halves = (mask[:3].sum() / tokens, mask[3:].sum() / tokens)
    assert halves[0] != 0.5

    def ppo(leaf, rows):
        return clipped_policy_loss(leaf[rows], old[rows], advantages[rows], mask[rows], clip_eps_high=0.28)[0]

    def grpo(leaf, rows):
        seq_adv = advantages[rows, 0]
        return grpo_loss(leaf[rows], old[rows], ref[rows], seq_adv, mask[rows], beta=0.1, aggregate=token_mean)[0]

    def value(leaf, rows):
        return value_loss(leaf[rows], old[rows], advantages[rows], mask[rows])[0]

    for fn in (ppo, grpo, value):
        full_loss, full_grad = _loss_and_grad(fn, logps, None, None)
        acc_loss, acc_grad = _loss_and_grad(fn, logps, 3, halves)
        naive_loss, _ = _loss_and_grad(fn, logps, 3, (0.5, 0.5))
        assert acc_loss == pytest.approx(full_loss, rel=1e-12)
        assert torch.allclose(acc_grad, full_grad, atol=1e-14)
        assert naive_loss != pytest.approx(full_loss, rel=1e-6)


def test_sequence_mean_micro_batches_weighted_by_row_counts_equal_the_full_batch():
    """seq_mean_token_mean, seq_mean_token_sum_norm and rloo_loss average over completions, so the
    weight of a micro-batch is rows_j / rows_total (here 2/6 and 4/6), whatever its token count."""
    logps, old, ref, advantages, mask = _random_token_batch(6, n=6, t_len=7)
    weights = (2 / 6, 4 / 6)

    def grpo(leaf, rows):
        return grpo_loss(leaf[rows], old[rows], ref[rows], advantages[rows, 0], mask[rows], beta=0.1)[0]

    def dr_grpo(leaf, rows):
        aggregate = partial(seq_mean_token_sum_norm, max_len=7)
        return grpo_loss(leaf[rows], old[rows], ref[rows], advantages[rows, 0], mask[rows], aggregate=aggregate)[0]

    def rloo(leaf, rows):
        return rloo_loss(leaf[rows], old[rows], advantages[rows, 0], mask[rows])[0]

    for fn in (grpo, dr_grpo, rloo):
        full_loss, full_grad = _loss_and_grad(fn, logps, None, None)
        acc_loss, acc_grad = _loss_and_grad(fn, logps, 2, weights)
        naive_loss, _ = _loss_and_grad(fn, logps, 2, (0.5, 0.5))
        assert acc_loss == pytest.approx(full_loss, rel=1e-12)
        assert torch.allclose(acc_grad, full_grad, atol=1e-14)
        assert naive_loss != pytest.approx(full_loss, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# A*-PO


def test_astar_po_loss_hand_derived():
    """beta2 = 0.5.
      row 0: log-ratio -1 - -3 = 2, implicit 0.5 * 2 = 1; target r - V = 1 - 0.25 = 0.75; residual 0.25
      row 1: log-ratio 0, implicit 0; target 0 - 0.5 = -0.5; residual 0.5
    loss = (0.0625 + 0.25) / 2 = 0.15625;
    d loss / d logps[b] = 2 * residual * beta2 / B: (2 * 0.25 * 0.5 / 2, 2 * 0.5 * 0.5 / 2) = (0.125, 0.25).
    The reference log-probs and V* get no gradient."""
    logps = _t([-1.0, -2.0], requires_grad=True)
    ref = _t([-3.0, -2.0], requires_grad=True)
    values = _t([0.25, 0.5], requires_grad=True)
    loss, metrics = astar_po_loss(logps, ref, _t([1.0, 0.0]), values, beta2=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.15625, abs=1e-12)
    assert logps.grad.tolist() == pytest.approx([0.125, 0.25], abs=1e-12)
    assert ref.grad is None and values.grad is None
    assert metrics["astar/implicit_advantage"] == pytest.approx(0.5)
    assert metrics["astar/target_advantage"] == pytest.approx(0.125)
    assert metrics["astar/residual_abs"] == pytest.approx(0.375)
    assert metrics["astar/log_ratio"] == pytest.approx(1.0)


def test_astar_po_loss_is_zero_at_the_optimal_log_ratio_and_matches_a_loop():
    """log pi/pi_ref = (r - V*) / beta2 is the minimiser: loss 0 there (default beta2 = 1e-3)."""
    g = torch.Generator().manual_seed(7)
    ref, rewards, values, logps = (torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4))
    at_optimum, _ = astar_po_loss(ref + (rewards - values) / 1e-3, ref, rewards, values)
    assert at_optimum.item() == pytest.approx(0.0, abs=1e-18)
    loss, _ = astar_po_loss(logps, ref, rewards, values, beta2=0.3)
    expected = sum((0.3 * (logps[b] - ref[b]).item() - (rewards[b] - values[b]).item()) ** 2 for b in range(16)) / 16
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Argument checks


def test_token_losses_reject_bad_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        clipped_policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="old_logps"):
        clipped_policy_loss(x, torch.zeros(2, 4), x, x)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(x, x, torch.zeros(3, 3), torch.zeros(2), x)
    with pytest.raises(ValueError, match=r"\(N,\) sequence advantages"):
        rloo_loss(x, x, x, x)
    with pytest.raises(ValueError, match="returns"):
        value_loss(x, x, torch.zeros(2), x)
    with pytest.raises(ValueError, match=r"four \(B,\) tensors"):
        astar_po_loss(x, x, x, x)


def test_losses_reject_bad_coefficients():
    x = torch.zeros(2, 3)
    for kwargs in ({"clip_eps": 0.0}, {"clip_eps": 1.0}, {"clip_eps_high": -0.1}):
        with pytest.raises(ValueError, match="clip_eps"):
            clipped_policy_loss(x, x, x, x, **kwargs)
    with pytest.raises(ValueError, match="beta >= 0"):
        grpo_loss(x, x, x, torch.zeros(2), x, beta=-0.1)
    with pytest.raises(ValueError, match="clip_eps_value > 0"):
        value_loss(x, x, x, x, clip_eps_value=0.0)
    with pytest.raises(ValueError, match="max_len >= 1"):
        seq_mean_token_sum_norm(x, x, max_len=0)
    with pytest.raises(ValueError, match="beta2 > 0"):
        astar_po_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta2=0.0)
