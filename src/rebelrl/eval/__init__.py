"""Held-out evaluation and run reports."""

from rebelrl.eval.evaluate import evaluate, load_sample_scores, sample_for_eval, save_samples, score_conversations, score_rollout, win_outcomes, win_rate
from rebelrl.eval.report import read_jsonl, write_report

__all__ = ["evaluate", "load_sample_scores", "read_jsonl", "sample_for_eval", "save_samples", "score_conversations", "score_rollout", "win_outcomes", "win_rate", "write_report"]
