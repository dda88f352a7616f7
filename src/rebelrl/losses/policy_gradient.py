"""Token-level clipped policy-gradient losses: PPO, GRPO (and Dr. GRPO, DAPO's token mean), RLOO.

Every tensor is a token batch ``(N, T)``: N completions, T completion positions, with a ``(N, T)``
mask that is 1 on the completion's tokens and 0 on padding; padding may hold anything, even
non-finite values, and is selected away rather than multiplied by 0. ``old_logps`` come from the
policy that sampled the batch (pi_t) and ``ref_logps`` from the frozen reference; both are treated
as constants.
The arithmetic runs in at least float32 whatever the input dtype (the ratio is an exponential).

How a per-token loss becomes one number is an explicit argument, ``aggregate``, one of the reducers
below (or any callable ``(per_token (N, T), mask (N, T)) -> scalar``). Micro-batching is exact when
the loop multiplies each micro-batch's loss by the weight the reducer's docstring gives before
summing (gradients add the same way).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rebelrl.losses.advantages import _on_tokens, kl_k3

Aggregate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Loss aggregation (names as verl's ``loss_agg_mode``)


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over every unmasked token of the batch: ``sum(x * mask) / sum(mask)``.

    PPO's masked mean (TRL ``PPOTrainer``, verl's default "token-mean"), DAPO's token-level loss
    (Yu et al., 2025, Sec. 3.3) and TRL's GRPO ``loss_type="bnpo"``: a long completion weighs in
    proportion to its length. Micro-batch weight: tokens in the micro-batch / tokens in the batch.
    """
    return _on_tokens(per_token, mask).sum() / mask.to(per_token.dtype).sum().clamp(min=1.0)


def seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each completion's tokens, then mean over completions.

    GRPO's Eq. (3) (Shao et al., 2024): ``1/G sum_i 1/|o_i| sum_t``; TRL's ``loss_type="grpo"``.
    Every completion weighs the same, so a token of a short completion weighs more than one of a long
    completion (the length bias Dr. GRPO removes). Micro-batch weight: completions in the micro-batch
    / completions in the batch.
    """
    lengths = mask.to(per_token.dtype).sum(dim=1).clamp(min=1.0)  # (N,) tokens per completion
    per_row = _on_tokens(per_token, mask).sum(dim=1) / lengths  # (N,)
    return per_row.mean()


def seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Sum over each completion's tokens divided by a constant, then mean over completions:
    ``sum(x * mask) / (N * max_len)``.

    Dr. GRPO (Liu et al., 2025, Sec. 3): no per-response length normalisation; the constant is the
    generation budget (TRL's ``loss_type="dr_grpo"`` divides by ``batch * max_completion_length``).
    Pass it with ``functools.partial(seq_mean_token_sum_norm, max_len=L)``. Micro-batch weight:
    completions in the micro-batch / completions in the batch.
    """
    if not max_len >= 1:
        raise ValueError(f"seq_mean_token_sum_norm expects max_len >= 1, got {max_len}")
    return _on_tokens(per_token, mask).sum() / (per_token.shape[0] * max_len)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _check_tokens(name: str, logps: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    if logps.dim() != 2:
        raise ValueError(f"{name} expects (N, T) token tensors, got logps of shape {tuple(logps.shape)}")
    for key, tensor in others.items():
        if tensor.shape != logps.shape:
            raise ValueError(f"{name} expects {key} of shape (N, T) = {tuple(logps.shape)}, got {tuple(tensor.shape)}")


def _token_advantages(name: str, advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """(N,) sequence advantages broadcast to (N, T); (N, T) token advantages as they are."""
    if advantages.shape == logps.shape[:1]:
        advantages = advantages.unsqueeze(1).expand_as(logps)
    elif advantages.shape != logps.shape:
        raise ValueError(
            f"{name} expects advantages of shape (N,) or (N, T) with (N, T) = {tuple(logps.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    return advantages.detach().to(logps.dtype)


def _check_clip(name: str, clip_eps: float, clip_eps_high: float) -> None:
    if not 0 < clip_eps < 1:
        raise ValueError(f"{name} expects 0 < clip_eps < 1, got {clip_eps}")
    if not clip_eps_high > 0:
        raise ValueError(f"{name} expects clip_eps_high > 0, got {clip_eps_high}")


def _clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip on any shape: per-element loss, ratio, and where each side of the clip is active."""
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    # The clip is active (zero gradient) only where it lowers the objective: ratio above 1 + eps_high
    # with A > 0, or below 1 - eps with A < 0. TRL's clip_ratio/high and clip_ratio/low.
    low = (ratio < 1.0 - clip_eps) & (advantages < 0)
    high = (ratio > 1.0 + clip_eps_high) & (advantages > 0)
    return loss, ratio, low, high


def _clip_metrics(
    prefix: str,
    log_ratio: torch.Tensor,
    ratio: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, float]:
    """Clip fractions, ratio mean/max and approx KL(pi_old || pi_theta) (k3) over unmasked entries."""
    with torch.no_grad():
        mask = mask.to(ratio.dtype)
        return {
            f"{prefix}/clip_frac_low": token_mean(low.to(ratio.dtype), mask).item(),
            f"{prefix}/clip_frac_high": token_mean(high.to(ratio.dtype), mask).item(),
            f"{prefix}/ratio_mean": token_mean(ratio, mask).item(),
            f"{prefix}/ratio_max": ratio.masked_fill(mask == 0, float("-inf")).max().item(),
            # k3 with pi_old as the sampling policy: ratio - 1 - log ratio.
            f"{prefix}/approx_kl": token_mean(kl_k3(torch.zeros_like(log_ratio), log_ratio), mask).item(),
        }


# ---------------------------------------------------------------------------------------------
# Losses


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregate: Aggregate = token_mean,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al., 2017, "Proximal Policy Optimization Algorithms",
    Eq. (7)), per token, as a loss to minimise::

        ratio_t = exp(logps_t - old_logps_t)
        l_t     = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A_t)
        loss    = aggregate(l, mask)

    PPO's policy loss is this with whitened GAE advantages and the default ``token_mean``.
    ``clip_eps_high`` (DAPO's "clip-higher", Yu et al., 2025, Sec. 3.1; 0.28 there) defaults to
    ``clip_eps``. Where the clip is active the token passes no gradient; elsewhere
    d l_t / d logps_t = -ratio_t * A_t.

    Args:
        logps: (N, T) log pi_theta(a_t | s_t) of the sampled tokens.
        old_logps: (N, T) log pi_t(a_t | s_t) under the policy that sampled them (no gradient).
        advantages: (N, T) per-token advantages, or (N,) sequence advantages broadcast to every token.
        mask: (N, T) 1 on completion tokens, 0 on padding.
        clip_eps: lower clip range, ratio >= 1 - clip_eps; 0.2 is the usual value.
        clip_eps_high: upper clip range, ratio <= 1 + clip_eps_high; None means clip_eps.
        aggregate: reducer from (N, T) per-token losses and the mask to a scalar (see module docstring).

    Returns:
        The scalar loss and metrics over unmasked tokens: the fractions of tokens clipped on the low
        and the high side, the mean and max ratio, and approx KL(pi_t || pi_theta) (k3).
    """
    _check_tokens("clipped_policy_loss", logps, {"old_logps": old_logps, "mask": mask})
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _check_clip("clipped_policy_loss", clip_eps, clip_eps_high)
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = _on_tokens(logps.to(dtype) - old_logps.detach().to(dtype), mask)  # (N, T), 0 on padding
    adv = _on_tokens(_token_advantages("clipped_policy_loss", advantages, log_ratio), mask)  # (N, T)
    per_token, ratio, low, high = _clipped_surrogate(log_ratio, adv, clip_eps, clip_eps_high)  # (N, T) each
    loss = aggregate(per_token, mask)
    metrics = _clip_metrics("policy", log_ratio.detach(), ratio.detach(), low, high, mask)
    return loss, metrics


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    aggregate: Aggregate = seq_mean_token_mean,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath"), Eq. (3), as a loss::

        l_t  = -min(ratio_t * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A) + beta * k3_t
        k3_t = exp(ref_logps_t - logps_t) - (ref_logps_t - logps_t) - 1            (Eq. (4))
        loss = aggregate(l, mask)

    The KL to the reference is a per-token penalty inside the loss, not in the reward (gradient flows
    through logps in k3). The paper uses beta 0.04; TRL now defaults to 0 and ALGORITHMS.md notes
    that most recipes do, hence 0 here. The default aggregation is the paper's (and TRL's
    ``loss_type="grpo"``): mean over each completion's tokens, then over completions. Dr. GRPO is this
    loss with unscaled advantages (``group_normalized_advantages(..., scale=False)``) and
    ``aggregate=partial(seq_mean_token_sum_norm, max_len=L)``; DAPO's token-level loss is
    ``aggregate=token_mean`` with ``clip_eps_high=0.28``.

    Args:
        logps: (N, T) log pi_theta of the sampled tokens.
        old_logps: (N, T) log pi_t of the same tokens (the policy that sampled them; no gradient).
        ref_logps: (N, T) log pi_ref of the same tokens (no gradient).
        advantages: (N,) group-normalised sequence advantages (broadcast to tokens), or (N, T).
        mask: (N, T) 1 on completion tokens, 0 on padding.
        clip_eps: lower clip range; 0.2.
        clip_eps_high: upper clip range; None means clip_eps.
        beta: coefficient of the per-token k3 KL to the reference, >= 0.
        aggregate: reducer from per-token losses to a scalar.

    Returns:
        The scalar loss and metrics: those of ``clipped_policy_loss`` under ``grpo/`` plus the mean
        per-token k3 KL to the reference (``grpo/kl``, reported even when beta is 0).
    """
    _check_tokens("grpo_loss", logps, {"old_logps": old_logps, "ref_logps": ref_logps, "mask": mask})
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _check_clip("grpo_loss", clip_eps, clip_eps_high)
    if not beta >= 0:
        raise ValueError(f"grpo_loss expects beta >= 0, got {beta}")
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps = _on_tokens(logps.to(dtype), mask)  # (N, T), 0 on padding
    log_ratio = logps - _on_tokens(old_logps.detach().to(dtype), mask)  # (N, T)
    adv = _on_tokens(_token_advantages("grpo_loss", advantages, log_ratio), mask)  # (N, T)
    per_token, ratio, low, high = _clipped_surrogate(log_ratio, adv, clip_eps, clip_eps_high)  # (N, T) each
    kl = kl_k3(logps, _on_tokens(ref_logps.detach().to(dtype), mask))  # (N, T), 0 on padding
    if beta > 0:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask)
    metrics = _clip_metrics("grpo", log_ratio.detach(), ratio.detach(), low, high, mask)
    metrics["grpo/kl"] = token_mean(kl.detach(), mask).item()
    return loss, metrics


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE leave-one-out (Ahmadian et al., ACL 2024, "Back to Basics"), with the whole
    completion as one action and PPO's clip on a *sequence-level* importance ratio across epochs, as
    TRL's ``RLOOTrainer`` does (both the original and the current one sum the token log-probs before
    taking the ratio)::

        ratio_n = exp(sum_t mask * logps - sum_t mask * old_logps)
        loss    = mean_n -min(ratio_n * A_n, clip(ratio_n, 1 - clip_eps, 1 + clip_eps) * A_n)

    d loss / d logps[n, t] = -ratio_n * A_n / N on every token of completion n where the clip is not
    active: the sequence advantage is broadcast to every token (summed, not averaged, over them). On
    the first minibatch (ratio 1) this is exactly REINFORCE with the leave-one-out baseline.

    Args:
        logps: (N, T) log pi_theta of the sampled tokens.
        old_logps: (N, T) log pi_t of the same tokens (no gradient).
        advantages: (N,) leave-one-out advantages (``rloo_advantages``, flattened), any KL penalty
            already in the rewards.
        mask: (N, T) 1 on completion tokens, 0 on padding.
        clip_eps: clip range of the sequence ratio; 0.2 (TRL's default).

    Returns:
        The scalar loss and metrics over completions: the fractions clipped on the low and high side,
        the mean and max sequence ratio, and approx KL(pi_t || pi_theta) of whole completions (k3 on
        the sequence log-ratio).
    """
    _check_tokens("rloo_loss", logps, {"old_logps": old_logps, "mask": mask})
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"rloo_loss expects (N,) sequence advantages with N = {logps.shape[0]}, got {tuple(advantages.shape)}"
        )
    _check_clip("rloo_loss", clip_eps, clip_eps)
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = _on_tokens(logps.to(dtype) - old_logps.detach().to(dtype), mask).sum(dim=1)  # (N,)
    adv = advantages.detach().to(dtype)  # (N,)
    per_seq, ratio, low, high = _clipped_surrogate(log_ratio, adv, clip_eps, clip_eps)  # (N,) each
    loss = per_seq.mean()
    every = torch.ones_like(ratio)
    metrics = _clip_metrics("rloo", log_ratio.detach(), ratio.detach(), low, high, every)
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_value: float | None = 0.2,
    aggregate: Aggregate = token_mean,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss (as in OpenAI baselines' ppo2 and TRL/verl, following Schulman et al.,
    2017)::

        v_clip = old_values + clip(values - old_values, -clip_eps_value, clip_eps_value)
        l_t    = 0.5 * max((values - returns)^2, (v_clip - returns)^2)
        loss   = aggregate(l, mask)                      masked mean over tokens by default

    The max is pessimistic: where the clipped error is the larger the token passes no gradient, so
    the critic cannot move more than clip_eps_value from its old prediction in one batch.
    ``clip_eps_value=None`` gives the plain 0.5 * (values - returns)^2.

    Args:
        values: (N, T) V(s_t) from the critic being trained.
        old_values: (N, T) V(s_t) when the batch was collected (no gradient).
        returns: (N, T) value targets, e.g. GAE returns (no gradient).
        mask: (N, T) 1 on completion tokens, 0 on padding.
        clip_eps_value: clip range around old_values, > 0, or None for no clip; 0.2 (TRL's default).
        aggregate: reducer from per-token losses to a scalar.

    Returns:
        The scalar loss and metrics over unmasked tokens: the fraction where the clipped error is the
        larger, the mean squared error of the unclipped prediction, and the mean values and returns.
    """
    _check_tokens("value_loss", values, {"old_values": old_values, "returns": returns, "mask": mask})
    if clip_eps_value is not None and not clip_eps_value > 0:
        raise ValueError(f"value_loss expects clip_eps_value > 0 (or None), got {clip_eps_value}")
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = _on_tokens(values.to(dtype), mask)  # (N, T), 0 on padding
    old_values = _on_tokens(old_values.detach().to(dtype), mask)
    returns = _on_tokens(returns.detach().to(dtype), mask)
    unclipped = (values - returns).pow(2)  # (N, T)
    if clip_eps_value is None:
        per_token = 0.5 * unclipped
        clipped_larger = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_eps_value, clip_eps_value)  # (N, T)
        clipped = (v_clip - returns).pow(2)  # (N, T)
        per_token = 0.5 * torch.max(unclipped, clipped)
        clipped_larger = clipped > unclipped
    loss = aggregate(per_token, mask)
    with torch.no_grad():
        metrics = {
            "value/clip_frac": token_mean(clipped_larger.to(dtype), mask).item(),
            "value/error": token_mean(unclipped, mask).item(),
            "value/mean": token_mean(values, mask).item(),
            "value/returns_mean": token_mean(returns, mask).item(),
        }
    return loss, metrics
