"""AdamW and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def make_optimizer(params, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=tuple(betas))


def make_schedule(optimizer, schedule: str, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier on the base lr: linear warm-up, then constant, linear or cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {schedule!r}")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
