"""Pure loss functions: tensors and coefficients in, ``(loss, metrics)`` out."""

from rebelrl.losses.rebel import rebel_loss

__all__ = ["rebel_loss"]
