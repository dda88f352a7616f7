"""Policy-gradient methods on token batches: RLOO, GRPO (and Dr. GRPO), PPO and A*-PO.

One iteration, top to bottom:
    collect   -> k completions per prompt from pi_t (A*-PO: one), task scores, per-token log pi_t
                 and log pi_ref
    advantage -> RLOO: leave-one-out on the KL-penalised sequence reward; GRPO: group-normalised
                 scores; PPO: GAE on the critic's values with a per-token KL penalty; A*-PO: the
                 score minus V*(x), estimated once per prompt from reference samples
    update    -> epochs x minibatches of completions: the method's token-level loss (PPO: plus the
                 clipped value loss), exact gradient accumulation, clipping, AdamW
    log       -> metrics.jsonl, held-out evaluation, checkpoint

What differs between the methods is a ``Method``: how a batch gets its advantages and which pure
loss is regressed. Everything else (sampling, exact pi_t, scoring, evaluation, checkpoints) is
``Run``'s and REBEL's.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from rebelrl.algos.run import Run, sample_metrics
from rebelrl.logprobs import by_length, completion_logprobs, rollout_logprobs, row_lengths
from rebelrl.losses import (
    astar_po_loss,
    astar_values,
    clipped_policy_loss,
    gae,
    group_normalized_advantages,
    grpo_loss,
    rloo_advantages,
    rloo_loss,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
    value_loss,
    whiten,
)
from rebelrl.rollout import HFGenerator
from rebelrl.train.config import TrainConfig
from rebelrl.train.memory import release_free_memory
from rebelrl.types import Rollout, TokenBatch

# (logps (m, T), values (m, T) or None, batch, rows (m,)) -> (loss, metrics)
TokenLoss = Callable[[torch.Tensor, torch.Tensor | None, TokenBatch, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
# (run, rollout, scores (N,), old_logps (N, T), ref_logps (N, T)) -> (batch, metrics)
Advantages = Callable[[Run, Rollout, torch.Tensor, torch.Tensor, torch.Tensor], tuple[TokenBatch, dict[str, float]]]


@dataclass
class Method:
    advantages: Advantages
    loss: Callable[[TrainConfig, Rollout], TokenLoss]  # (config, rollout) -> the loss of its micro-batches
    # Whether the configured loss averages over tokens (micro-batches weigh by their tokens, counted
    # over every process), else over completions.
    per_token: Callable[[TrainConfig], bool]
    samples_per_prompt: Callable[[TrainConfig], int]


# --- advantages, one function per method ------------------------------------------------------------


def rloo_batch(run: Run, rollout: Rollout, scores, old_logps, ref_logps):
    """Sequence reward minus kl_coef * (log pi_t - log pi_ref), leave-one-out baseline over the k samples.
    The KL covers every completion token, forced ones too (dataset reset, as the authors' code)."""
    mask = rollout.completion_mask
    kl = ((old_logps - ref_logps) * mask).sum(1)  # (N,)
    rewards = scores - run.cfg.rloo.kl_coef * kl
    advantages = rloo_advantages(rewards.view(-1, rollout.group_size)).view(-1)  # (N,)
    return TokenBatch(old_logps, ref_logps, advantages), {"reward_mean": rewards.mean().item(), "kl_to_ref": kl.mean().item()}


def grpo_batch(run: Run, rollout: Rollout, scores, old_logps, ref_logps):
    """Scores normalised within each group (GRPO), or only centred (Dr. GRPO); the KL is in the loss."""
    advantages = group_normalized_advantages(scores.view(-1, rollout.group_size), scale=run.cfg.grpo.scale_advantages).view(-1)
    kl = ((old_logps - ref_logps) * rollout.completion_mask).sum(1)
    return TokenBatch(old_logps, ref_logps, advantages), {"reward_mean": scores.mean().item(), "kl_to_ref": kl.mean().item()}


@torch.no_grad()
def ppo_batch(run: Run, rollout: Rollout, scores, old_logps, ref_logps):
    """Per-token reward -kl_coef * (log pi_t - log pi_ref), plus the score on the last token; GAE
    on the critic's values; advantages whitened over the batch. The KL, the values and the advantages
    cover every completion token, forced ones too (dataset reset, as the authors' code); only the
    policy loss leaves the forced tokens out."""
    cfg, mask = run.cfg.ppo, rollout.completion_mask
    kl = (old_logps - ref_logps) * mask  # (N, T)
    rewards = -cfg.kl_coef * kl
    last = (mask.sum(1) - 1).clamp(min=0)  # (N,) position of each completion's last token
    rewards[torch.arange(len(rollout)), last] += scores
    values = torch.cat([_values(run, rollout, rows) for rows in torch.arange(len(rollout)).split(run.cfg.update.micro_batch_size)])
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    batch = TokenBatch(old_logps, ref_logps, advantages, returns=returns, old_values=values)
    return batch, {"reward_mean": (rewards * mask).sum(1).mean().item(), "kl_to_ref": kl.sum(1).mean().item(), "value_mean": _masked_mean(values, mask)}


def astar_batch(run: Run, rollout: Rollout, scores, old_logps, ref_logps):
    """A* = score - V*(x), V* from reference samples of the same prompt (stage 1, once per prompt)."""
    v_star = torch.tensor([run.astar_values[_prompt_key(c)] for c in rollout.conversations], device=scores.device)  # (N,)
    kl = ((old_logps - ref_logps) * rollout.completion_mask).sum(1)
    return TokenBatch(old_logps, ref_logps, scores - v_star), {"reward_mean": scores.mean().item(), "kl_to_ref": kl.mean().item(), "v_star_mean": v_star.mean().item()}


# --- losses, one closure per method -------------------------------------------------------------------


def _rows(batch: TokenBatch, rows: torch.Tensor, mask: torch.Tensor):
    return batch.old_logps[rows], batch.advantages[rows], mask[rows]


# Each method's loss, given the config and the rollout: the policy terms cover ``rollout.policy_mask``
# (the tokens the policy wrote: not those dataset reset forced), PPO's value loss every completion token.


def rloo_token_loss(cfg: TrainConfig, rollout: Rollout) -> TokenLoss:
    mask = rollout.policy_mask

    def loss_fn(logps, values, batch, rows):
        old, adv, m = _rows(batch, rows, mask)
        return rloo_loss(logps, old, adv, m, cfg.rloo.clip_eps)

    return loss_fn


def grpo_token_loss(cfg: TrainConfig, rollout: Rollout) -> TokenLoss:
    g, mask = cfg.grpo, rollout.policy_mask
    aggregate = {
        "seq_mean_token_mean": seq_mean_token_mean,
        "token_mean": token_mean,
        "seq_mean_token_sum_norm": partial(seq_mean_token_sum_norm, max_len=cfg.rollout.max_new_tokens),
    }[g.aggregation]

    def loss_fn(logps, values, batch, rows):
        old, adv, m = _rows(batch, rows, mask)
        return grpo_loss(logps, old, batch.ref_logps[rows], adv, m, g.clip_eps, g.clip_eps_high, g.beta, aggregate)

    return loss_fn


def ppo_token_loss(cfg: TrainConfig, rollout: Rollout) -> TokenLoss:
    p, mask, every = cfg.ppo, rollout.policy_mask, rollout.completion_mask

    def loss_fn(logps, values, batch, rows):
        old, adv, m = _rows(batch, rows, mask)
        policy, metrics = clipped_policy_loss(logps, old, adv, m, p.clip_eps)
        critic, value_metrics = value_loss(values, batch.old_values[rows], batch.returns[rows], every[rows], p.value_clip)
        return policy + p.vf_coef * critic, {**metrics, **value_metrics}

    return loss_fn


def astar_token_loss(cfg: TrainConfig, rollout: Rollout) -> TokenLoss:
    mask = rollout.policy_mask

    def loss_fn(logps, values, batch, rows):
        m = mask[rows].to(logps.dtype)
        sequence = (logps * m).sum(1)  # (m,) log pi_theta(y|x)
        ref = (batch.ref_logps[rows] * m).sum(1)
        # astar_po_loss regresses beta2 * log(pi/pi_ref) on reward - V*: our advantage is that difference.
        return astar_po_loss(sequence, ref, batch.advantages[rows], torch.zeros_like(sequence), cfg.astar.beta2)

    return loss_fn


def _k(cfg: TrainConfig) -> int:
    return cfg.rollout.samples_per_prompt


METHODS: dict[str, Method] = {
    "rloo": Method(rloo_batch, rloo_token_loss, per_token=lambda c: False, samples_per_prompt=_k),
    "grpo": Method(grpo_batch, grpo_token_loss, per_token=lambda c: c.grpo.aggregation == "token_mean", samples_per_prompt=_k),
    "ppo": Method(ppo_batch, ppo_token_loss, per_token=lambda c: True, samples_per_prompt=_k),
    "astar_po": Method(astar_batch, astar_token_loss, per_token=lambda c: False, samples_per_prompt=lambda c: 1),
}


# --- the loop ---------------------------------------------------------------------------------------


@dataclass
class Collected:
    rollout: Rollout
    batch: TokenBatch
    metrics: dict[str, float]
    scores: torch.Tensor  # (N,)
    old_from_sampler: bool


def collect(run: Run, prompts, method: Method) -> Collected:
    t0 = time.perf_counter()
    extra = estimate_v_star(run, prompts) if run.cfg.algo == "astar_po" else 0
    rollout, guided = run.sample(prompts, method.samples_per_prompt(run.cfg))
    t1 = time.perf_counter()
    scores = run.score(rollout)  # (N,)
    t2 = time.perf_counter()
    collected = assemble(run, rollout, scores, method)
    extra += guided.get("guide/completions", 0)  # the guide's replies count against the budget too
    collected.metrics.update({**guided, "time/rollout": t1 - t0, "time/score": t2 - t1, "completions": len(rollout) + extra})
    return collected


def assemble(run: Run, rollout: Rollout, scores: torch.Tensor, method: Method) -> Collected:
    t0 = time.perf_counter()
    old_logps, from_sampler = run.old_token_logps(rollout)  # (N, T)
    ref_logps = rollout_logprobs(run.ref, rollout, run.sampling.logprob_temperature, run.cfg.update.micro_batch_size)  # (N, T)
    batch, metrics = method.advantages(run, rollout, scores, old_logps, ref_logps)
    run.stop_if_non_finite("advantage", batch.advantages.abs().max().item(), "check the reward's scale and the KL coefficient")
    metrics.update({
        **sample_metrics(rollout, scores),
        "advantage_abs_mean": batch.advantages.abs().mean().item(),
        "time/logprobs": time.perf_counter() - t0,
    })
    return Collected(rollout, batch, metrics, scores, from_sampler)


def _values(run: Run, rollout: Rollout, rows: torch.Tensor, hidden: torch.Tensor | None = None, critic=None) -> torch.Tensor:
    """(m, T) critic values of the states before each completion token of ``rows``; ``critic``: the
    module to call (the trained one, wrapped for several processes), else ``run.critic``."""
    r = rollout
    if run.critic.backbone is None and hidden is None:  # shared: the policy's hidden states
        _, hidden = completion_logprobs(run.policy, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                                        run.sampling.logprob_temperature, return_hidden=True)
    critic = critic if critic is not None else run.critic
    return critic(hidden, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows]) * r.completion_mask[rows]


def update(run: Run, collected: Collected, method: Method) -> dict[str, float]:
    """``epochs`` passes over the completions in shuffled minibatches; one optimizer step per minibatch.

    With several processes the completions are this process's share, a minibatch is its share of the
    global ``minibatch_size``, and the step averages the gradients of all shares."""
    release_free_memory()  # what the rollout's KV cache and the no-grad passes left
    cfg = run.cfg.update
    rollout, batch = collected.rollout, collected.batch
    mask = rollout.policy_mask  # what the policy loss covers: a token mean counts these
    loss_fn = method.loss(run.cfg, rollout)
    shared_critic = run.critic is not None and run.critic.backbone is None
    temperature = run.sampling.logprob_temperature
    minibatch_size = cfg.minibatch_size // run.processes.count  # this process's share of each minibatch
    per_token = method.per_token(run.cfg)
    losses, grad_norms, fit, mismatch = [], [], [], None
    lengths = row_lengths(rollout)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(rollout), device=lengths.device)
        for start in range(0, len(rollout), minibatch_size):
            minibatch = by_length(order[start : start + minibatch_size], lengths)
            # A micro-batch's loss is a mean over its own tokens (or completions); weighted by its share
            # of the minibatch's, the accumulated gradient is the minibatch's mean. A token mean counts
            # the tokens of every process's share, times the processes because their gradients are
            # averaged: a process holding more tokens weighs more, as in one process.
            units = run.processes.sum(mask[minibatch].sum().item()) / run.processes.count if per_token else len(minibatch)
            run.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            micros = minibatch.split(cfg.micro_batch_size)
            for j, micro in enumerate(micros):
                r = rollout
                with run.micro_batch(last=j == len(micros) - 1):
                    out = completion_logprobs(run.learner, r.prompt_ids[micro], r.prompt_mask[micro], r.completion_ids[micro],
                                              r.completion_mask[micro], temperature, return_hidden=shared_critic)
                    logps, hidden = out if shared_critic else (out, None)
                    if not grad_norms:  # before the first step pi_theta must equal pi_t
                        every = rollout.completion_mask[micro]
                        gap = run.first_step_gap(((logps.detach() - batch.old_logps[micro]) * every).sum(1).abs().max().item())
                        if gap > run.cfg.rollout.logprob_tolerance and collected.old_from_sampler:
                            run.stop_trusting_sampler(gap)
                            repaired = assemble(run, rollout, collected.scores, method)
                            repaired.metrics = {**collected.metrics, **repaired.metrics}
                            collected, batch = repaired, repaired.batch
                            gap = ((logps.detach() - batch.old_logps[micro]) * every).sum(1).abs().max().item()
                        mismatch = gap if mismatch is None else max(mismatch, gap)
                    values = _values(run, rollout, micro, hidden, run.critic_learner) if run.critic is not None else None
                    loss, metrics = loss_fn(logps, values, batch, micro)
                    weight = (mask[micro].sum().item() if per_token else len(micro)) / units
                    run.backward(loss * weight)
                total += loss.item() * weight
                fit.append(metrics)
            run.stop_if_non_finite("loss", total, "lower optim.lr, or check the reward's scale")
            grad_norms.append(run.clip_and_step())
            losses.append(total)
    return run.update_summary(collected.metrics, losses, grad_norms, fit, mismatch, collected.old_from_sampler)


# --- A*-PO stage 1 ------------------------------------------------------------------------------------


def _prompt_key(conversation) -> str:
    """A stable name for a prompt, whether or not the conversation already holds the reply."""
    chat = conversation.to_chat()
    prompt = chat[:-1] if chat and chat[-1]["role"] == "assistant" else chat
    return hashlib.sha256(repr(prompt).encode()).hexdigest()[:16]


@torch.no_grad()
def estimate_v_star(run: Run, prompts) -> int:
    """V*(x) = beta1 * log mean_i exp(r(x, y_i) / beta1) over ``astar.ref_samples`` completions of
    pi_ref, for each prompt not seen before; returns how many completions that took. The prompts are
    sampled together, each from a random stream seeded by the prompt itself, so a prompt's estimate
    does not depend on when it is made (a resumed run repeats the uninterrupted one)."""
    cfg = run.cfg.astar
    todo = [p for p in prompts if _prompt_key(p) not in run.astar_values]
    if not todo:
        return 0
    keys = [_prompt_key(p) for p in todo]
    generator = HFGenerator(run.ref, run.tokenizer, run.cfg.rollout.batch_size)
    seeds = [run.cfg.seed * 1_000_003 + int(key, 16) % 2**31 for key in keys]
    rollout = generator.generate(todo, cfg.ref_samples, run.sampling, seeds=seeds)
    values = astar_values(run.score(rollout).view(len(todo), cfg.ref_samples).double(), cfg.beta1)  # (len(todo),)
    run.astar_values.update(zip(keys, values.tolist()))
    return len(todo) * cfg.ref_samples


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp(min=1)).item()


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run RLOO, GRPO, PPO or A*-PO as configured; returns the final summary."""
    method = METHODS[cfg.algo]
    completions = cfg.rollout.prompts_per_iter * method.samples_per_prompt(cfg)
    run = Run.start(cfg, steps_per_iteration=cfg.update.epochs * math.ceil(completions / cfg.update.minibatch_size))
    for iteration in run.progress():
        t0 = time.perf_counter()
        collected = collect(run, run.prompts_for(iteration), method)
        t1 = time.perf_counter()
        metrics = update(run, collected, method)
        metrics["time/train"] = time.perf_counter() - t1
        metrics["time/total"] = time.perf_counter() - t0
        run.end_iteration(iteration, metrics, collected.rollout)
    return run.finish()


__all__ = ["train", "collect", "update", "METHODS", "estimate_v_star"]
