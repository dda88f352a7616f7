"""The ``Generator`` protocol every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rebelrl.types import Conversation, Rollout


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 1.0  # nucleus sampling mass; 1.0 disables it
    top_k: int = 0  # keep the k most likely tokens; 0 disables it
    max_new_tokens: int = 64
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context; 1 disables it
    min_new_tokens: int = 0  # the stop tokens are masked until this many tokens exist; 0 disables it

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"top_k must be >= 0 and max_new_tokens >= 1, got {self.top_k}, {self.max_new_tokens}")
        if not self.repetition_penalty > 0 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"repetition_penalty must be > 0 and 0 <= min_new_tokens <= max_new_tokens, got "
                             f"{self.repetition_penalty}, {self.min_new_tokens}")

    @property
    def exact(self) -> bool:
        """Whether tokens are drawn from pi_t itself, the distribution the log-probs describe."""
        return self.top_p == 1.0 and self.top_k == 0 and self.repetition_penalty == 1.0 and self.min_new_tokens == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probs are computed at: the sampling one, or 1 for greedy decoding."""
        return self.temperature if self.temperature > 0 else 1.0


class Generator(Protocol):
    def generate(self, prompts: list[Conversation], n: int, params: SamplingParams) -> Rollout:
        """Sample ``n`` completions for each prompt; rows are prompt-major (``N = len(prompts) * n``)."""
        ...

    def mark_stale(self) -> None:
        """The policy's weights changed (an optimizer step): a backend holding a copy of them reloads it before it samples again."""
        ...
