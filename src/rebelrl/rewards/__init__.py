"""Rewards: anything that turns finished conversations into one float each.

A reward is a plain callable ``(list[Conversation]) -> list[float]``; ``RewardFn`` names that shape
so signatures can say what they take. Rule rewards are functions, the reward-model scorer is an
object holding its model; ``load_reward`` turns a config string into either.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rebelrl.types import Conversation


@runtime_checkable
class RewardFn(Protocol):
    """Scores a batch of conversations, one float per conversation, in order."""

    def __call__(self, conversations: list[Conversation]) -> list[float]: ...


# Imported after RewardFn so the submodules can refer to it without a cycle.
from rebelrl.rewards.reasoning import extract_answer, reasoning_gym_prompts, reasoning_gym_reward  # noqa: E402
from rebelrl.rewards.registry import (  # noqa: E402
    BUILTIN_REWARDS,
    RewardError,
    apply_no_eos_penalty,
    check_scores,
    checked_reward,
    load_reward,
)
from rebelrl.rewards.reward_model import RewardModelScorer, last_token_index  # noqa: E402
from rebelrl.rewards.rules import vader_sentiment  # noqa: E402

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardError",
    "RewardModelScorer",
    "apply_no_eos_penalty",
    "check_scores",
    "checked_reward",
    "extract_answer",
    "last_token_index",
    "load_reward",
    "reasoning_gym_prompts",
    "reasoning_gym_reward",
    "vader_sentiment",
]
