"""Shared training plumbing: configs, optimizer and schedule, checkpoints, metrics, progress."""
