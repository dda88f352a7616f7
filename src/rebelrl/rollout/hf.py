"""Generation with Hugging Face ``generate`` (CPU or one GPU)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from rebelrl.models import model_device
from rebelrl.rollout.base import SamplingParams
from rebelrl.types import Conversation, Rollout


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Conversation], device=None):
    """Render prompts with the chat template (ready for the assistant's turn) and left-pad them.

    Returns:
        ids (B, P) and mask (B, P).
    """
    texts = [tokenizer.apply_chat_template(p.to_chat(), tokenize=False, add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def eos_ids(tokenizer: PreTrainedTokenizerBase, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def truncate_at_eos(completion_ids: torch.Tensor, eos: list[int], pad_id: int):
    """Keep each completion up to and including its first EOS; pad the rest.

    Args:
        completion_ids: (N, T) generated tokens.

    Returns:
        ids (N, T') with padding after the EOS, mask (N, T'), finished (N,) bool; T' is the longest kept length.
    """
    N, T = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # (N, T)
    finished = is_eos.any(dim=1)  # (N,)
    first = torch.where(finished, is_eos.int().argmax(dim=1), torch.full_like(finished, T, dtype=torch.long))
    lengths = torch.where(finished, first + 1, first)  # (N,) tokens kept, EOS included
    mask = torch.arange(T, device=completion_ids.device)[None, :] < lengths[:, None]  # (N, T)
    ids = completion_ids.masked_fill(~mask, pad_id)
    keep = max(int(lengths.max().item()), 1) if N else 1
    return ids[:, :keep], mask[:, :keep].long(), finished


class _LogprobRecorder(LogitsProcessor):
    """Records log pi_t(token) at sampling time without keeping a (T, N, V) tensor of scores.

    A processor sees the logits of step t and, in ``input_ids``, the token chosen at step t-1: so it
    keeps only the previous step's log-softmax and gathers the chosen token from it. Registered before
    HF's warpers, it sees the raw logits; dividing by the temperature here matches training.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.prev: torch.Tensor | None = None  # (N, V) log-softmax of the last step
        self.picked: list[torch.Tensor] = []  # T entries of (N,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.picked.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:  # -> (N, T)
        if self.prev is not None:
            self.picked.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.picked, dim=1)


class HFGenerator:
    """``Generator`` backed by ``model.generate``; prompts are processed ``batch_size`` at a time."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: list[Conversation], n: int, params: SamplingParams) -> Rollout:
        parts = [self._generate_batch(prompts[i : i + self.batch_size], n, params) for i in range(0, len(prompts), self.batch_size)]
        pad = self.tokenizer.pad_token_id
        return Rollout(
            conversations=[c for part in parts for c in part["conversations"]],
            prompt_ids=_cat_padded([p["prompt_ids"] for p in parts], pad, left=True),
            prompt_mask=_cat_padded([p["prompt_mask"] for p in parts], 0, left=True),
            completion_ids=_cat_padded([p["completion_ids"] for p in parts], pad, left=False),
            completion_mask=_cat_padded([p["completion_mask"] for p in parts], 0, left=False),
            finished=torch.cat([p["finished"] for p in parts]),
            sample_logps=_cat_padded([p["sample_logps"] for p in parts], 0.0, left=False),
            group_size=n,
        )

    def _generate_batch(self, prompts: list[Conversation], n: int, params: SamplingParams) -> dict:
        device = model_device(self.model)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, device)  # (B, P)
        eos = eos_ids(self.tokenizer, self.model)
        recorder = _LogprobRecorder(params.logprob_temperature)
        sample = params.temperature > 0
        config = GenerationConfig(
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=(params.top_k or None) if sample else None,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
            )
        finally:
            self.model.train(was_training)
        P = prompt_ids.shape[1]
        raw = out[:, P:]  # (N, T) prompt-major: HF repeats each prompt n times in a row
        sample_logps = recorder.finish(raw[:, -1])  # (N, T)
        completion_ids, completion_mask, finished = truncate_at_eos(raw, eos, self.tokenizer.pad_token_id)
        T = completion_ids.shape[1]
        sample_logps = sample_logps[:, :T] * completion_mask
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return {
            "conversations": [p.with_reply(texts[i * n + j]) for i, p in enumerate(prompts) for j in range(n)],
            "prompt_ids": prompt_ids.repeat_interleave(n, dim=0),
            "prompt_mask": prompt_mask.repeat_interleave(n, dim=0),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "finished": finished,
            "sample_logps": sample_logps,
        }


def _cat_padded(tensors: list[torch.Tensor], value, left: bool) -> torch.Tensor:
    """Concatenate (n_i, L_i) tensors along rows, padding the length dimension on one side."""
    L = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        extra = L - t.shape[1]
        padded.append(torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value))
    return torch.cat(padded, dim=0)
