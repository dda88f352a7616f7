"""Token and sequence log-probabilities from logits, with masks.

Sampling divides logits by the temperature, so the log-probs that training regresses on must do the
same: ``log softmax(logits / temperature)``. Everything here works row by row on the completion
positions only, so no full-vocabulary float32 copy of the whole batch is ever kept.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``labels``.

    Args:
        logits: (B, T, V) next-token logits aligned with ``labels`` (logits[:, t] predicts labels[:, t]).
        labels: (B, T) token ids.
        temperature: sampling temperature (> 0).

    Returns:
        (B, T) float32 log-probs.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    # One row at a time: the float32 (T, V) temporary of a row is freed before the next one, so peak
    # memory is one row's vocabulary, not the batch's.
    for i in range(logits.shape[0]):
        row = logits[i].float()
        if temperature != 1.0:
            row = row / temperature
        picked = row.gather(-1, labels[i].unsqueeze(-1)).squeeze(-1)
        out[i] = picked - torch.logsumexp(row, dim=-1)
    return out


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1. values, mask: (B, T) -> (B,)."""
    return (values * mask.to(values.dtype)).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over ``dim``, or over everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row starts at position 0. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    return_hidden: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(completion | prompt) under ``model``, 0 on padding.

    Prompts are left-padded (B, P), completions right-padded (B, T). Only the T positions that predict
    completion tokens go through the output head (``logits_to_keep``), which is most of the memory
    saving for long prompts. With ``return_hidden`` the last layer's hidden states at those positions
    come back too (the state s_t before each completion token, where a value head reads V(s_t)).

    Returns:
        (B, T) float32 per-token log-probs, zero where ``completion_mask`` is 0; and (B, T, H) hidden states.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P + T)
    T = completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=T + 1,
        use_cache=False,
        output_hidden_states=return_hidden,
    )
    logits = out.logits[:, :-1]  # (B, T, V): position P-1+t predicts completion token t
    logps = token_logprobs(logits, completion_ids, temperature)
    logps = logps * completion_mask.to(logps.dtype)
    if not return_hidden:
        return logps
    return logps, out.hidden_states[-1][:, -T - 1 : -1]  # (B, T, H) states s_0 .. s_{T-1}


@torch.no_grad()
def rollout_logprobs(model, rollout, temperature: float, batch_size: int = 16) -> torch.Tensor:
    """Per-token log-probs of every completion in ``rollout`` under ``model``, in micro-batches.

    Returns:
        (N, T) float32, zero on padding.
    """
    out = []
    for i in range(0, len(rollout), batch_size):
        s = slice(i, i + batch_size)
        out.append(
            completion_logprobs(
                model, rollout.prompt_ids[s], rollout.prompt_mask[s], rollout.completion_ids[s], rollout.completion_mask[s], temperature
            )
        )
    return torch.cat(out)
