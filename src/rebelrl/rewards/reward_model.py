"""A sequence-classification reward model as a reward: one scalar per conversation.

The score is the head's output at the last real token. Hugging Face's own pooling finds that token
by looking for ``pad_token_id``, which is wrong when the pad token is the EOS token (the end of
every reply then looks like padding) or when padding is on the left. Here the index comes from the
attention mask instead, so the score is the same whatever the padding side and pad token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rebelrl.rollout.chat import encode_chat
from rebelrl.types import Conversation


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with mask 1 in each row of a (B, L) mask.

    Works for left padding (``[0, 0, 1, 1] -> 3``), right padding (``[1, 1, 0, 0] -> 1``) and rows
    without padding (``-> L - 1``): positions times mask peak, uniquely, at the last real token.
    A row with no real token gives 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (L,)
    return (positions * attention_mask.long()).argmax(dim=-1)  # (B,)


def pad_sequences(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one length on ``side`` ("left" or "right"): (B, L) input ids and mask."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, L)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def render(conversation: Conversation, tokenizer: Any) -> str:
    """The text the reward model reads: its chat template if it has one, else ``role: content`` lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation.to_chat(), tokenize=False)
    return "\n".join(f"{m.role}: {m.content}" for m in conversation.messages)


class RewardModelScorer:
    """Reward from an ``AutoModelForSequenceClassification`` model: the logit of label 0.

    Decoder reward models (a ``score`` head over every position) are scored at
    ``last_token_index`` of the attention mask, with position ids counted from the first real
    token, so left and right padding give the same number. Models without a ``score`` head (encoder
    classifiers, which pool their first token) fall back to the model's own pooled logits on
    right-padded input, the layout those models are trained with.

    Conversations longer than ``max_length`` tokens lose their beginning, not their end: the reply
    being judged is at the end.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_length: int = 1024, device=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # The pad id only fills masked positions, so any valid id does when the tokenizer has none.
        self.pad_id = pad_id if pad_id is not None else 0

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        device=None,
        **model_kwargs: Any,
    ) -> RewardModelScorer:
        """Load tokenizer and a one-label classification model; ``model_kwargs`` go to the model loader."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rebelrl.models import ModelNotFoundError, looks_like_path

        folder = Path(str(name_or_path)).expanduser()
        if looks_like_path(str(name_or_path)) and not (folder / "config.json").is_file():
            hint = f"; its trained model is in {folder / 'reward_model'}" if (folder / "reward_model" / "config.json").is_file() else ""
            raise ModelNotFoundError(f"reward model folder not found: {name_or_path} "
                                     f"({'holds no config.json' if folder.is_dir() else 'no such folder'}){hint}")
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=dtype, **model_kwargs
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length, device=device)

    def encode(self, conversations: list[Conversation]) -> list[list[int]]:
        """The token ids the model reads for each conversation (what ``algo=reward_model`` trains on)."""
        if getattr(self.tokenizer, "chat_template", None):
            # A rendered template already holds its special tokens (BOS); message text never becomes one.
            encoded = [encode_chat(self.tokenizer, c.to_chat()) for c in conversations]
        else:
            # Split so that message text that spells a special token ("</s>") stays plain text.
            encoded = self.tokenizer([render(c, self.tokenizer) for c in conversations], split_special_tokens=True)["input_ids"]
        return [list(ids)[-self.max_length :] for ids in encoded]

    def scores(self, sequences: list[list[int]], model: Any = None) -> torch.Tensor:
        """(B,) float32 scores of token sequences, on the model's device, differentiable: the reward
        model's forward as training and scoring both run it (``model``: a wrapper of the same model
        whose backward averages gradients across processes, else the scorer's own)."""
        model = model if model is not None else self.model
        head = getattr(self.model, "score", None)
        if not isinstance(head, torch.nn.Module):
            input_ids, mask = pad_sequences(sequences, self.pad_id, "right")
            logits = model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            return logits[:, 0].float()  # (B,)
        side = getattr(self.tokenizer, "padding_side", "right")
        input_ids, mask = pad_sequences(sequences, self.pad_id, side)  # (B, L)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, L) 0 at the first real token
        if model is not self.model:  # a wrapper: its forward, with the model's own last-token pooling read back below
            hidden = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True).hidden_states[-1]
        else:
            base = getattr(self.model, self.model.base_model_prefix)
            hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)[0]  # (B, L, H)
        index = last_token_index(mask)  # (B,)
        last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)
        return head(last_hidden)[:, 0].float()  # (B,)

    @torch.no_grad()
    def _score_batch(self, sequences: list[list[int]]) -> list[float]:
        return self.scores(sequences).cpu().tolist()

    def __call__(self, conversations: list[Conversation]) -> list[float]:
        sequences = self.encode(conversations)
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            scores.extend(self._score_batch(sequences[start : start + self.batch_size]))
        return scores
