"""Offline preference losses on (chosen, rejected) pairs: DPO, IPO and chi-PO.

Every function takes ``(B, 2)`` tensors whose column 0 is the chosen completion y+ and column 1
the rejected completion y-. The reference log-probs are treated as constants (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pairs(name: str, logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> None:
    if logps.shape != ref_logps.shape or logps.dim() != 2 or logps.shape[1] != 2:
        raise ValueError(
            f"{name} expects two (B, 2) tensors (column 0 chosen, column 1 rejected), "
            f"got {tuple(logps.shape)} and {tuple(ref_logps.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"{name} expects beta > 0, got {beta}")


def dpo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct Preference Optimization (Rafailov et al., NeurIPS 2023), Eq. (7)::

        Delta = [logps[b,0] - ref_logps[b,0]] - [logps[b,1] - ref_logps[b,1]]
        loss  = mean_b -log sigmoid(beta * Delta)

    Args:
        logps: (B, 2) log pi_theta(y|x) of chosen and rejected, summed over completion tokens.
        ref_logps: (B, 2) log pi_ref(y|x) of the same completions (no gradient needed).
        beta: strength of the KL regularisation towards pi_ref; 0.1 is the usual value.

    Returns:
        The scalar loss and metrics: the implicit rewards ``beta * log pi/pi_ref`` of chosen and
        rejected, their mean margin, and the fraction of pairs ranked correctly (Delta > 0).
    """
    _check_pairs("dpo_loss", logps, ref_logps, beta)
    log_ratio = logps - ref_logps.detach().to(logps.dtype)  # (B, 2) log pi_theta/pi_ref
    delta = log_ratio[:, 0] - log_ratio[:, 1]  # (B,)
    # logsigmoid instead of log(sigmoid(.)): the latter underflows to log 0 for large negative margins.
    loss = -F.logsigmoid(beta * delta).mean()
    rewards = beta * log_ratio.detach()  # (B, 2) implicit rewards
    metrics = {
        "dpo/reward_chosen": rewards[:, 0].mean().item(),
        "dpo/reward_rejected": rewards[:, 1].mean().item(),
        "dpo/margin": (rewards[:, 0] - rewards[:, 1]).mean().item(),
        "dpo/accuracy": (delta.detach() > 0).float().mean().item(),
    }
    return loss, metrics


def ipo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Identity Preference Optimization (Azar et al., 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences"), Eq. (17), with tau written as ``beta``::

        Delta = [logps[b,0] - ref_logps[b,0]] - [logps[b,1] - ref_logps[b,1]]
        loss  = mean_b (Delta - 1 / (2 * beta)) ** 2

    IPO regresses the margin onto a fixed target, so the target only means something on a fixed
    scale: callers pass per-token *averaged* log-probs (sum over completion tokens divided by the
    number of tokens), the length-normalised form used in practice. This function does not
    normalise; it uses whatever log-probs it is given.

    Args:
        logps: (B, 2) log pi_theta(y|x) of chosen and rejected, averaged over completion tokens.
        ref_logps: (B, 2) log pi_ref(y|x) of the same completions, averaged the same way.
        beta: regularisation strength; a smaller beta asks for a larger margin 1 / (2 * beta).

    Returns:
        The scalar loss and metrics: the mean margin Delta and the fraction of pairs with Delta > 0.
    """
    _check_pairs("ipo_loss", logps, ref_logps, beta)
    log_ratio = logps - ref_logps.detach().to(logps.dtype)  # (B, 2)
    delta = log_ratio[:, 0] - log_ratio[:, 1]  # (B,)
    loss = (delta - 1.0 / (2.0 * beta)).pow(2).mean()
    metrics = {
        "ipo/margin": delta.detach().mean().item(),
        "ipo/accuracy": (delta.detach() > 0).float().mean().item(),
    }
    return loss, metrics


def chipo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    max_log_ratio: float = 20.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Chi-squared Preference Optimization (Huang et al., 2024, "Correcting the Mythos of
    KL-Regularization: Direct Alignment without Overoptimization via Chi-Squared Preference
    Optimization"), Algorithm 1: DPO with the link log z replaced by phi(z) = z + log z,
    z = pi_theta(y|x) / pi_ref(y|x), which adds chi-squared regularisation to the KL one::

        u     = logps[b,i] - ref_logps[b,i]                (log z, exact)
        phi   = exp(min(u, max_log_ratio)) + u
        loss  = mean_b -log sigmoid(beta * (phi[b,0] - phi[b,1]))

    z is computed from the log-ratio, with its exponent clamped: exp overflows float32 and bf16
    past u ~ 88.7, and well below that beta * (z+ - z-) can still overflow or swamp every other
    pair in the batch. The clamp is a numerical guard, not part of the paper's objective: below
    it the loss is exact; above it (pi/pi_ref past e^20 ~ 5e8 on one sequence) phi falls back to
    the DPO link log z plus a constant, the z term stops passing gradient while the log z term
    still does, and loss and gradients stay finite. ``chipo/clamped_frac`` reports how often
    that happens; it should stay 0 in a healthy run.
    The arithmetic runs in at least float32 whatever the input dtype: in bf16, e^u swamps the
    log z term (its spacing at e^20 is ~2e6). Pass bf16 or float32 log-probs, not float16: float16
    overflows past u ~ 11, and a gradient of size beta * e^u would come back as inf there.

    Near the reference (small u) phi(e^u) = 1 + 2u + O(u^2): chi-PO then behaves like DPO with
    twice the beta; the z term takes over as pi moves away from pi_ref.

    Args:
        logps: (B, 2) log pi_theta(y|x) of chosen and rejected, summed over completion tokens.
        ref_logps: (B, 2) log pi_ref(y|x) of the same completions (no gradient needed).
        beta: regularisation strength, as in DPO.
        max_log_ratio: clamp on the exponent when computing z = exp(log z).

    Returns:
        The scalar loss and metrics: the implicit rewards ``beta * phi(z)`` of chosen and
        rejected, their mean margin, the fraction of pairs with log z+ > log z-, and the fraction
        of log-ratios that hit the clamp.
    """
    _check_pairs("chipo_loss", logps, ref_logps, beta)
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = logps.to(dtype) - ref_logps.detach().to(dtype)  # (B, 2) log z
    z = torch.exp(log_ratio.clamp(max=max_log_ratio))  # (B, 2)
    phi = z + log_ratio  # (B, 2)
    margin = beta * (phi[:, 0] - phi[:, 1])  # (B,)
    loss = -F.logsigmoid(margin).mean()
    rewards = beta * phi.detach()  # (B, 2) implicit rewards
    log_ratio = log_ratio.detach()
    metrics = {
        "chipo/reward_chosen": rewards[:, 0].mean().item(),
        "chipo/reward_rejected": rewards[:, 1].mean().item(),
        "chipo/margin": margin.detach().mean().item(),
        # phi is increasing, so ranking by log z is ranking by phi(z), clamp or not.
        "chipo/accuracy": (log_ratio[:, 0] > log_ratio[:, 1]).float().mean().item(),
        "chipo/clamped_frac": (log_ratio > max_log_ratio).float().mean().item(),
    }
    return loss, metrics
