"""REFUEL: REBEL's regression on dialogues, on the relative future (Gao et al., ICLR 2025).

One iteration, top to bottom:
    sample   -> an end turn L ~ U{1..H} and a branch turn h ~ U{1..L} per dialogue (authors' scheme)
    roll in  -> the current policy and the simulated user play turns 1..h-1
    branch   -> two fresh policy replies at turn h from the same prefix (the only tokens trained on)
    continue -> each branch plays on with the policy and the user to turn L; both are scored at L
    update   -> ``rebel_loss`` on the log-probs of the two turn-h replies, exactly as REBEL's update

Regressing on one turn per dialogue keeps the estimate of the difference of the two branches'
Q-values unbiased; rolling in with the current policy trains on the conversations the policy itself
will have, which is what single-turn methods on fixed earlier turns miss (covariate shift).

The same loop, with ``refuel.rollin=reference`` (earlier turns from the frozen initial policy) and
``refuel.target=turn`` (score at turn h, no future), is the single-turn baseline of the paper, with
``refuel.loss`` choosing REBEL's regression or DPO.
"""

from __future__ import annotations

import math
import time

import torch

from rebelrl.algos.rebel import Collected, assemble, preference_pair_loss, update
from rebelrl.algos.run import Run
from rebelrl.rollout import HFGenerator
from rebelrl.rollout.dialogue import play
from rebelrl.train.config import TrainConfig
from rebelrl.types import Conversation


def sample_turns(n: int, horizon: int, end_turn: str) -> tuple[list[int], list[int]]:
    """(h, L) per dialogue: L ~ U{1..H} (or H), then h ~ U{1..L}; drawn from torch's RNG (resumable)."""
    ends = torch.randint(1, horizon + 1, (n,)) if end_turn == "sampled" else torch.full((n,), horizon)
    branch = (torch.rand(n) * ends).long() + 1  # uniform on 1..L
    return branch.tolist(), ends.tolist()


def roll_in(generator, env, starts: list[Conversation], branch: list[int], params) -> tuple[list[Conversation], list[int]]:
    """Play turns 1..h-1 so each dialogue ends with the user's message of turn h.

    A dialogue the environment ends before turn h (a solved game) branches at the turn where it
    ended instead, from the prefix before that turn. Returns the prefixes and the branch turns.
    """
    prefixes, branch = list(starts), list(branch)
    for turn in range(1, max(branch, default=1)):
        rows = [i for i in range(len(prefixes)) if turn < branch[i]]
        if not rows:
            break
        played = play(generator, env, [prefixes[i] for i in rows], [1] * len(rows), params, respond_last=True)
        for i, conv, ended in zip(rows, played.conversations, played.done):
            if ended:
                branch[i] = turn
            else:
                prefixes[i] = conv
    return prefixes, branch


def collect(run: Run, starts: list[Conversation], rollin_generator) -> Collected:
    cfg: TrainConfig = run.cfg
    params, env = run.sampling, run.task.env
    t0 = time.perf_counter()
    branch, ends = sample_turns(len(starts), cfg.task.horizon, cfg.refuel.end_turn)
    prefixes, branch = roll_in(rollin_generator, env, starts, branch, params)
    rollout = run.generator.generate(prefixes, 2, params)  # (2B,) turn-h replies, prompt-major pairs
    finals = rollout.conversations
    if cfg.refuel.target == "future":
        finals = continue_branches(run, env, finals, [ends[j // 2] - branch[j // 2] for j in range(len(finals))])
    t1 = time.perf_counter()
    scores = run.score_conversations(finals, rollout.finished)  # (2B,)
    t2 = time.perf_counter()
    # The pair is the two turn-h replies: their log pi_t and log pi_ref are those of the branch tokens.
    batch = assemble(run, rollout, scores, torch.arange(len(finals), device=scores.device).view(-1, 2))  # (B, 2) branches of a dialogue
    batch.metrics.update({
        "branch_turn_mean": sum(branch) / len(branch),
        "end_turn_mean": sum(ends) / len(ends),
        "time/rollout": t1 - t0,
        "time/score": t2 - t1,
    })
    return batch


def continue_branches(run: Run, env, branches: list[Conversation], turns_left: list[int]) -> list[Conversation]:
    """Each branch hears the user's answer to its turn-h reply, then plays ``turns_left`` more turns."""
    ask = [j for j, left in enumerate(turns_left) if left > 0]
    convs, done = list(branches), [left <= 0 for left in turns_left]
    for j, result in zip(ask, env.step([convs[j] for j in ask]) if ask else []):
        if result.done:
            done[j] = True
        else:
            convs[j] = convs[j].with_reply(result.user_message, role="user")
    return play(run.generator, env, convs, turns_left, run.sampling, done=done).conversations


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run REFUEL (or its single-turn baselines) as configured; returns the final summary."""
    steps = cfg.update.epochs * math.ceil(cfg.rollout.prompts_per_iter / cfg.update.minibatch_size)
    run = Run.start(cfg, steps_per_iteration=steps)
    rollin = run.generator if cfg.refuel.rollin == "policy" else HFGenerator(run.ref, run.tokenizer, cfg.rollout.batch_size)
    loss_fn = preference_pair_loss("dpo", cfg.refuel.beta) if cfg.refuel.loss == "dpo" else None
    for iteration in run.progress():
        t0 = time.perf_counter()
        batch = collect(run, run.prompts_for(iteration), rollin)
        t1 = time.perf_counter()
        metrics = update(run, batch, loss_fn)
        metrics["time/train"] = time.perf_counter() - t1
        metrics["time/total"] = time.perf_counter() - t0
        run.end_iteration(iteration, metrics, batch.rollout)
    return run.finish()
