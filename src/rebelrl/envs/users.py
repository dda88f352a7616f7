"""A simulated user played by a language model: any causal LM, or the policy's own base model.

The model sees the transcript from the user's side and is asked for the user's next message, as
the REFUEL authors prompt their simulator. Its reply is cleaned (quotes, a "User:" prefix, anything
after it starts writing the assistant's part) and an empty result is returned as "" so that
``UserEnv`` retries it a bounded number of times.
"""

from __future__ import annotations

import hashlib
import re

from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.seeding import seeded
from rebelrl.types import Conversation

USER_INSTRUCTIONS = (
    "You are role-playing a human user who is chatting with an AI assistant. Read the conversation "
    "so far and write the user's next message: one or two short sentences, in the user's voice, "
    "continuing the topic or asking a follow-up question. Write only the message."
)

_SPEAKER = re.compile(r"^\s*(user|human|me)\s*:\s*", re.IGNORECASE)
_OTHER_SPEAKER = re.compile(r"\n\s*(assistant|ai|bot)\s*:", re.IGNORECASE)


def user_view(conversation: Conversation, instructions: str = USER_INSTRUCTIONS) -> Conversation:
    """The prompt the user model answers: the transcript as text, the roles named, its task last."""
    lines = [f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in conversation.messages if m.role != "system"]
    transcript = "\n".join(lines)
    return Conversation.from_prompt(f"Conversation so far:\n{transcript}\n\nWrite the user's next message.", system=instructions)


def clean_user_message(text: str) -> str:
    """The user's message from the model's raw reply ("" when nothing usable is left)."""
    text = _OTHER_SPEAKER.split(text, maxsplit=1)[0]
    text = _SPEAKER.sub("", text.strip())
    return text.strip().strip('"').strip()


class LMUser:
    """``UserSimulator`` backed by a causal LM, deterministic under ``seed``.

    Args:
        model_name: any name ``rebelrl.models.load_causal_lm`` accepts; loaded on first use.
        seed: each call samples under a seed made of ``seed`` and a hash of the transcripts it is
            asked about, so the same dialogues get the same user turns in any process (a resumed run
            replays the uninterrupted one) and the training RNG is untouched. Asked the same thing
            again right away (a retry after an unusable reply), it draws a fresh sample.
    """

    def __init__(self, model_name: str = "smollm2-135m-instruct", seed: int = 0, temperature: float = 0.7,
                 max_new_tokens: int = 48, instructions: str = USER_INSTRUCTIONS, batch_size: int = 16):
        self.model_name = model_name
        self.seed = seed
        self.params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        self.instructions = instructions
        self.batch_size = batch_size
        self._generator: HFGenerator | None = None
        self._last: tuple[str, int] = ("", 0)  # (transcripts hash, how many times asked in a row)

    def _load(self) -> HFGenerator:
        if self._generator is None:
            from rebelrl.models import load_causal_lm, load_tokenizer

            self._generator = HFGenerator(load_causal_lm(self.model_name), load_tokenizer(self.model_name), self.batch_size)
        return self._generator

    def respond(self, conversations: list[Conversation]) -> list[str]:
        generator = self._load()
        digest = hashlib.sha256("\x00".join(repr(c.to_chat()) for c in conversations).encode()).hexdigest()
        repeat = self._last[1] + 1 if self._last[0] == digest else 0
        self._last = (digest, repeat)
        with seeded((self.seed * 1_000_003 + int(digest[:12], 16) + repeat) % 2**63):
            rollout = generator.generate([user_view(c, self.instructions) for c in conversations], 1, self.params)
        return [clean_user_message(c.last_assistant) for c in rollout.conversations]
