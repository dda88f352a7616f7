"""REBEL: sample pairs from the current policy, score them, regress relative log-ratios on relative rewards.

One iteration, top to bottom:
    collect  -> k completions per prompt from pi_t (the policy before this iteration's update)
    score    -> task reward, no-EOS penalty, minus kl_coef * (log pi_t - log pi_ref) per sequence
    pair     -> (B, 2) pairs: the two samples (k = 2), best vs worst or adjacent (k > 2)
    update   -> epochs x minibatches of ``rebel_loss``, gradient accumulation, clipping, AdamW, schedule
    log      -> metrics.jsonl, held-out evaluation, checkpoint
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rebelrl.logprobs import by_length, completion_logprobs, rollout_logprobs, row_lengths
from rebelrl.losses import chipo_loss, dpo_loss, ipo_loss, rebel_loss
from rebelrl.train.config import TrainConfig
from rebelrl.train.memory import release_free_memory
from rebelrl.algos.run import Run, sample_metrics
from rebelrl.types import PairBatch, Rollout


def make_pairs(scores: torch.Tensor, group_size: int, pairing: str) -> torch.Tensor:
    """Rows of a prompt-major rollout that form each pair.

    Args:
        scores: (N,) task scores, N = B * k.
        pairing: ``best_worst`` (one pair per prompt: highest vs lowest score; ties resolve to the
            first maximum and the last minimum, so the two rows always differ) or ``adjacent``
            (completions (0, 1), (2, 3), ... of each prompt).

    Returns:
        (P, 2) long tensor of row indices.
    """
    k = group_size
    groups = scores.view(-1, k)  # (B, k)
    base = torch.arange(groups.shape[0], device=scores.device)[:, None] * k  # (B, 1)
    if k == 2:
        return base + torch.tensor([[0, 1]], device=scores.device)
    if pairing == "best_worst":
        best = groups.argmax(dim=1)  # first maximum
        worst = k - 1 - groups.flip(dims=[1]).argmin(dim=1)  # last minimum
        return base + torch.stack([best, worst], dim=1)
    if pairing == "adjacent":
        return (base[:, :, None] + torch.arange(k, device=scores.device).view(1, k // 2, 2)).view(-1, 2)
    raise ValueError(f"unknown pairing {pairing!r}")


PairLoss = Callable[[torch.Tensor, PairBatch, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Collected:
    rollout: Rollout
    pairs: PairBatch
    metrics: dict[str, float]
    scores: torch.Tensor  # (N,) task scores of the rollout's rows
    ref_tokens: torch.Tensor  # (N, T) log pi_ref of each completion token
    old_from_sampler: bool  # log pi_t is the sampler's record rather than a forward pass


def collect(run: Run, prompts) -> Collected:
    """Sample, score, compute log pi_t and log pi_ref, and form pairs (no gradients)."""
    cfg: TrainConfig = run.cfg
    t0 = time.perf_counter()
    rollout, guided = run.sample(prompts, cfg.rollout.samples_per_prompt)
    t1 = time.perf_counter()
    scores = run.score(rollout)  # (N,)
    t2 = time.perf_counter()
    index = make_pairs(scores, cfg.rollout.samples_per_prompt, cfg.rollout.pairing)  # (B, 2)
    batch = assemble(run, rollout, scores, index)
    # the guide's replies count against the budget too
    batch.metrics.update({**guided, "time/rollout": t1 - t0, "time/score": t2 - t1,
                          "completions": len(rollout) + guided.get("guide/completions", 0)})
    return batch


def assemble(run: Run, rollout: Rollout, scores: torch.Tensor, index: torch.Tensor, ref_tokens: torch.Tensor | None = None) -> Collected:
    """Log pi_t and log pi_ref of every row, the KL-penalised rewards, the (B, 2) pairs and their metrics.

    The pairs' log-probs sum over the tokens the policy wrote (``rollout.policy_mask``): with dataset
    reset both replies of a pair continue one forced prefix, and the regression is on their
    continuations. The KL penalty covers every completion token, as in the authors' reset code; the
    prefix's share of it is the same for both replies, so it cancels in the pair's reward difference.

    Args:
        scores: (N,) task scores; index: (B, 2) rows forming each pair; ref_tokens: (N, T) if known.
    """
    t0 = time.perf_counter()
    old_tokens, from_sampler = run.old_token_logps(rollout)  # (N, T)
    if ref_tokens is None:
        ref_tokens = rollout_logprobs(run.ref, rollout, run.sampling.logprob_temperature, run.cfg.update.micro_batch_size * 2)
    kl = (old_tokens - ref_tokens).sum(1)  # (N,) log pi_t(y|x) - log pi_ref(y|x)
    rewards = scores - run.cfg.rebel.kl_coef * kl
    own = rollout.policy_mask.to(old_tokens.dtype)
    old_logps, ref_logps = (old_tokens * own).sum(1), (ref_tokens * own).sum(1)  # (N,) over the policy's own tokens
    pairs = PairBatch(index=index, rewards=rewards[index], scores=scores[index], old_logps=old_logps[index], ref_logps=ref_logps[index],
                      lengths=rollout.policy_mask.sum(1)[index])
    metrics = batch_metrics(rollout, pairs, scores, rewards, kl)
    metrics["time/logprobs"] = time.perf_counter() - t0
    return Collected(rollout, pairs, metrics, scores, ref_tokens, from_sampler)


def batch_metrics(rollout: Rollout, pairs: PairBatch, scores, rewards, kl) -> dict[str, float]:
    """What every iteration logs about its samples and pairs; scores, rewards, kl: (N,)."""
    return {
        **sample_metrics(rollout, scores),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "kl_to_ref": kl.mean().item(),
        "pair_score_gap": (pairs.scores[:, 0] - pairs.scores[:, 1]).abs().mean().item(),
    }


def rebel_pair_loss(eta: float) -> PairLoss:
    def loss_fn(logps: torch.Tensor, pairs: PairBatch, micro: torch.Tensor):
        return rebel_loss(logps, pairs.old_logps[micro], pairs.rewards[micro], eta)

    return loss_fn


def preference_pair_loss(loss: str, beta: float, r_max: float | None = None) -> PairLoss:
    """DPO, IPO or chi-PO on each pair ordered better-first (online DPO: pairs from the current
    policy, labelled by the reward). Pairs with equal scores carry no preference and weigh 0; the
    loss is scaled to a mean over all the micro-batch's pairs, so gradient accumulation stays exact."""
    pair_losses = {
        "dpo": lambda logps, ref, lengths: dpo_loss(logps, ref, beta),
        "ipo": lambda logps, ref, lengths: ipo_loss(logps, ref, beta, lengths),
        "chipo": lambda logps, ref, lengths: chipo_loss(logps, ref, beta, r_max),
    }
    pair_loss = pair_losses[loss]

    def loss_fn(logps: torch.Tensor, pairs: PairBatch, micro: torch.Tensor):
        scores, ref, lengths = pairs.scores[micro], pairs.ref_logps[micro], pairs.lengths[micro]  # (m, 2)
        flip = scores[:, 1] > scores[:, 0]
        order = torch.stack([flip.long(), 1 - flip.long()], dim=1)  # (m, 2) column 0 = chosen
        keep = scores[:, 0] != scores[:, 1]
        if not keep.any():
            return (logps * 0).sum(), {"pairs/kept_frac": 0.0}
        chosen_first = [t.gather(1, order)[keep] for t in (logps, ref, lengths.to(logps.dtype))]
        value, metrics = pair_loss(*chosen_first)
        return value * keep.float().mean(), {**metrics, "pairs/kept_frac": keep.float().mean().item()}

    return loss_fn


def update(run: Run, batch: Collected, loss_fn: PairLoss | None = None) -> dict[str, float]:
    """``epochs`` passes over the pairs in shuffled minibatches; one optimizer step per minibatch.

    ``loss_fn(logps (m, 2), pairs, micro (m,)) -> (loss, metrics)`` is REBEL's regression unless given.
    With several processes, ``pairs`` are this process's share, a minibatch is its share of the global
    ``minibatch_size``, and the step averages the gradients of all shares.
    """
    release_free_memory()  # what the rollout's KV cache and the no-grad passes left
    cfg = run.cfg.update
    loss_fn = loss_fn or rebel_pair_loss(run.cfg.rebel.eta)
    rollout, pairs = batch.rollout, batch.pairs
    # Scores are checked as they come; a reward can still overflow through the KL penalty.
    run.stop_if_non_finite("reward after the KL penalty", pairs.rewards.abs().max().item(), "check rebel.kl_coef and the reference model")
    temperature = run.sampling.logprob_temperature
    minibatch_size = cfg.minibatch_size // run.processes.count  # this process's share of each minibatch
    losses, grad_norms, fit, mismatch = [], [], [], None
    pair_lengths = row_lengths(rollout)[pairs.index].max(dim=1).values  # (n_pairs,)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(pairs), device=pair_lengths.device)
        for start in range(0, len(pairs), minibatch_size):
            minibatch = by_length(order[start : start + minibatch_size], pair_lengths)
            run.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for m0 in range(0, len(minibatch), cfg.micro_batch_size):
                micro = minibatch[m0 : m0 + cfg.micro_batch_size]  # (m,)
                rows = pairs.index[micro].reshape(-1)  # (2m,) pair-major: row 2j is y, 2j+1 is y'
                with run.micro_batch(last=m0 + cfg.micro_batch_size >= len(minibatch)):
                    logps = completion_logprobs(
                        run.learner,
                        rollout.prompt_ids[rows],
                        rollout.prompt_mask[rows],
                        rollout.completion_ids[rows],
                        rollout.completion_mask[rows],
                        temperature,
                    ) * rollout.policy_mask[rows]
                    logps = logps.sum(1).view(-1, 2)  # (m, 2) over the policy's own tokens
                    if not grad_norms:
                        # Before the first step pi_theta must equal pi_t, or the regression target is biased.
                        gap = run.first_step_gap((logps.detach() - pairs.old_logps[micro]).abs().max().item())
                        if gap > run.cfg.rollout.logprob_tolerance and batch.old_from_sampler:
                            # The sampler's record is not this forward's: recompute log pi_t for the whole
                            # batch now, while theta is still theta_t, and from now on.
                            run.stop_trusting_sampler(gap)
                            repaired = assemble(run, rollout, batch.scores, pairs.index, batch.ref_tokens)
                            seconds = batch.metrics["time/logprobs"] + repaired.metrics["time/logprobs"]
                            repaired.metrics = {**batch.metrics, **repaired.metrics, "time/logprobs": seconds}
                            batch, pairs = repaired, repaired.pairs
                            gap = (logps.detach() - pairs.old_logps[micro]).abs().max().item()
                        mismatch = gap if mismatch is None else max(mismatch, gap)
                    loss, metrics = loss_fn(logps, pairs, micro)
                    # Weight by the micro-batch's share so accumulated gradients equal the minibatch mean.
                    run.backward(loss * len(micro) / len(minibatch))
                total += loss.item() * len(micro) / len(minibatch)
                fit.append(metrics)
            span = f"[{pairs.rewards.min().item():.3g}, {pairs.rewards.max().item():.3g}]"
            run.stop_if_non_finite("loss", total, f"the pair rewards span {span}: scale the reward down if it is large, {_eta_advice(run.cfg)}"
                                                  "else lower optim.lr")
            grad_norms.append(run.clip_and_step())
            losses.append(total)
    return run.update_summary(batch.metrics, losses, grad_norms, fit, mismatch, batch.old_from_sampler)


def _eta_advice(cfg: TrainConfig) -> str:
    """REBEL regresses onto eta times the reward difference: a huge eta overflows the loss as a huge reward does."""
    if cfg.algo == "rebel" or (cfg.algo == "refuel" and cfg.refuel.loss == "rebel"):
        return f"or lower rebel.eta={cfg.rebel.eta:g} if it is (the target is eta times the reward difference), "
    return ""


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run REBEL (or online DPO: the same pairs, a preference loss) as configured; returns the final
    summary (also printed and written to report.md)."""
    run = Run.start(cfg, steps_per_iteration=cfg.update.epochs * math.ceil(cfg.pairs_per_iter / cfg.update.minibatch_size))
    d = cfg.online_dpo
    loss_fn = preference_pair_loss(d.loss, d.beta, d.r_max) if cfg.algo == "online_dpo" else None
    for iteration in run.progress():
        t0 = time.perf_counter()
        batch = collect(run, run.prompts_for(iteration))
        t1 = time.perf_counter()
        metrics = update(run, batch, loss_fn)
        metrics["time/train"] = time.perf_counter() - t1
        metrics["time/total"] = time.perf_counter() - t0
        run.end_iteration(iteration, metrics, batch.rollout)
    return run.finish()


__all__ = ["train", "collect", "assemble", "update", "make_pairs"]
