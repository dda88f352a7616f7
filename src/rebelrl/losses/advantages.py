"""Advantage estimators and per-token KL estimators for the policy-gradient baselines.

Pure functions on tensors, no gradient through their outputs where they produce targets: the
advantages and returns are computed from detached inputs, as every PPO-family implementation does.
Group batches are ``(B, k)``: B prompts, k completions each. Token batches are ``(N, T)`` with a
``(N, T)`` mask that is 1 on completion tokens and 0 on padding.
"""

from __future__ import annotations

import torch


def _check_groups(name: str, rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"{name} expects (B, k) rewards with k >= 2 completions per prompt, got {tuple(rewards.shape)}"
        )


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al., ACL 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs"), the leave-one-out baseline::

        A[b, i] = r[b, i] - 1/(k-1) * sum_{j != i} r[b, j]
                = k/(k-1) * (r[b, i] - mean_j r[b, j])

    The baseline of each sample is the mean reward of the other k - 1 samples of the same prompt,
    so it does not depend on the sample itself and the estimate stays unbiased.

    Args:
        rewards: (B, k) rewards of k completions for each of B prompts (any KL penalty already
            subtracted), k >= 2.

    Returns:
        (B, k) advantages; each row sums to 0.
    """
    _check_groups("rloo_advantages", rewards)
    rewards = rewards.detach()
    k = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)  # (B, k) mean of the others
    return rewards - baseline


def group_normalized_advantages(
    rewards: torch.Tensor,
    scale: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al., 2024, "DeepSeekMath", Sec. 4.1.2, outcome
    supervision) and of Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training", Sec. 3)::

        scale=True  (GRPO):     A[b, i] = (r[b, i] - mean_j r[b, j]) / (std_j r[b, j] + eps)
        scale=False (Dr. GRPO): A[b, i] =  r[b, i] - mean_j r[b, j]

    ``std`` is the *unbiased* (Bessel-corrected, divide by k - 1) standard deviation of the group,
    as in the reference implementations: TRL's ``GRPOTrainer`` (``rewards.view(-1, G).std(dim=1)``,
    torch's default correction=1, eps 1e-4) and verl's ``compute_grpo_outcome_advantage``
    (``torch.std``, eps 1e-6). eps defaults to TRL's 1e-4; a group whose rewards are all equal gets
    advantage 0 either way. Dr. GRPO drops the division because it gives questions that are too easy
    or too hard (small std) a larger weight.

    Args:
        rewards: (B, k) rewards of k completions for each of B prompts, k >= 2.
        scale: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std before dividing, > 0.

    Returns:
        (B, k) advantages; each row sums to 0.
    """
    _check_groups("group_normalized_advantages", rewards)
    if not eps > 0:
        raise ValueError(f"group_normalized_advantages expects eps > 0, got {eps}")
    rewards = rewards.detach()
    advantages = rewards - rewards.mean(dim=1, keepdim=True)  # (B, k)
    if scale:
        advantages = advantages / (rewards.std(dim=1, correction=1, keepdim=True) + eps)
    return advantages


def _on_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is 1, exactly 0 elsewhere: padding may hold anything (-inf log-probs included),
    and a multiply by the mask would turn inf * 0 into nan."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_right_padded(name: str, mask: torch.Tensor) -> None:
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} expects a 0/1 mask")
    if mask.shape[1] > 1 and (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError(f"{name} expects right-padded rows: each mask row is ones followed by zeros")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al., ICLR 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation"), Eq. (16), over right-padded token sequences::

        delta_t = r_t + gamma * V_{t+1} - V_t              V after the last real token = 0 (the episode ends)
        A_t     = delta_t + gamma * gae_lambda * A_{t+1}    A after the last real token = 0
        R_t     = A_t + V_t                                 the value target (lambda-return)

    Rewards and values on padding are ignored (masked to 0) and the outputs are 0 there. The PPO
    recipe of ALGORITHMS.md uses gamma 1, gae_lambda 0.95. gae_lambda = 1 gives the Monte Carlo
    return minus V_t; gae_lambda = 0 the one-step TD error.

    Args:
        rewards: (N, T) per-token rewards (e.g. -kl_coef * KL on every token plus the score on the last).
        values: (N, T) V(s_t) from the critic at each completion token (no gradient flows through).
        mask: (N, T) 1 on completion tokens, 0 on padding; each row ones then zeros.
        gamma: discount in [0, 1].
        gae_lambda: GAE's lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, both (N, T), 0 on padding.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"gae expects three (N, T) tensors, got {tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= gae_lambda <= 1.0:
        raise ValueError(f"gae expects gamma and gae_lambda in [0, 1], got {gamma} and {gae_lambda}")
    _check_right_padded("gae", mask)
    dtype = torch.promote_types(values.dtype, torch.float32)
    rewards = _on_tokens(rewards.detach().to(dtype), mask)  # (N, T)
    values = _on_tokens(values.detach().to(dtype), mask)  # (N, T)
    mask = mask.to(dtype)
    n, t_len = values.shape
    advantages = torch.zeros_like(values)  # (N, T)
    next_value = values.new_zeros(n)  # (N,) V_{t+1}; 0 past the end and on padding
    next_advantage = values.new_zeros(n)  # (N,) A_{t+1}
    # A reverse loop over T, vectorised over N: the recursion is sequential in t.
    for t in reversed(range(t_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * gae_lambda * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Masked whitening of advantages over a whole batch, as the PPO implementations do (TRL's and
    verl's ``masked_whiten``)::

        mu  = sum(values * mask) / sum(mask)
        var = sum((values - mu)^2 * mask) / (sum(mask) - 1)     unbiased (Bessel-corrected), as TRL and verl
        out = (values - mu) / sqrt(var + eps)                    (+ mu again if shift_mean is False)

    The statistics are over every unmasked token of the batch, not per row. Padding positions of the
    output are 0.

    Args:
        values: (N, T) e.g. GAE advantages.
        mask: (N, T) 1 where values count; at least two positions must be 1.
        shift_mean: subtract the mean (True) or only rescale and keep the mean (False).
        eps: added to the variance before the square root.

    Returns:
        (N, T) whitened values, 0 on padding.
    """
    if values.shape != mask.shape:
        raise ValueError(
            f"whiten expects values and mask of the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = _on_tokens(values.detach().to(dtype), mask)
    mask = mask.to(dtype)
    count = mask.sum()
    if count < 2:
        raise ValueError(f"whiten needs at least 2 unmasked values for an unbiased variance, got {int(count.item())}")
    mean = (values * mask).sum() / count
    var = ((values - mean).pow(2) * mask).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _on_tokens(whitened, mask)


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimator k1 (Schulman, 2020, "Approximating KL Divergence")::

        k1 = logps - ref_logps

    Unbiased for KL(pi || pi_ref) when the tokens are sampled from pi, but negative on some tokens
    and of high variance. This is the per-token penalty PPO puts into the reward (kl_coef * k1).

    Args:
        logps: (...) log pi(a_t | s_t) of the sampled tokens.
        ref_logps: (...) log pi_ref(a_t | s_t) of the same tokens.

    Returns:
        (...) per-token estimates.
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"kl_k1 expects tensors of the same shape, got {tuple(logps.shape)} and {tuple(ref_logps.shape)}"
        )
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimator k3 (Schulman, 2020, "Approximating KL Divergence"), GRPO's Eq. (4)::

        k3 = exp(ref_logps - logps) - (ref_logps - logps) - 1

    Unbiased for KL(pi || pi_ref) when the tokens are sampled from pi, and non-negative on every
    token (e^u >= 1 + u), so it is also a per-token penalty. Computed as ``expm1(u) - u``, which keeps
    the small differences of a policy near its reference accurate. With ``(old_logps, logps)`` as
    arguments it is PPO's "approx KL" between the sampling policy and the current one.

    Args:
        logps: (...) log-probs under the policy the tokens were sampled from.
        ref_logps: (...) log-probs of the same tokens under the other policy.

    Returns:
        (...) per-token estimates, >= 0.
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(
            f"kl_k3 expects tensors of the same shape, got {tuple(logps.shape)} and {tuple(ref_logps.shape)}"
        )
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio
