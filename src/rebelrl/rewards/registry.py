"""From a config string to a reward, and the checks every score passes before training uses it.

A config names a reward as ``reward: vader`` or ``reward: my_pkg.scoring:length_reward`` with
optional ``reward_kwargs``. Errors say which spec failed and why, because a typo here otherwise
surfaces as an ``AttributeError`` deep inside the first rollout.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Set
from typing import TYPE_CHECKING, Any

from rebelrl.errors import UserError
from rebelrl.imports import build_object, call_user_code, import_object

if TYPE_CHECKING:
    from rebelrl.rewards import RewardFn

# Built-in names resolve through the same import path as user rewards, so both behave alike.
BUILTIN_REWARDS: dict[str, str] = {
    "vader": "rebelrl.rewards.rules:vader_sentiment",
    "reasoning_gym": "rebelrl.rewards.reasoning:reasoning_gym_reward",
}


class RewardError(UserError, ValueError):
    """A reward that cannot be built, or that returned scores training cannot use."""


def _resolve(spec: str) -> Any:
    """The object named by ``spec``: a key of ``BUILTIN_REWARDS`` or ``"package.module:attr.sub"``."""
    path = BUILTIN_REWARDS.get(spec, spec)
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip() or ":" in attr_path:
        known = ", ".join(sorted(BUILTIN_REWARDS))
        raise RewardError(
            f"reward {spec!r}: expected a built-in name ({known}) or an import path 'package.module:attr'"
        )
    return import_object(path, "reward")


def load_reward(spec: str, kwargs: dict | None = None) -> RewardFn:
    """Build the reward named by ``spec``.

    With non-empty ``kwargs`` the named object is a factory and ``obj(**kwargs)`` is the reward
    (e.g. ``"rebelrl.rewards.reward_model:RewardModelScorer.from_pretrained"`` with
    ``{"name_or_path": ...}``). Without kwargs the object is the reward itself, except that a class
    is always instantiated: using a class as the reward would silently "score" by constructing one
    instance per batch.
    """
    obj = build_object(_resolve(spec), spec, "reward", kwargs)
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {type(obj).__name__} object is not callable")
    return obj


def apply_no_eos_penalty(scores: list[float], finished: list[bool], penalty: float | None) -> list[float]:
    """Replace the score of every completion that never emitted EOS by ``penalty``.

    A truncated reply is judged on text the policy did not choose to end there; a fixed penalty
    stops the policy from learning that rambling past the budget pays. ``None`` leaves scores as is.
    """
    if len(scores) != len(finished):
        raise ValueError(f"got {len(scores)} scores but {len(finished)} finished flags")
    if penalty is None:
        return list(scores)
    return [float(s) if done else float(penalty) for s, done in zip(scores, finished)]


def check_scores(scores: Any, n: int, spec: str, row: Callable[[int], str] | None = None) -> list[float]:
    """``scores`` as a list of ``n`` finite floats, or a ``RewardError`` naming the reward and the row.

    ``row(i)`` names the conversation at position ``i`` the way the user finds it (a held-out prompt,
    a data row); by default it is "score i". A NaN reward does not crash anything by itself; it
    turns the loss into NaN a few steps later, far from the cause, so it is stopped here.
    """
    row = row or (lambda i: f"score {i}")
    # A dict or a set has a length and iterates (over its keys), so it would pass for scores; a string
    # iterates over characters. Only an ordered sequence lines its scores up with the conversations.
    if isinstance(scores, (str, bytes, Mapping, Set)) or not (hasattr(scores, "__len__") and hasattr(scores, "__getitem__")):
        raise RewardError(
            f"reward {spec!r} returned {type(scores).__name__}, expected a list of {n} floats (one per conversation, in order)"
        )
    if len(scores) != n:
        raise RewardError(f"reward {spec!r} returned {len(scores)} scores for {n} conversations")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise RewardError(f"reward {spec!r}: {row(i)} is {s!r} ({type(s).__name__}), expected a float")
        if not math.isfinite(s):
            raise RewardError(f"reward {spec!r}: {row(i)} is {s!r}, expected a finite float")
        out.append(float(s))
    return out


def checked_reward(reward_fn: RewardFn, spec: str, row: Callable[[int], str] | None = None) -> RewardFn:
    """``reward_fn`` with its scores checked on the way out, so that whoever calls it, an error names
    the reward by its spec and each conversation by ``row(i)``."""

    reward_fn = user_reward(reward_fn, spec)

    def scored(conversations):
        return check_scores(reward_fn(conversations), len(conversations), spec, row)

    return scored


def user_reward(reward_fn: RewardFn, spec: str) -> RewardFn:
    """``reward_fn`` called as user code (``call_user_code``): ``sys.exit`` inside it is an error
    naming the reward, and an exception it raises says which reward raised it, scoring what."""
    if getattr(reward_fn, "_rebelrl_user_reward", False):
        return reward_fn

    def reward(conversations):
        return call_user_code(reward_fn, f"reward {spec!r}", f"scoring {len(conversations)} conversations", conversations)

    reward._rebelrl_user_reward = True
    return reward
