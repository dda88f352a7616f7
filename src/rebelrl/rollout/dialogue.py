"""Multi-turn rollouts: the policy and a simulated user take turns, in batches, in-process.

A dialogue is a ``Conversation`` that alternates assistant and user messages after its opening.
``play`` advances many dialogues at once, each by its own number of assistant turns, asking the
environment for the user's reply after each one. ``encode_dialogue`` finds where every assistant
turn's tokens lie in the rendered dialogue, so a loss or a mask can target one turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rebelrl.rollout.base import Generator, SamplingParams
from rebelrl.types import Conversation


@dataclass
class Played:
    conversations: list[Conversation]  # the dialogues after playing
    done: list[bool]  # the environment ended the dialogue (a solved game, a user who left)


def play(
    generator: Generator,
    env,
    conversations: list[Conversation],
    turns: list[int],
    params: SamplingParams,
    respond_last: bool = False,
    done: list[bool] | None = None,
) -> Played:
    """Give every dialogue up to ``turns[i]`` more assistant turns.

    Each dialogue must end with a user message. After each assistant turn the environment answers
    (``env.step``), except after a dialogue's last turn unless ``respond_last``; a dialogue the
    environment ends stops early. All dialogues that still have turns left are advanced together,
    one generate call per turn.
    """
    convs = list(conversations)
    done = list(done) if done is not None else [False] * len(convs)
    left = list(turns)
    while True:
        active = [i for i in range(len(convs)) if left[i] > 0 and not done[i]]
        if not active:
            return Played(convs, done)
        rollout = generator.generate([convs[i] for i in active], 1, params)
        for i, conv in zip(active, rollout.conversations):
            convs[i] = conv
            left[i] -= 1
        ask = [i for i in active if left[i] > 0 or respond_last]
        if ask:
            for i, result in zip(ask, env.step([convs[i] for i in ask])):
                if result.done:
                    done[i] = True
                else:
                    convs[i] = convs[i].with_reply(result.user_message, role="user")


def truncate_turns(conversation: Conversation, turns: int) -> Conversation:
    """The dialogue up to and including its ``turns``-th assistant message (all of it if shorter)."""
    seen = 0
    for k, message in enumerate(conversation.messages):
        if message.role == "assistant":
            seen += 1
            if seen == turns:
                return Conversation(conversation.messages[: k + 1], conversation.meta)
    return conversation


def encode_dialogue(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the rendered dialogue and the [start, end) span of each assistant turn.

    A turn's span covers the tokens the policy produced for it (its reply and the end-of-turn token)
    and nothing of the chat template's role header: rendering the dialogue up to the turn with the
    generation prompt marks the start; rendering it with the reply marks the end, minus any
    separator the template adds after the end-of-turn token.
    """
    messages = conversation.to_chat()
    ids = _render(tokenizer, messages)
    eos = tokenizer.eos_token_id
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:k], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: k + 1]))
        while end > start and ids[end - 1] != eos:  # drop the template's trailing newline
            end -= 1
        spans.append((start, end))
    return ids, spans


def turn_mask(spans: list[tuple[int, int]], turn: int, length: int) -> torch.Tensor:
    """(length,) mask that is 1 exactly on the tokens of assistant turn ``turn`` (1-based)."""
    mask = torch.zeros(length, dtype=torch.long)
    start, end = spans[turn - 1]
    mask[start:end] = 1
    return mask


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids
