"""Held-out evaluation: mean reward, KL to the reference, length, and win rate against a baseline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rebelrl.logprobs import rollout_logprobs
from rebelrl.rewards import RewardFn, apply_no_eos_penalty, check_scores
from rebelrl.rollout import Generator, SamplingParams
from rebelrl.seeding import seeded
from rebelrl.types import Conversation, Rollout


def score_conversations(
    reward_fn: RewardFn, conversations: list[Conversation], finished: torch.Tensor, no_eos_penalty: float | None, name: str = "reward"
) -> torch.Tensor:
    """Checked task scores, the no-EOS penalty applied where ``finished`` (N,) is False. -> (N,) float32,
    on the device of ``finished`` (the rollout's), where the log-probs they meet live."""
    scores = check_scores(reward_fn(conversations), len(conversations), name)
    scores = apply_no_eos_penalty(scores, finished.tolist(), no_eos_penalty)
    return torch.tensor(scores, dtype=torch.float32, device=finished.device)


def score_rollout(reward_fn: RewardFn, rollout: Rollout, no_eos_penalty: float | None, name: str = "reward") -> torch.Tensor:
    """Task scores of every completion of a rollout. -> (N,) float32."""
    return score_conversations(reward_fn, rollout.conversations, rollout.finished, no_eos_penalty, name)


def win_outcomes(scores: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """1 where ``scores`` beats ``baseline``, 0.5 for a tie, 0 otherwise; same shapes in and out."""
    if scores.shape != baseline.shape:
        raise ValueError(f"win rates need scores for the same prompts, got {tuple(scores.shape)} vs {tuple(baseline.shape)}")
    baseline = baseline.to(scores.device)  # a baseline read back from the run directory is on the CPU
    return (scores > baseline).float() + 0.5 * (scores == baseline).float()


def win_rate(scores: torch.Tensor, baseline: torch.Tensor) -> float:
    """Fraction of prompts where ``scores`` beats ``baseline``; ties count half. (N,), (N,) -> float."""
    return win_outcomes(scores, baseline).mean().item()


def sample_for_eval(generator: Generator, prompts: list[Conversation], params: SamplingParams, seed: int) -> Rollout:
    """One completion per prompt, with its own seed: the same noise at every evaluation, and the
    training RNG streams (CPU and CUDA) are left exactly where they were."""
    with seeded(seed):
        return generator.generate(prompts, 1, params)


def evaluate(
    generator: Generator,
    ref_model: torch.nn.Module,
    prompts: list[Conversation],
    reward_fn: RewardFn,
    params: SamplingParams,
    seed: int,
    no_eos_penalty: float | None,
    baseline_scores: torch.Tensor | None = None,
    batch_size: int = 16,
    recompute_policy_logps: bool = False,
) -> tuple[dict[str, float], Rollout, torch.Tensor]:
    """Sample, score and compare on held-out prompts.

    ``kl_to_ref`` is the sequence-level estimate E_y~pi[log pi(y|x) - log pi_ref(y|x)] (nats), with
    the same temperature-scaled distributions that training uses. The policy's log-probs are the
    sampler's record, or a forward pass of ``generator.model`` with ``recompute_policy_logps`` (where
    the record is not exact, as in bfloat16). Greedy decoding (temperature 0) draws no sample, so
    the same log-ratio is reported as ``greedy_logratio_to_ref`` instead.

    Returns:
        metrics, the rollout, and the (N,) scores (to serve as the baseline of later evaluations).
    """
    rollout, scores, logratio = _sample(generator, ref_model, prompts, reward_fn, params, seed, no_eos_penalty, batch_size, recompute_policy_logps)
    return eval_metrics(sample_rows(rollout, scores, logratio), params, baseline_scores), rollout, scores


def eval_rows(generator: Generator, ref_model: torch.nn.Module, prompts: list[Conversation], reward_fn: RewardFn, params: SamplingParams,
              seed: int, no_eos_penalty: float | None, batch_size: int = 16, recompute_policy_logps: bool = False) -> list[dict]:
    """``evaluate``'s samples of ``prompts``, one record per prompt (``sample_rows``): for an
    evaluation whose prompts are shared among processes, gathered, then summed up by ``eval_metrics``."""
    return sample_rows(*_sample(generator, ref_model, prompts, reward_fn, params, seed, no_eos_penalty, batch_size, recompute_policy_logps))


def _sample(generator, ref_model, prompts, reward_fn, params, seed, no_eos_penalty, batch_size, recompute_policy_logps):
    """The rollout, its (N,) scores and (N,) log pi(y|x) - log pi_ref(y|x)."""
    rollout = sample_for_eval(generator, prompts, params, seed)
    scores = score_rollout(reward_fn, rollout, no_eos_penalty)
    if recompute_policy_logps:
        policy_logps = rollout_logprobs(generator.model, rollout, params.logprob_temperature, batch_size).sum(dim=1)  # (N,)
    else:
        policy_logps = rollout.sample_logps.sum(dim=1)  # (N,)
    ref_logps = rollout_logprobs(ref_model, rollout, params.logprob_temperature, batch_size).sum(dim=1)  # (N,)
    return rollout, scores, policy_logps - ref_logps


def sample_rows(rollout: Rollout, scores: torch.Tensor, logratio: torch.Tensor) -> list[dict]:
    """One record per sample: what ``save_samples`` writes (prompt, completion, score, finished) and
    what the metrics need (completion tokens, log pi - log pi_ref). scores, logratio: (N,)."""
    return [
        {"prompt": conv.messages[-2].content, "completion": conv.last_assistant, "score": score, "finished": done, "length": length,
         "logratio": ratio}
        for conv, score, done, length, ratio in zip(rollout.conversations, scores.tolist(), rollout.finished.tolist(),
                                                    rollout.completion_lengths.tolist(), logratio.tolist())
    ]


def eval_metrics(rows: list[dict], params: SamplingParams, baseline_scores: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out metrics of ``sample_rows`` records (in prompt order, to meet the baseline's (N,) scores)."""
    scores = torch.tensor([r["score"] for r in rows], dtype=torch.float32)  # float32 values: the tensor they came from
    metrics = {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        kl_key(params): torch.tensor([r["logratio"] for r in rows], dtype=torch.float32).mean().item(),
        "response_length": torch.tensor([r["length"] for r in rows]).float().mean().item(),
        "frac_no_eos": (~torch.tensor([r["finished"] for r in rows])).float().mean().item(),
        "n_prompts": len(rows),
    }
    if baseline_scores is not None:
        metrics["win_rate_vs_initial"] = win_rate(scores, baseline_scores)
    return metrics


def kl_key(params: SamplingParams) -> str:
    """The name of E[log pi - log pi_ref] over evaluation replies: a KL only when they were sampled."""
    return "kl_to_ref" if params.temperature > 0 else "greedy_logratio_to_ref"


def save_samples(path: Path, rollout: Rollout, scores: torch.Tensor) -> None:
    """Completions with their scores, one JSON object per prompt, for a person to read (written whole
    or not at all: a later run compares with these, so a kill must not leave half of them)."""
    rows = [{"prompt": conv.messages[-2].content, "completion": conv.last_assistant, "score": score, "finished": done}
            for conv, score, done in zip(rollout.conversations, scores.tolist(), rollout.finished.tolist())]
    save_sample_rows(path, rows)


def save_sample_rows(path: Path, rows: list[dict]) -> None:
    """``save_samples`` from ``sample_rows`` records."""
    from rebelrl.train.checkpoint import write_atomic

    write_atomic(path, "".join(json.dumps({key: r[key] for key in ("prompt", "completion", "score", "finished")}) + "\n" for r in rows))


def load_sample_scores(path: Path) -> torch.Tensor:
    return torch.tensor([json.loads(line)["score"] for line in path.read_text().splitlines() if line.strip()], dtype=torch.float32)
