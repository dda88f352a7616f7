"""Guided roll-in and roll-out (RLGF, Chang et al., 2023; the TRIL code): a second model writes part of
each training reply, so the return the policy learns from starts, or ends, in states the guide reaches.

``guide.mode`` says who writes what in an iteration:

- ``rollin`` (PPO++): with probability ``guide.prob`` the guide writes a reply to a prompt, the
  prompt's rollouts are forced through its first k tokens (k uniform on 1..L-1) and the policy writes
  the rest. The policy is trained on the tokens it wrote.
- ``rollout`` (AggreVaTeD): the policy writes its replies; with probability ``guide.prob`` the guide
  rewrites each of a prompt's replies after its first k tokens (one k for the prompt's replies, k
  uniform on 1..L-1 for the shortest of them), so the return measures the policy's first k tokens
  against the guide's continuation. The policy is trained on its k tokens alone.
- ``lols``: each iteration ``rollin`` with probability ``guide.switch``, else ``rollout``.
- ``d2lols``: ``rollout`` before iteration ``guide.switch``, ``rollin`` from it on.

Every rollout of a prompt shares its guide prefix (roll-in) or its k (roll-out), so REBEL's pairs and
the group baselines compare replies on equal terms. The guide's tokens are ``Rollout.forced``: never
in a policy loss; log pi_t of every token is the policy's own (recomputed where the guide wrote).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from rebelrl.rollout.base import SamplingParams
from rebelrl.rollout.hf import HFGenerator
from rebelrl.rollout.reset import cut_point
from rebelrl.types import Conversation, Rollout


@dataclass
class Guide:
    generator: HFGenerator  # the guide model, sampling at its own top-p
    params: SamplingParams
    mode: str
    prob: float
    switch: float | None
    seed: int

    def mode_at(self, iteration: int) -> str:
        """``rollin`` or ``rollout`` for ``iteration``; LOLS draws from a stream of the seed and the iteration alone."""
        if self.mode == "lols":
            return "rollin" if random.Random(self.seed * 1_000_003 + iteration).random() < self.switch else "rollout"
        if self.mode == "d2lols":
            return "rollout" if iteration < self.switch else "rollin"
        return self.mode


def guided_rollout(guide: Guide, policy, prompts: list[Conversation], n: int, params: SamplingParams, iteration: int,
                   policy_logps: Callable[[Rollout], torch.Tensor]) -> tuple[Rollout, dict[str, float]]:
    """``n`` replies to each prompt written by the policy (``policy``: its generator) and the guide as
    ``guide.mode_at(iteration)`` says; returns the rollout (``forced``: the guide's tokens) and what the
    guide did. ``policy_logps(rollout)``: (N, T) log pi_t of every completion token, by a forward pass."""
    mode = guide.mode_at(iteration)
    draws = torch.rand(len(prompts), 2, dtype=torch.float64, device="cpu").tolist()  # two numbers a prompt: guided? and k
    if mode == "rollin":
        chosen = [b for b, (u, _) in enumerate(draws) if u < guide.prob]
        prefixes: list[list[int]] = [[] for _ in prompts]
        tokens = 0
        if chosen:
            written = guide.generator.generate([prompts[b] for b in chosen], 1, guide.params)  # only where it rolls in
            stops, tokens = set(guide.generator.stop_ids), int(written.completion_mask.sum())
            for row, b in enumerate(chosen):
                reply = [t for t, m in zip(written.completion_ids[row].tolist(), written.completion_mask[row].tolist()) if m and t not in stops]
                k = cut_point(draws[b][1], min(len(reply), params.max_new_tokens))
                prefixes[b] = reply[:k]
        rollout = policy.generate(prompts, n, params, prefixes=prefixes)
        return rollout, {"guide/rollin": 1.0, "guide/frac": sum(1 for p in prefixes if p) / max(len(prompts), 1),
                         "guide/completions": float(len(chosen)), "guide/tokens": float(tokens)}
    own = policy.generate(prompts, n, params)
    lengths = own.completion_mask.sum(1).view(-1, n)  # (B, n)
    cuts = [cut_point(v, int(lengths[b].min())) if u < guide.prob else 0 for b, (u, v) in enumerate(draws)]  # one k a prompt
    rows = [b * n + j for b, k in enumerate(cuts) if k for j in range(n)]  # the replies the guide rewrites; it sees no other
    own_ids = own.completion_ids.tolist()
    ids, mask, done = own.completion_ids, own.completion_mask, own.finished
    forced, conversations = torch.zeros_like(mask), list(own.conversations)
    if rows:
        finished = guide.generator.generate([prompts[r // n] for r in rows], 1, guide.params,
                                            prefixes=[own_ids[r][: cuts[r // n]] for r in rows])
        T = max(mask.shape[1], finished.completion_mask.shape[1])

        def widen(t: torch.Tensor, value: int = 0) -> torch.Tensor:  # (N, T') -> (N, T), padded on the right
            return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

        pad = guide.generator.tokenizer.pad_token_id
        ids, mask, forced, done = widen(ids, pad), widen(mask), widen(forced), done.clone()
        at = torch.tensor(rows, device=ids.device)
        ids[at] = widen(finished.completion_ids, pad).to(ids.device)
        mask[at] = widen(finished.completion_mask).to(ids.device)
        forced[at] = widen(finished.completion_mask * (1 - finished.forced)).to(ids.device)  # the guide's tokens
        done[at] = finished.finished.to(done.device)
        for i, r in enumerate(rows):
            conversations[r] = finished.conversations[i]
    rollout = replace(own, conversations=conversations, completion_ids=ids, completion_mask=mask, finished=done, forced=forced)
    if own.dropped_mass is not None:  # what the policy's sampler removed, on the tokens it drew (none on the guide's)
        rollout.dropped_mass = torch.nn.functional.pad(own.dropped_mass, (0, mask.shape[1] - own.dropped_mass.shape[1])) * rollout.policy_mask
    # log pi_t of every token is the policy's: where the guide wrote, its own record is the guide's.
    rollout.sample_logps = policy_logps(rollout) * rollout.completion_mask
    return rollout, {"guide/rollin": 0.0, "guide/frac": len(rows) / n / max(len(prompts), 1), "guide/completions": float(len(rows)),
                     "guide/tokens": float(rollout.forced.sum().item())}
