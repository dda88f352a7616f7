"""Dataset reset (DR-PO, Chang et al., 2024): rollouts that start from a state of the offline data.

With probability ``reset.prob`` a prompt's rollouts are forced through the first k tokens of a reply
the data holds for that prompt (``reset.field`` of its row in ``reset.data``), k uniform on
{1, ..., L-1} for a reply of L tokens, as in the authors' code (never 0, never the whole reply), and
the policy writes the rest. All the rollouts of a prompt share its prefix, so REBEL's pairs and the
group baselines of RLOO and GRPO compare continuations of one state. The forced tokens are the
reply's own, tokenized as the chat template renders it after the prompt; the reply's turn
terminator is never forced, and L is cut to ``rollout.max_new_tokens`` so that the policy always
writes at least one token. Evaluation never resets: it samples from the plain prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rebelrl.config import ConfigError
from rebelrl.rollout.chat import ChatTemplateError
from rebelrl.rollout.dialogue import encode_reply
from rebelrl.types import Conversation


def prompt_key(conversation: Conversation) -> tuple:
    """What identifies a prompt: its messages (role and text), without the reply if it holds one."""
    chat = conversation.to_chat()
    if chat and chat[-1]["role"] == "assistant":
        chat = chat[:-1]
    return tuple((m["role"], m["content"]) for m in chat)


def cut_point(v: float, length: int) -> int:
    """k uniform on {1, ..., length-1} from ``v`` uniform on [0, 1), as the authors draw it (never 0,
    never the whole reply); 0 where ``length`` < 2 leaves no such k."""
    return 1 + min(int(v * (length - 1)), length - 2) if length >= 2 else 0


@dataclass
class ResetStates:
    """The reply tokens to reset to, by prompt, and the probability of a reset."""

    replies: dict[tuple, list[int]]  # prompt_key -> the reply's tokens, without its turn terminator
    prob: float

    @classmethod
    def load(cls, cfg, tokenizer, stop_ids: list[int], prompts: list[Conversation]) -> ResetStates:
        """Read ``cfg.reset.data`` (``cfg.reset.field`` of each row), tokenize each reply after its
        prompt (the first row of a prompt is its state), and check that some of ``prompts`` (the
        training prompts) have a reply with a state to reset to: two tokens or more."""
        from rebelrl.data import load_demonstration_rows, load_preference_rows
        from rebelrl.envs.tasks import before_last_reply
        from rebelrl.errors import UserError

        r = cfg.reset
        try:
            if r.field == "completion":
                rows, wheres = load_demonstration_rows(r.data, prompt_field=cfg.task.prompt_field, messages_field=cfg.task.messages_field)
                pairs = [(before_last_reply(row), row.messages[-1].content, where) for row, where in zip(rows, wheres)]
            else:
                rows, wheres = load_preference_rows(r.data, prompt_field=cfg.task.prompt_field)
                pairs = [(row.prompt, getattr(row, r.field), where) for row, where in zip(rows, wheres)]
        except UserError as e:
            raise ConfigError(f"reset.data (reset.field={r.field}): {e}") from None
        replies: dict[tuple, list[int]] = {}
        stops = set(stop_ids)
        for prompt, reply, where in pairs:
            try:
                tokens = encode_reply(tokenizer, prompt, reply).completion
            except ChatTemplateError as e:
                raise ConfigError(f"reset.data: {where}: {e}") from None
            cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
            replies.setdefault(prompt_key(prompt), tokens[:cut])  # the first row of a prompt is its reset state
        states = cls(replies, r.prob)
        if not states.coverage(prompts, cfg.rollout.max_new_tokens):
            if not any(prompt_key(p) in replies for p in prompts):
                raise ConfigError(f"reset.data={r.data}: none of its {len(replies)} prompts is a training prompt (prompts match on their "
                                  f"messages' roles and text, system message included); reset to the data the task trains on")
            raise ConfigError(f"reset.data={r.data}: every reply to a training prompt is shorter than 2 tokens, so no prefix of 1..L-1 "
                              "tokens exists to reset to")
        return states

    def prefixes(self, prompts: list[Conversation], max_new_tokens: int) -> list[list[int]]:
        """The forced tokens of each prompt's rollouts ([] where it is not reset). Two numbers a
        prompt are drawn from torch's generator whether or not the prompt has a reply, so a run's
        draws do not depend on which prompts the data covers."""
        draws = torch.rand(len(prompts), 2, dtype=torch.float64, device="cpu").tolist()
        out = []
        for prompt, (u, v) in zip(prompts, draws):
            tokens = self.replies.get(prompt_key(prompt), [])
            k = cut_point(v, min(len(tokens), max_new_tokens))  # L cut to the token budget
            out.append(tokens[:k] if u < self.prob and k else [])
        return out

    def coverage(self, prompts: list[Conversation], max_new_tokens: int) -> int:
        """How many of ``prompts`` can be reset: a reply of 2 tokens or more within the token budget."""
        return sum(cut_point(0.0, min(len(self.replies.get(prompt_key(p), [])), max_new_tokens)) > 0 for p in prompts)
