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
from rebelrl.rollout.chat import ChatTemplateError, encode_chat, turn_terminator
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

    A turn's span covers what the policy produced for it: the reply's tokens and, when the policy
    ended the reply itself, the template's turn terminator (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, the EOS in plain text: whatever token the template closes a turn with). It
    never covers the role header before the reply, a separator after the terminator, or the
    terminator the template writes after a reply that was cut at the token budget.
    """
    messages = conversation.to_chat()
    ids = encode_chat(tokenizer, messages)
    terminator = turn_terminator(tokenizer)
    spans = []
    for k, message in enumerate(conversation.messages):
        if message.role != "assistant":
            continue
        start = _common_prefix(encode_chat(tokenizer, messages[:k], add_generation_prompt=True), ids)
        try:
            end = ids.index(terminator, start)
        except ValueError:
            raise ChatTemplateError(f"the rendered dialogue has no turn terminator (token {terminator}) after assistant turn {len(spans) + 1}") from None
        end += 1 if message.finished else 0
        # A reply the policy ended holds at least its terminator; only a cut reply with no text is empty.
        assert end > start or not message.finished, f"empty span for assistant turn {len(spans) + 1}"
        spans.append((start, end))
    return ids, spans


@dataclass
class Encoded:
    """One row of offline data as the loss reads it: the tokens before its first reply (what a
    sampler would be prompted with), the rest, and which of the rest the loss reads."""

    prompt: list[int]
    completion: list[int]
    targets: list[int]  # (len(completion),) 1 on assistant tokens (reply and turn terminator), 0 on user turns between them


def encode_reply(tokenizer: PreTrainedTokenizerBase, prompt: Conversation, reply: str) -> Encoded:
    """``reply`` as the assistant's answer to ``prompt``: its tokens and the turn terminator, exactly as
    the template renders them after the prompt, as the sampler would have produced them."""
    ids, spans = encode_dialogue(tokenizer, prompt.with_reply(reply))
    start, end = spans[-1]
    return Encoded(ids[:start], ids[start:end], [1] * (end - start))


def encode_demonstration(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> Encoded:
    """Every assistant turn of a demonstration as targets, the turns between them as context."""
    ids, spans = encode_dialogue(tokenizer, conversation)
    first, last = spans[0][0], spans[-1][1]
    targets = [0] * (last - first)
    for start, end in spans:
        targets[start - first : end - first] = [1] * (end - start)
    return Encoded(ids[:first], ids[first:last], targets)


def turn_mask(spans: list[tuple[int, int]], turn: int, length: int) -> torch.Tensor:
    """(length,) mask that is 1 exactly on the tokens of assistant turn ``turn`` (1-based)."""
    mask = torch.zeros(length, dtype=torch.long)
    start, end = spans[turn - 1]
    mask[start:end] = 1
    return mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (a prompt is a prefix of its dialogue unless plain text
    merges a token across the boundary)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
