"""Losses of the offline methods beyond the pair losses of ``preference.py``: supervised fine-tuning,
reward models from pairs, and HyPO's KL to the reference on the policy's own samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rebelrl.losses.advantages import rloo_advantages


def sft_loss(logps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token negative log-likelihood, averaged over every target token of the batch::

        loss = -sum(logps * targets) / sum(targets)

    TRL's SFT loss on assistant tokens only (``assistant_only_loss``) and its token mean: a long reply
    weighs in proportion to its tokens. Micro-batch weight: target tokens in the micro-batch / target
    tokens in the batch.

    Args:
        logps: (N, T) log pi_theta(a_t | s_t) of each token at temperature 1.
        targets: (N, T) 1 on the tokens the model should learn (assistant turns), 0 elsewhere.

    Returns:
        The scalar loss and its metrics: the loss and the number of target tokens.
    """
    if logps.shape != targets.shape or logps.dim() != 2:
        raise ValueError(f"sft_loss expects two (N, T) tensors, got {tuple(logps.shape)} and {tuple(targets.shape)}")
    mask = targets.to(logps.dtype)
    count = mask.sum()
    loss = -(logps * mask).sum() / count.clamp(min=1.0)
    return loss, {"sft/nll": loss.item(), "sft/tokens": count.item()}


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A reward model's pairwise loss (Bradley and Terry, 1952; Ouyang et al., 2022, Eq. 1), with the
    optional margin of Llama 2's reward models (Touvron et al., 2023, Eq. 2) and TRL's centring term::

        loss = mean_b -log sigmoid(r+_b - r-_b - margin_b) + center_coef * mean_b (r+_b + r-_b)^2

    The centring term costs nothing where the scores sum to 0 and keeps them from drifting, since the
    Bradley-Terry term sees only differences (TRL recommends 0.01).

    Args:
        chosen: (B,) scores r+ of the chosen replies.
        rejected: (B,) scores r- of the rejected replies.
        margin: (B,) how much better chosen must score, or None for 0.
        center_coef: weight of the centring term, >= 0.

    Returns:
        The scalar loss and metrics: accuracy (r+ > r-), the mean margin r+ - r-, the mean scores.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"bradley_terry_loss expects two (B,) score tensors, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if not center_coef >= 0:
        raise ValueError(f"bradley_terry_loss expects center_coef >= 0, got {center_coef}")
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    chosen, rejected = chosen.to(dtype), rejected.to(dtype)
    gap = chosen - rejected  # (B,)
    shift = margin.detach().to(dtype) if margin is not None else 0.0
    loss = -F.logsigmoid(gap - shift).mean()
    if center_coef > 0:
        loss = loss + center_coef * (chosen + rejected).pow(2).mean()
    metrics = {
        "rewards/accuracies": (gap.detach() > 0).float().mean().item(),
        "rewards/margins": gap.detach().mean().item(),
        "rewards/chosen": chosen.detach().mean().item(),
        "rewards/rejected": rejected.detach().mean().item(),
    }
    return loss, metrics


def hypo_kl_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """HyPO's KL term (Song et al., 2024, "The Importance of Online Data: Understanding Preference
    Fine-tuning via Coverage", Algorithm 1), kl_coef * KL(pi_theta || pi_ref), as a loss whose gradient
    is the score-function estimate on k fresh samples of each prompt::

        l_bi   = old_logps[b,i] - ref_logps[b,i]                 sequence log-ratio, sampled at theta_t
        A_bi   = l_bi - mean_{j != i} l_bj                         leave-one-out baseline
        loss   = kl_coef * mean_bi A_bi * logps[b,i]

    At theta = theta_t, d loss / d theta = kl_coef * E[(l - b) grad log pi(y|x)] = kl_coef * grad KL:
    the plain derivative of the sampled log-ratio, E[grad log pi], is 0 and would train nothing. The
    baseline lowers the variance and leaves the expectation unchanged (REINFORCE with reward -l, RLOO's
    baseline).

    Args:
        logps: (B, k) log pi_theta(y|x) of k samples of each of B prompts, summed over the reply's tokens.
        old_logps: (B, k) log pi_t(y|x) of the same replies, under the policy that sampled them.
        ref_logps: (B, k) log pi_ref(y|x) of the same replies.
        kl_coef: the paper's lambda, >= 0.

    Returns:
        The scalar loss and metrics: the estimated KL(pi_t || pi_ref) (mean l) and its spread.
    """
    if logps.shape != old_logps.shape or logps.shape != ref_logps.shape or logps.dim() != 2 or logps.shape[1] < 2:
        raise ValueError(f"hypo_kl_loss expects three (B, k) tensors with k >= 2, got {tuple(logps.shape)}, "
                         f"{tuple(old_logps.shape)} and {tuple(ref_logps.shape)}")
    if not kl_coef >= 0:
        raise ValueError(f"hypo_kl_loss expects kl_coef >= 0, got {kl_coef}")
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = (old_logps.detach() - ref_logps.detach()).to(dtype)  # (B, k)
    advantages = rloo_advantages(log_ratio)  # (B, k)
    loss = kl_coef * (advantages * logps.to(dtype)).mean()
    return loss, {"hypo/kl": log_ratio.mean().item(), "hypo/kl_std": log_ratio.std().item() if log_ratio.numel() > 1 else 0.0}


ALOL_VARIANTS = ("alol", "seq", "ref_free", "kl")


def alol_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    variant: str = "alol",
    kl_beta: float = 0.0,
    weight_min: float = 0.1,
    weight_max: float = 1.9,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A-LoL, offline policy gradient with the whole reply as one action (Baheti et al., 2024), a mean
    over the batch's replies of, with A+ = max(A, 0), NLL(y) = -sum_t log pi(y_t) over target tokens
    and r = pi / pi_ref::

        alol:     A+ * w * NLL(y),                    w = clamp(r(y), weight_min, weight_max), r(y) per reply
        seq:      A+ * sum_t w_t * (-log pi(y_t)),    w_t = clamp(r(y_t), weight_min, weight_max), per token
        ref_free: A * NLL(y)                          (no weight; negative A are left to priority sampling)
        kl:       A+ * NLL(y) + kl_beta * (log pi(y) - log pi_ref(y))

    The weights are stop-gradient factors, as in the authors' code. The ``kl`` variant's term has the
    gradient of -kl_beta * NLL(y): it shifts the advantage by kl_beta, it is not a KL penalty.

    Args:
        logps, ref_logps: (N, T) per-token log pi_theta and log pi_ref of the replies.
        targets: (N, T) 1 on the reply's tokens.
        advantages: (N,) A = R(x, y) - V_ref(x).

    Returns:
        The scalar loss and metrics: the mean weight, the share of weights clipped, the mean A+.
    """
    if variant not in ALOL_VARIANTS:
        raise ValueError(f"alol_loss: variant must be one of {ALOL_VARIANTS}, got {variant!r}")
    if logps.shape != ref_logps.shape or logps.shape != targets.shape or logps.dim() != 2 or advantages.shape != logps.shape[:1]:
        raise ValueError(f"alol_loss expects (N, T) log-probs and targets and (N,) advantages, got {tuple(logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(targets.shape)}, {tuple(advantages.shape)}")
    mask = targets.to(logps.dtype)
    positive = advantages.clamp(min=0.0)
    token_nll = -logps * mask  # (N, T)
    log_ratio = (logps.detach() - ref_logps) * mask  # (N, T)
    metrics: dict[str, float] = {"alol/advantage_pos_mean": positive.mean().item()}
    if variant == "alol":
        ratio = log_ratio.sum(1).exp()
        weight = ratio.clamp(weight_min, weight_max)
        per_reply = positive * weight * token_nll.sum(1)
    elif variant == "seq":
        ratio = log_ratio.exp()
        weight = ratio.clamp(weight_min, weight_max) * mask
        per_reply = positive * (weight * token_nll).sum(1)
        ratio, weight = ratio[mask.bool()], weight[mask.bool()]
    elif variant == "ref_free":
        per_reply = advantages * token_nll.sum(1)
    else:
        per_reply = positive * token_nll.sum(1) + kl_beta * ((logps - ref_logps) * mask).sum(1)
    if variant in ("alol", "seq"):
        metrics["alol/weight_mean"] = weight.mean().item() if weight.numel() else 0.0
        metrics["alol/weight_clipped_frac"] = ((ratio < weight_min) | (ratio > weight_max)).float().mean().item() if ratio.numel() else 0.0
    loss = per_reply.mean()
    return loss, {"alol/loss": loss.item(), **metrics}
