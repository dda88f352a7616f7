"""rebelrl: post-train language models with reinforcement learning (REBEL, REFUEL and their baselines)."""

__version__ = "0.1.0"
