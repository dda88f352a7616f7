"""Pure loss functions: tensors and coefficients in, ``(loss, metrics)`` out."""

from rebelrl.losses.advantages import gae, group_normalized_advantages, kl_k1, kl_k3, rloo_advantages, whiten
from rebelrl.losses.astar import astar_po_loss, astar_values
from rebelrl.losses.policy_gradient import (
    clipped_policy_loss,
    grpo_loss,
    rloo_loss,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
    value_loss,
)
from rebelrl.losses.offline import alol_loss, bradley_terry_loss, hypo_kl_loss, sft_loss
from rebelrl.losses.preference import chipo_loss, dpo_loss, ipo_loss
from rebelrl.losses.rebel import rebel_loss

__all__ = [
    "alol_loss",
    "astar_po_loss",
    "astar_values",
    "bradley_terry_loss",
    "chipo_loss",
    "clipped_policy_loss",
    "dpo_loss",
    "gae",
    "group_normalized_advantages",
    "hypo_kl_loss",
    "grpo_loss",
    "ipo_loss",
    "kl_k1",
    "kl_k3",
    "rebel_loss",
    "rloo_advantages",
    "rloo_loss",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "sft_loss",
    "token_mean",
    "value_loss",
    "whiten",
]
