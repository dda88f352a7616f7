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
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Identity Preference Optimization (Azar et al., 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences"), Eq. (17), with tau written as ``beta``, on
    per-token averaged log-ratios as IPO prescribes::

        h     = (logps - ref_logps) / lengths              (B, 2) average log-ratio per token
        Delta = h[b,0] - h[b,1]
        loss  = mean_b (Delta - 1 / (2 * beta)) ** 2

    IPO regresses the margin onto a fixed target, which means something only on a fixed scale:
    summed log-ratios grow with the length of the replies, averaged ones do not.

    Args:
        logps: (B, 2) log pi_theta(y|x) of chosen and rejected, summed over completion tokens.
        ref_logps: (B, 2) log pi_ref(y|x) of the same completions, summed the same way.
        beta: regularisation strength; a smaller beta asks for a larger margin 1 / (2 * beta).
        lengths: (B, 2) number of completion tokens of each (the masks' sums), all >= 1.

    Returns:
        The scalar loss and metrics: the mean margin Delta and the fraction of pairs with Delta > 0.
    """
    _check_pairs("ipo_loss", logps, ref_logps, beta)
    if lengths.shape != logps.shape or not (lengths >= 1).all():
        raise ValueError(f"ipo_loss expects (B, 2) token counts >= 1 as lengths, got {tuple(lengths.shape)}")
    log_ratio = (logps - ref_logps.detach().to(logps.dtype)) / lengths.to(logps.dtype)  # (B, 2) per token
    delta = log_ratio[:, 0] - log_ratio[:, 1]  # (B,)
    loss = (delta - 1.0 / (2.0 * beta)).pow(2).mean()
    metrics = {
        "ipo/margin": delta.detach().mean().item(),
        "ipo/accuracy": (delta.detach() > 0).float().mean().item(),
    }
    return loss, metrics


# exp(80) ~ 5.5e34: z stays finite in float32 (max 3.4e38) even times a large beta. Only an overflow
# guard: no sequence in a working run has pi/pi_ref anywhere near e^80.
_MAX_LOG_Z = 80.0


def chipo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    r_max: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Chi-squared Preference Optimization (Huang et al., ICLR 2025, "Correcting the Mythos of
    KL-Regularization: Direct Alignment without Overoptimization via Chi-Squared Preference
    Optimization"), Algorithm 1: DPO with the link log z replaced by phi(z) = z + log z,
    z = pi_theta(y|x) / pi_ref(y|x), which adds chi-squared regularisation to the KL one, and the
    margin clipped to [-2 R_max, 2 R_max] (R_max bounds the reward)::

        u      = logps[b,i] - ref_logps[b,i]               (log z, exact)
        phi    = exp(u) + u
        margin = clip_{2 R_max}(beta * (phi[b,0] - phi[b,1]))
        loss   = mean_b -log sigmoid(margin)

    ``r_max=None`` leaves the margin unclipped. A clipped pair passes no gradient, which is how the
    clip keeps the density ratios from running away. ``exp(u)`` is taken with u capped at 80 purely
    against float overflow (``chipo/overflow_frac`` reports it; 0 in any sane run). The arithmetic
    runs in at least float32 whatever the input dtype: in bf16, e^u swamps the log z term.

    Near the reference (small u) phi(e^u) = 1 + 2u + O(u^2): chi-PO then behaves like DPO with
    twice the beta; the z term takes over as pi moves away from pi_ref.

    Args:
        logps: (B, 2) log pi_theta(y|x) of chosen and rejected, summed over completion tokens.
        ref_logps: (B, 2) log pi_ref(y|x) of the same completions (no gradient needed).
        beta: regularisation strength, as in DPO.
        r_max: the reward bound R_max of the paper's clip; None disables the clip.

    Returns:
        The scalar loss and metrics: the implicit rewards ``beta * phi(z)`` of chosen and
        rejected, their mean (clipped) margin, the fraction of pairs with log z+ > log z-, the
        fraction of margins clipped, and the fraction of log-ratios past the overflow guard.
    """
    _check_pairs("chipo_loss", logps, ref_logps, beta)
    if r_max is not None and not r_max > 0:
        raise ValueError(f"chipo_loss expects r_max > 0 (or None), got {r_max}")
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = logps.to(dtype) - ref_logps.detach().to(dtype)  # (B, 2) log z
    phi = torch.exp(log_ratio.clamp(max=_MAX_LOG_Z)) + log_ratio  # (B, 2)
    raw_margin = beta * (phi[:, 0] - phi[:, 1])  # (B,)
    margin = raw_margin if r_max is None else raw_margin.clamp(-2 * r_max, 2 * r_max)
    loss = -F.logsigmoid(margin).mean()
    rewards = beta * phi.detach()  # (B, 2) implicit rewards
    log_ratio = log_ratio.detach()
    metrics = {
        "chipo/reward_chosen": rewards[:, 0].mean().item(),
        "chipo/reward_rejected": rewards[:, 1].mean().item(),
        "chipo/margin": margin.detach().mean().item(),
        # phi is increasing, so ranking by log z is ranking by phi(z).
        "chipo/accuracy": (log_ratio[:, 0] > log_ratio[:, 1]).float().mean().item(),
        "chipo/clipped_frac": (margin.detach() != raw_margin.detach()).float().mean().item(),
        "chipo/overflow_frac": (log_ratio > _MAX_LOG_Z).float().mean().item(),
    }
    return loss, metrics
