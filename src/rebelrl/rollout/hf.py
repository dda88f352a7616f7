"""Generation with Hugging Face ``generate`` (CPU or one GPU), with the distribution fully specified.

Everything that shapes the sampling distribution comes from ``SamplingParams`` and is applied by
``_ExactSampler``; ``generate`` itself runs with all of its own warpers at their neutral values and
with the checkpoint's ``generation_config`` hidden, so that a model's shipped defaults (a temperature,
top-p, a repetition penalty, Transformers' global top-k of 50) never reach training or evaluation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rebelrl.models import model_device
from rebelrl.rollout.base import SamplingParams
from rebelrl.rollout.chat import render_prompt, stop_token_ids
from rebelrl.types import Conversation, Rollout


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Conversation], device=None):
    """Render prompts (chat template or plain text, ready for the assistant's turn) and left-pad them.

    Returns:
        ids (B, P) and mask (B, P).
    """
    texts = [render_prompt(tokenizer, p) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc.input_ids.to(device), enc.attention_mask.to(device)


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



class _ExactSampler(LogitsProcessor):
    """The whole sampling distribution, in one processor and a fixed order; records log pi_t on the way.

    It sees the raw logits of step t and, in ``input_ids``, the token chosen at step t-1. It keeps the
    previous step's ``log_softmax(logits / T)``, the distribution training regresses on, and gathers
    the chosen token from it; then it returns the logits the token is drawn from: repetition penalty
    and min-new-tokens, then temperature, top-k and top-p (Transformers' own processors, in the order
    ``generate`` applies them). Where truncation removes tokens, pi_t is no longer the distribution
    sampled: the probability mass it removed is recorded per step.
    """

    def __init__(self, params: SamplingParams, prompt_length: int, stop_ids: list[int], pad_lengths: torch.Tensor):
        self.temperature = params.logprob_temperature
        self.sample = params.temperature > 0
        self.before: list[LogitsProcessor] = []  # applied to the logits before the temperature
        if params.repetition_penalty != 1.0:
            self.before.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty, prompt_ignore_length=pad_lengths))
        self.masks_stops = params.min_new_tokens > 0
        if self.masks_stops:
            self.before.append(MinNewTokensLengthLogitsProcessor(prompt_length, params.min_new_tokens, stop_ids, device=pad_lengths.device))
        self.truncate: list[LogitsProcessor] = []
        if self.sample and params.top_k > 0:
            self.truncate.append(TopKLogitsWarper(params.top_k))
        if self.sample and params.top_p < 1.0:
            self.truncate.append(TopPLogitsWarper(params.top_p))
        self.prev: torch.Tensor | None = None  # (N, V) log pi_t at the last step
        self.picked: list[torch.Tensor] = []  # T entries of (N,)
        self.dropped: list[torch.Tensor] = []  # T entries of (N,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.picked.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        for processor in self.before:
            scores = processor(input_ids, scores)
        if self.sample:
            scores = scores / self.temperature
            for processor in self.truncate:
                scores = processor(input_ids, scores)
        if self.truncate or self.masks_stops:
            removed = torch.isneginf(scores) & ~torch.isneginf(self.prev)
            self.dropped.append((self.prev.exp() * removed).sum(dim=-1))
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T) log pi_t of every generated token, and (N, T) mass removed before drawing it."""
        if self.prev is not None:
            self.picked.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
        logps = torch.stack(self.picked, dim=1)
        dropped = torch.stack(self.dropped, dim=1) if self.dropped else torch.zeros_like(logps)
        return logps, dropped


def generation_config(params: SamplingParams, n: int, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    """``generate``'s own settings: every field that shapes the distribution at its neutral value (the
    distribution is ``_ExactSampler``'s alone), plus sampling or greedy, budget, stops and padding."""
    return GenerationConfig(
        do_sample=params.temperature > 0,
        temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None,
        min_length=0, min_new_tokens=None, suppress_tokens=None, begin_suppress_tokens=None, sequence_bias=None,
        forced_bos_token_id=None, forced_eos_token_id=None, renormalize_logits=False, guidance_scale=None,
        num_beams=1, max_new_tokens=params.max_new_tokens, num_return_sequences=n,
        eos_token_id=stop_ids, pad_token_id=pad_id,
    )


@contextmanager
def _checkpoint_defaults_hidden(model):
    """``generate`` fills every field a config leaves unset from ``model.generation_config``: hide it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


class HFGenerator:
    """``Generator`` backed by ``model.generate``; prompts are processed ``batch_size`` at a time."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)

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
            dropped_mass=_cat_padded([p["dropped_mass"] for p in parts], 0.0, left=False),
        )

    def _generate_batch(self, prompts: list[Conversation], n: int, params: SamplingParams) -> dict:
        device = model_device(self.model)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, device)  # (B, P)
        P = prompt_ids.shape[1]
        pad_lengths = (prompt_mask == 0).sum(dim=1).repeat_interleave(n)  # (N,) left padding of each row
        sampler = _ExactSampler(params, P, self.stop_ids, pad_lengths)
        was_training = self.model.training
        self.model.eval()
        try:
            with _checkpoint_defaults_hidden(self.model):
                out = self.model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    generation_config=generation_config(params, n, self.stop_ids, self.tokenizer.pad_token_id),
                    logits_processor=LogitsProcessorList([sampler]),
                )
        finally:
            self.model.train(was_training)
        raw = out[:, P:]  # (N, T) prompt-major: HF repeats each prompt n times in a row
        sample_logps, dropped = sampler.finish(raw[:, -1])  # (N, T)
        completion_ids, completion_mask, finished = truncate_at_eos(raw, self.stop_ids, self.tokenizer.pad_token_id)
        T = completion_ids.shape[1]
        sample_logps = sample_logps[:, :T] * completion_mask
        dropped = dropped[:, :T] * completion_mask
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        ended = finished.tolist()
        return {
            "conversations": [p.with_reply(texts[i * n + j], finished=ended[i * n + j]) for i, p in enumerate(prompts) for j in range(n)],
            "prompt_ids": prompt_ids.repeat_interleave(n, dim=0),
            "prompt_mask": prompt_mask.repeat_interleave(n, dim=0),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "finished": finished,
            "sample_logps": sample_logps,
            "dropped_mass": dropped,
        }


def _cat_padded(tensors: list[torch.Tensor], value, left: bool) -> torch.Tensor:
    """Concatenate (n_i, L_i) tensors along rows, padding the length dimension on one side."""
    L = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        extra = L - t.shape[1]
        padded.append(torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value))
    return torch.cat(padded, dim=0)
