"""Pure loss functions: tensors and coefficients in, ``(loss, metrics)`` out."""

from rebelrl.losses.preference import chipo_loss, dpo_loss, ipo_loss
from rebelrl.losses.rebel import rebel_loss

__all__ = ["chipo_loss", "dpo_loss", "ipo_loss", "rebel_loss"]
