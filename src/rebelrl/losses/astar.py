"""A*-PO: policy optimization via optimal advantage regression (Brantley, Chen, Gao, Lee, Sun, Zhan
and Zhang, 2025, "Accelerating RL for LLM Reasoning with Optimal Advantage Regression").

Stage 1, once before training: sample N completions a prompt from pi_ref, score them, and cache
``astar_values``. Stage 2: one completion a prompt from the current policy, ``astar_po_loss``.
"""

from __future__ import annotations

import math

import torch


def astar_values(rewards: torch.Tensor, beta1: float = 0.5) -> torch.Tensor:
    """Estimate of the optimal KL-regularised value from reference samples (the paper's stage 1)::

        V*(x) = beta1 * log( 1/N * sum_i exp(r(x, y_i) / beta1) ),   y_i ~ pi_ref(. | x)
              = beta1 * (logsumexp_i(r_i / beta1) - log N)

    computed with logsumexp, so rewards of any scale stay finite. V* lies between the mean reward
    (the limit beta1 -> inf) and the max reward (the limit beta1 -> 0). beta1 = 0.5 is the default of
    the authors' scripts (``scripts/apo_math.sh``) and of TRL's ``A2POConfig``. The authors' dataset
    code treats beta1 == 0 as "use the mean", which is not the limit; here beta1 must be > 0.

    Args:
        rewards: (B, N) rewards of N reference completions for each of B prompts, N >= 1.
        beta1: KL temperature of the value estimate, > 0.

    Returns:
        (B,) V*(x) for each prompt (no gradient).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(
            f"astar_values expects (B, N) rewards with N >= 1 samples per prompt, got {tuple(rewards.shape)}"
        )
    if not beta1 > 0:
        raise ValueError(f"astar_values expects beta1 > 0, got {beta1}")
    rewards = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    n = rewards.shape[1]
    return beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(n))


def astar_po_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    beta2: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A*-PO's stage-2 least-squares regression of the implicit advantage
    beta2 * log pi_theta/pi_ref onto the estimated optimal advantage r - V*::

        loss = mean_b ( beta2 * (logps[b] - ref_logps[b]) - (rewards[b] - values[b]) ) ** 2

    Log-probs are summed over the completion's tokens, and the squared residuals averaged over the
    batch (one completion a prompt), as in the authors' ``compute_policy_loss`` (verl's
    ``apo/core_algos.py``: masked token sums, then ``loss.mean()``) and TRL's ``A2POTrainer``.
    beta2 = 1e-3 is the default of both. No ratio to pi_t and no clip: the target does not depend
    on the current policy, so several epochs over a batch need nothing more.

    Args:
        logps: (B,) log pi_theta(y|x), summed over completion tokens.
        ref_logps: (B,) log pi_ref(y|x) of the same completions (no gradient).
        rewards: (B,) rewards of the completions.
        values: (B,) V*(x) of their prompts from ``astar_values`` (no gradient).
        beta2: KL temperature of the regression, > 0.

    Returns:
        The scalar loss and metrics: the mean implicit advantage beta2 * log pi/pi_ref, the mean
        target r - V*, the mean absolute residual, and the mean log-ratio to the reference.
    """
    if not (logps.shape == ref_logps.shape == rewards.shape == values.shape) or logps.dim() != 1:
        raise ValueError(
            f"astar_po_loss expects four (B,) tensors, got {tuple(logps.shape)}, {tuple(ref_logps.shape)}, "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}"
        )
    if not beta2 > 0:
        raise ValueError(f"astar_po_loss expects beta2 > 0, got {beta2}")
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = logps.to(dtype) - ref_logps.detach().to(dtype)  # (B,)
    predicted = beta2 * log_ratio  # (B,)
    target = rewards.detach().to(dtype) - values.detach().to(dtype)  # (B,)
    residual = predicted - target  # (B,)
    loss = residual.pow(2).mean()
    metrics = {
        "astar/implicit_advantage": predicted.detach().mean().item(),
        "astar/target_advantage": target.mean().item(),
        "astar/residual_abs": residual.detach().abs().mean().item(),
        "astar/log_ratio": log_ratio.detach().mean().item(),
    }
    return loss, metrics
