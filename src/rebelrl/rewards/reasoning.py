"""Reasoning-gym tasks: prompts with checkable answers, scored by each dataset's own checker.

Contract: a conversation for a reasoning-gym task carries the dataset entry it was built from in
``conversation.meta["entry"]`` (the dict with ``question``, ``answer`` and ``metadata``, where
``metadata["source_dataset"]`` names the dataset). ``reasoning_gym_prompts`` builds such
conversations; any other source of prompts must keep the same key for the reward to work.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable

from rebelrl.rewards.registry import RewardError
from rebelrl.types import Conversation

DEFAULT_INSTRUCTION = "Think step by step, then give only the final answer inside <answer></answer> tags."

_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE = re.compile(r"\banswer\s*(?:\bis\b\s*:?|:|=)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer written in ``text``, or ``None`` when there is none.

    Rules, first that applies wins:

    1. ``<answer>...</answer>`` tags: the content of the last pair, stripped (``None`` if empty).
       Once a reply uses the tags nothing else is guessed, so numbers in the reasoning never leak in.
    2. The last line saying ``Answer: X``, ``Final answer: X`` or ``The answer is X``: ``X``, without
       a trailing period or ``**`` emphasis.
    3. The last number in the text (thousands separators dropped), e.g. ``"3 + 4 makes 7"`` -> ``"7"``.

    >>> extract_answer("3 + 4 = 7, so <answer> 7 </answer>")
    '7'
    >>> extract_answer("Adding them up.\\nThe answer is 12.")
    '12'
    >>> extract_answer("It comes to 1,250 apples") , extract_answer("no idea")
    ('1250', None)
    """
    tagged = _TAGGED.findall(text)
    if tagged:
        return tagged[-1].strip() or None
    for line in reversed(text.splitlines()):
        match = _ANSWER_LINE.search(line)
        if match:
            answer = match.group(1).strip(" *").rstrip(".").strip(" *")
            if answer:
                return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


@lru_cache(maxsize=None)
def _score_fn(source_dataset: str) -> Callable[[str | None, dict[str, Any]], float]:
    # get_score_answer_fn builds a dataset instance on each call; one per dataset name is enough.
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(source_dataset)


def _entry(conversation: Conversation, row: int) -> dict[str, Any]:
    entry = conversation.meta.get("entry")
    if not isinstance(entry, dict):
        raise RewardError(
            f"reasoning_gym_reward: conversation {row} has no reasoning-gym entry in meta['entry'] "
            f"(meta keys: {sorted(conversation.meta)}); build prompts with reasoning_gym_prompts"
        )
    if not isinstance(entry.get("metadata"), dict) or "source_dataset" not in entry["metadata"]:
        raise RewardError(f"reasoning_gym_reward: conversation {row}: meta['entry'] lacks metadata.source_dataset")
    return entry


def reasoning_gym_reward(conversations: list[Conversation]) -> list[float]:
    """Score in [0, 1] of each last assistant reply, from the task's own answer checker.

    The answer is taken with ``extract_answer``; a reply with no extractable answer scores 0.
    Partial credit (e.g. the right number inside extra text) is whatever the dataset's
    ``score_answer`` grants.
    """
    scores = []
    for row, conversation in enumerate(conversations):
        entry = _entry(conversation, row)
        answer = extract_answer(conversation.last_assistant)
        if answer is None:
            scores.append(0.0)
            continue
        score = float(_score_fn(entry["metadata"]["source_dataset"])(answer, entry))
        scores.append(min(max(score, 0.0), 1.0))
    return scores


def reasoning_gym_prompts(name: str, size: int, seed: int, instruction: str | None = None, **dataset_kwargs) -> list[Conversation]:
    """``size`` single-turn prompts of reasoning-gym dataset ``name``, each entry kept in ``meta["entry"]``.

    The user message is the question followed by ``instruction`` (by default: answer inside
    ``<answer></answer>`` tags), the format ``extract_answer`` reads first. ``dataset_kwargs`` go to
    the dataset's config (its difficulty: number of terms, digits, ...).
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        import difflib

        from rebelrl.config import ConfigError

        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; the {len(DATASETS)} names include {', '.join(sorted(DATASETS)[:5])}, ..."
        raise ConfigError(f"task.dataset={name!r}: reasoning-gym has no such dataset{hint}")
    try:
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **dataset_kwargs)
    except (AssertionError, TypeError) as e:  # reasoning-gym validates its configs with assert
        from rebelrl.config import ConfigError

        raise ConfigError(f"task.dataset_kwargs={dataset_kwargs} for reasoning-gym dataset {name!r}: {e}") from None
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    conversations = []
    for i in range(size):
        entry = dataset[i]
        text = f"{entry['question']}\n\n{instruction}" if instruction else entry["question"]
        conversations.append(Conversation.from_prompt(text, meta={"entry": entry}))
    return conversations
