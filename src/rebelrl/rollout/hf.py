"""Generation from a Hugging Face causal LM (CPU or one GPU), with the distribution fully specified.

``decode`` runs the model with its KV cache under a loop of its own rather than ``generate``:
everything that shapes the sampling distribution comes from ``SamplingParams`` and is applied by
``_Distribution``, so a checkpoint's shipped defaults (a temperature, top-p, a repetition penalty,
Transformers' global top-k of 50) never reach training or evaluation; each prompt is prefilled once
for its ``n`` samples; finished rows leave the batch; and a token is drawn with one random number a
row. Under greedy decoding it produces ``generate``'s tokens (tested).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rebelrl.logprobs import position_ids_from_mask
from rebelrl.models import model_device
from rebelrl.rollout.base import SamplingParams
from rebelrl.rollout.chat import encode_prompt, stop_token_ids
from rebelrl.types import Conversation, Rollout


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Conversation], device=None):
    """Render prompts (chat template or plain text, ready for the assistant's turn) and left-pad them.

    Returns:
        ids (B, P) and mask (B, P).
    """
    return left_pad(tokenizer, [encode_prompt(tokenizer, p) for p in prompts], device)  # message text never becomes control tokens


def left_pad(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]], device=None):
    """Token id lists -> ids (B, P) and mask (B, P), padded on the left."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True)
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



class _Distribution:
    """The whole sampling distribution of one decoding step, in a fixed order.

    From the raw logits of a step it computes ``log_softmax(logits / T)``, the distribution training
    regresses on (log pi_t), and the scores the token is drawn from: repetition penalty and
    min-new-tokens, then temperature, top-k and top-p (Transformers' own processors, in the order
    ``generate`` applies them). Where truncation removes tokens, pi_t is no longer the distribution
    sampled: the probability mass it removed is returned too.
    """

    def __init__(self, params: SamplingParams, prompt_length: int, stop_ids: list[int], pad_lengths: torch.Tensor):
        self.temperature = params.logprob_temperature
        self.sample = params.temperature > 0
        self.penalty = params.repetition_penalty
        self.pad_lengths = pad_lengths  # (N,) left padding of each row, which the penalty ignores
        self.masks_stops = params.min_new_tokens > 0
        self.min_new = MinNewTokensLengthLogitsProcessor(prompt_length, params.min_new_tokens, stop_ids, device=pad_lengths.device) if self.masks_stops else None
        self.truncate: list[LogitsProcessor] = []
        if self.sample and params.top_k > 0:
            self.truncate.append(TopKLogitsWarper(params.top_k))
        if self.sample and params.top_p < 1.0:
            self.truncate.append(TopPLogitsWarper(params.top_p))

    def __call__(self, context: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor):
        """``context`` (n, P+t) prompt and tokens so far and ``logits`` (n, V) of the rows ``rows`` (n,)
        still decoding -> log pi_t (n, V), scores to draw from (n, V), mass removed (n,) or None."""
        # float32 first, then everything else: bfloat16 logits divided by the temperature in bfloat16 would
        # round each logit by up to ~0.1 and draw from another distribution than the log-probs describe.
        logits = logits.float()
        logp = torch.log_softmax(logits / self.temperature, dim=-1)
        scores = logits
        if self.penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(self.penalty, prompt_ignore_length=self.pad_lengths[rows])(context, scores)
        if self.min_new is not None:
            scores = self.min_new(context, scores)
        if self.sample:
            scores = scores / self.temperature
            for processor in self.truncate:
                scores = processor(context, scores)
        dropped = None
        if self.truncate or self.masks_stops:
            removed = torch.isneginf(scores) & ~torch.isneginf(logp)
            dropped = (logp.exp() * removed).sum(dim=-1)
        return logp, scores, dropped


def draw(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token a row from ``softmax(scores)`` by inversion: the token whose interval of the
    cumulative distribution holds ``uniforms`` (n,) in [0, 1). A token of probability 0 has an empty
    interval and is never drawn. Exact up to float64 rounding, and one random number a row where
    ``torch.multinomial`` spends one a vocabulary entry. (n, V) -> (n,)"""
    cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(dim=-1)  # (n, V)
    total = cdf[:, -1:]
    x = torch.minimum(uniforms[:, None].double() * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


class _Uniforms:
    """The random numbers a decoding step draws with: one a row, from torch's generator of the
    device, or from a generator of each prompt's own (``seeds``) shared by that prompt's ``n`` rows.
    Every row draws at every step, finished or not, so a row's draws do not depend on when the rows
    beside it stop."""

    def __init__(self, n: int, rows: int, device, seeds: list[int] | None):
        self.n, self.rows, self.device = n, rows, device
        self.generators = None
        if seeds is not None:
            self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self) -> torch.Tensor:
        if self.generators is None:
            return torch.rand(self.rows, dtype=torch.float64, device=self.device)
        return torch.cat([torch.rand(self.n, dtype=torch.float64, device=self.device, generator=g) for g in self.generators])


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, params: SamplingParams,
           stop_ids: list[int], pad_id: int, seeds: list[int] | None = None, forced: torch.Tensor | None = None):
    """Sample ``n`` completions of each left-padded prompt (B, P) with a KV cache.

    Each prompt is run through the network once and its cache repeated for its ``n`` rows; a row
    leaves the batch as soon as it ends, so the cost follows the tokens actually generated rather
    than the longest reply. Under greedy decoding the tokens are ``generate``'s. ``forced`` (B, F):
    tokens each prompt's rows take instead of drawing at the first steps (-1 where none is forced;
    dataset reset); their log pi_t is recorded as a drawn token's is, and they draw their random
    numbers all the same, so the rows beside them sample as they would have.

    Returns:
        raw ids (N, T) prompt-major with ``pad_id`` after a row's stop token, log pi_t of each (N, T),
        mass removed before drawing each (N, T); N = B * n, T the steps taken.
    """
    B, P = prompt_ids.shape
    N, device = B * n, prompt_ids.device
    pad_lengths = (prompt_mask == 0).sum(dim=1).repeat_interleave(n)  # (N,)
    dist = _Distribution(params, P, stop_ids, pad_lengths)
    uniforms = _Uniforms(n, N, device, seeds)
    stops = torch.tensor(stop_ids, device=device)
    positions = position_ids_from_mask(prompt_mask)  # (B, P)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache_name, cache = kv_cache(out)
    logits = out.logits[:, -1]  # (B, V)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
    if forced is not None:
        forced = forced.to(device).repeat_interleave(n, dim=0)  # (N, F)
    context = prompt_ids.repeat_interleave(n, dim=0)  # (n_active, P + t) for the penalties
    mask = prompt_mask.repeat_interleave(n, dim=0)
    last_position = positions[:, -1:].repeat_interleave(n, dim=0)  # (n_active, 1)
    rows = torch.arange(N, device=device)  # the rows still decoding
    tokens = torch.full((N, params.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(N, params.max_new_tokens, device=device)
    dropped = torch.zeros(N, params.max_new_tokens, device=device)
    steps = 0
    for t in range(params.max_new_tokens):
        logp, scores, removed = dist(context, logits, rows)
        # Greedy decoding draws nothing, so it leaves the caller's random stream where it was.
        token = draw(scores, uniforms()[rows]) if dist.sample else scores.argmax(dim=-1)  # (n_active,)
        if forced is not None and t < forced.shape[1]:
            is_forced = forced[rows, t] >= 0
            token = torch.where(is_forced, forced[rows, t], token)
            removed = removed.masked_fill(is_forced, 0.0) if removed is not None else None  # nothing was drawn there
        tokens[rows, t] = token
        logps[rows, t] = logp.gather(1, token[:, None]).squeeze(1)
        if removed is not None:
            dropped[rows, t] = removed
        steps = t + 1
        going = ~torch.isin(token, stops)
        if t + 1 == params.max_new_tokens or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, context, mask, last_position = rows[keep], token[keep], context[keep], mask[keep], last_position[keep]
        context = torch.cat([context, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        last_position = last_position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last_position, use_cache=True, **{cache_name: cache})
        logits = out.logits[:, -1]
    return tokens[:, :steps], logps[:, :steps], dropped[:, :steps]


def kv_cache(out) -> tuple[str, object]:
    """The KV cache a forward returned, and the keyword the model takes it back under: ``cache`` from
    transformers 5.25 on, ``past_key_values`` before (the old name still works there, with a warning)."""
    name = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
    return name, getattr(out, name)


class HFGenerator:
    """``Generator`` backed by a Hugging Face causal LM and its KV cache; prompts are processed
    ``batch_size`` at a time."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)

    def mark_stale(self) -> None:
        """The policy changed: nothing to do, this generator samples from the live model."""

    @torch.no_grad()
    def generate(self, prompts: list[Conversation], n: int, params: SamplingParams, seeds: list[int] | None = None,
                 prefixes: list[list[int]] | None = None) -> Rollout:
        """``prefixes``: tokens each prompt's replies are forced to begin with ([] for none; dataset reset,
        a guide's roll-in, or the policy's roll-in that a guide continues). A prefix that ends with a
        stop token is a whole reply: its rows stop there."""
        for name, values in (("seeds", seeds), ("prefixes", prefixes)):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"{name}: one a prompt, got {len(values)} for {len(prompts)} prompts")
        parts = [
            self._generate_batch(prompts[i : i + self.batch_size], n, params, None if seeds is None else seeds[i : i + self.batch_size],
                                 None if prefixes is None else prefixes[i : i + self.batch_size])
            for i in range(0, len(prompts), self.batch_size)
        ]
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
            forced=None if prefixes is None else _cat_padded([p["forced"] for p in parts], 0, left=False),
        )

    def _generate_batch(self, prompts: list[Conversation], n: int, params: SamplingParams, seeds: list[int] | None,
                        prefixes: list[list[int]] | None) -> dict:
        device = model_device(self.model)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, device)  # (B, P)
        forced = None
        if prefixes is not None:
            if any(len(p) > params.max_new_tokens for p in prefixes):
                raise ValueError(f"a forced prefix is longer than the {params.max_new_tokens} tokens a reply may have")
            forced = torch.full((len(prompts), max(1, max(len(p) for p in prefixes))), -1, dtype=torch.long)
            for i, p in enumerate(prefixes):
                forced[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        was_training = self.model.training
        self.model.eval()
        try:
            raw, sample_logps, dropped = decode(self.model, prompt_ids, prompt_mask, n, params, self.stop_ids, self.tokenizer.pad_token_id, seeds,
                                                forced)
        finally:
            self.model.train(was_training)
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
            "forced": None if prefixes is None else _forced_mask(prefixes, n, T).to(device),
        }


def _forced_mask(prefixes: list[list[int]], n: int, T: int) -> torch.Tensor:
    """(len(prefixes) * n, T) 1 on the forced tokens of each prompt's ``n`` rows."""
    mask = torch.zeros(len(prefixes), T, dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        mask[i, : min(len(prefix), T)] = 1
    return mask.repeat_interleave(n, dim=0)


def _cat_padded(tensors: list[torch.Tensor], value, left: bool) -> torch.Tensor:
    """Concatenate (n_i, L_i) tensors along rows, padding the length dimension on one side."""
    L = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        extra = L - t.shape[1]
        padded.append(torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value))
    return torch.cat(padded, dim=0)
