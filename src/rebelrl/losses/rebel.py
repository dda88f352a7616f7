"""REBEL: REgression to RElative reward Based RL (Gao et al., NeurIPS 2024)."""

from __future__ import annotations

import torch


def rebel_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Least-squares regression of the relative log-ratio onto the relative reward.

    Paper Eq. (6), written as in the authors' code (the paper divides the log-ratio term by eta
    instead; both have the same minimiser, this form keeps the loss scale independent of eta)::

        loss = mean_b ( [logps[b,0] - old_logps[b,0]] - [logps[b,1] - old_logps[b,1]]
                        - eta * (rewards[b,0] - rewards[b,1]) ) ** 2

    Args:
        logps: (B, 2) log pi_theta(y|x) of both members of each pair, summed over completion tokens.
        old_logps: (B, 2) log pi_t(y|x) under the policy that sampled them (no gradient needed).
        rewards: (B, 2) rewards of both members (already including any KL penalty).
        eta: step size; a larger eta asks for a larger change of log-ratio per unit of reward.

    Returns:
        The scalar loss and metrics: the mean predicted and target relative values and their
        correlation-free fit quality (``rebel/residual_abs``).
    """
    if not (logps.shape == old_logps.shape == rewards.shape) or logps.dim() != 2 or logps.shape[1] != 2:
        raise ValueError(
            f"rebel_loss expects three (B, 2) tensors, got {tuple(logps.shape)}, "
            f"{tuple(old_logps.shape)}, {tuple(rewards.shape)}"
        )
    log_ratio = logps - old_logps.detach()  # (B, 2)
    predicted = log_ratio[:, 0] - log_ratio[:, 1]  # (B,)
    target = eta * (rewards[:, 0] - rewards[:, 1]).to(predicted.dtype)  # (B,)
    residual = predicted - target  # (B,)
    loss = residual.pow(2).mean()
    metrics = {
        "rebel/predicted_mean": predicted.detach().mean().item(),
        "rebel/target_mean": target.detach().mean().item(),
        "rebel/residual_abs": residual.detach().abs().mean().item(),
        "rebel/log_ratio_abs": log_ratio.detach().abs().mean().item(),
    }
    return loss, metrics
