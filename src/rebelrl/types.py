"""Plain data shared by every layer: messages, conversations, rollouts and pairs.

Tensors carry their shape in a comment. ``N`` is the number of sampled completions in a rollout,
``B`` the number of prompts (or pairs), ``k`` the completions per prompt (``N = B * k``, prompt-major,
so ``x.view(B, k)`` groups the completions of one prompt), ``P`` the padded prompt length and ``T`` the
padded completion length.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    # An assistant reply the policy ended itself (it sampled its end-of-turn token) rather than one cut
    # at the token budget; a cut reply's turn has no terminator token to train on.
    finished: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise TypeError(f"message content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Conversation:
    """A chat transcript plus whatever the task's reward needs to judge it (``meta``).

    ``meta`` holds task data that is not shown to the model, for example the reference answer of a
    reasoning problem. Conversations are immutable: ``with_reply`` returns a new one.
    """

    messages: tuple[Message, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_prompt(cls, text: str, system: str | None = None, meta: dict | None = None) -> Conversation:
        messages = ([Message("system", system)] if system else []) + [Message("user", text)]
        return cls(tuple(messages), dict(meta or {}))

    @classmethod
    def from_chat(cls, chat: list[dict[str, str]], meta: dict | None = None) -> Conversation:
        """From the Hugging Face chat format: ``[{"role": ..., "content": ...}, ...]``."""
        return cls(tuple(Message(m["role"], m["content"]) for m in chat), dict(meta or {}))

    def to_chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def with_reply(self, content: str, role: str = "assistant", finished: bool = True) -> Conversation:
        return replace(self, messages=self.messages + (Message(role, content, finished),))

    @property
    def last_assistant(self) -> str:
        """Text of the last assistant message ('' if there is none)."""
        for m in reversed(self.messages):
            if m.role == "assistant":
                return m.content
        return ""

    @property
    def first_user(self) -> str:
        for m in self.messages:
            if m.role == "user":
                return m.content
        return ""


@dataclass
class Rollout:
    """Completions sampled from one policy, ``k`` per prompt, prompt-major."""

    conversations: list[Conversation]  # (N,) prompt + the sampled reply as the last message
    prompt_ids: torch.Tensor  # (N, P) left-padded prompt tokens
    prompt_mask: torch.Tensor  # (N, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, T) right-padded completion tokens, cut after the first EOS (kept)
    completion_mask: torch.Tensor  # (N, T) 1 on completion tokens up to and including the first EOS
    finished: torch.Tensor  # (N,) bool: the completion emitted EOS within the token budget
    sample_logps: torch.Tensor  # (N, T) log pi_t(a_t | s_t) at sampling time, temperature-scaled; 0 on padding
    group_size: int  # k
    # (N, T) probability mass under pi_t that the sampler's truncation (top-k, top-p, min_new_tokens)
    # removed before drawing token t; 0 on padding and everywhere when nothing is truncated.
    dropped_mass: torch.Tensor | None = None
    # (N, T) 1 on completion tokens forced from the data rather than sampled (dataset reset); None: none.
    forced: torch.Tensor | None = None

    @property
    def policy_mask(self) -> torch.Tensor:  # (N, T) the tokens the policy wrote itself: what a policy loss covers
        return self.completion_mask if self.forced is None else self.completion_mask * (1 - self.forced)

    @property
    def input_ids(self) -> torch.Tensor:  # (N, P + T)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (N, P + T)
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:  # (N,)
        return self.completion_mask.sum(dim=1)

    def __len__(self) -> int:
        return len(self.conversations)


@dataclass
class PairBatch:
    """Explicit pairs over the rows of a rollout: column 0 is y, column 1 is y'."""

    index: torch.Tensor  # (B, 2) rows of the rollout forming each pair
    rewards: torch.Tensor  # (B, 2) reward used in the regression (score minus the KL penalty)
    scores: torch.Tensor  # (B, 2) raw task score (after the no-EOS penalty)
    old_logps: torch.Tensor  # (B, 2) log pi_t(y|x), summed over completion tokens
    ref_logps: torch.Tensor  # (B, 2) log pi_ref(y|x), summed over completion tokens
    lengths: torch.Tensor | None = None  # (B, 2) completion tokens of each (IPO averages per token)

    def __len__(self) -> int:
        return self.index.shape[0]


@dataclass
class TokenBatch:
    """What the policy-gradient family regresses on, per completion token of a rollout's N rows."""

    old_logps: torch.Tensor  # (N, T) log pi_t(a_t | s_t); 0 on padding
    ref_logps: torch.Tensor  # (N, T) log pi_ref(a_t | s_t); 0 on padding
    advantages: torch.Tensor  # (N, T) per-token advantages, or (N,) one per completion (broadcast to its tokens)
    returns: torch.Tensor | None = None  # (N, T) value targets (PPO)
    old_values: torch.Tensor | None = None  # (N, T) V(s_t) of the critic that saw the batch (PPO)


@dataclass(frozen=True)
class PreferencePair:
    """One offline preference: the same prompt with a chosen and a rejected reply.

    A batch of pairs is ``(B, 2)``: column 0 the chosen reply y_w, column 1 the rejected y_l.
    """

    prompt: Conversation  # x: the messages before the reply, ending with the user's turn
    chosen: str  # y_w: the preferred assistant reply, plain text (the template adds its turn tokens)
    rejected: str  # y_l: the dispreferred assistant reply to the same prompt
    margin: float | None = None  # r(x, y_w) - r(x, y_l) from a reward model, where the data gives one; finite
    # The row's other columns (chosen_score, rejected_score, an id, ...): not shown to the model.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def context(self) -> Conversation:
        """The prompt with the row's other columns in its meta, where a reward reads them (a reasoning-gym entry)."""
        return replace(self.prompt, meta={**self.prompt.meta, **self.meta})
