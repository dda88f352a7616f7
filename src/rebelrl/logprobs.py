"""Token and sequence log-probabilities, with masks.

Sampling divides logits by the temperature, so the log-probs that training regresses on must do the
same: ``log softmax(logits / temperature)``. The training and reference passes never hold the
full-vocabulary logits of a batch: the output head is applied to the final hidden states a chunk of
rows at a time, keeping only each token's log-prob and log-sum-exp, and the backward pass recomputes
each chunk (``linear_token_logprobs``).
"""
from __future__ import annotations

import contextlib
import types
import weakref

import torch
from transformers.modeling_layers import GradientCheckpointingLayer


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

    Prompts are left-padded (B, P), completions right-padded (B, T). In float32 the padding columns
    that no row of this batch uses are cut first, so a batch costs its own longest row; a row's
    log-probs then move by float32 rounding (about 1e-7) with the rows beside it, far inside
    ``rollout.logprob_tolerance``. In lower precisions a batch keeps the rollout's padding: a row goes
    through the same shapes whatever rows share its batch, so log pi_t recomputed without gradients
    equals the training forward bit for bit, in bfloat16 too (a cut there moves it by 3e-3). The network
    runs up to its final hidden states; the output head is then applied in chunks of rows by
    ``linear_token_logprobs``, so the (B, T, V) logits never exist (models whose head is more than a
    plain linear map, e.g. with logit soft-capping, take the plain path). With ``return_hidden`` the
    final hidden states at those positions come back too (the state s_t before each completion token,
    where a value head reads V(s_t)).

    Returns:
        (B, T) float32 per-token log-probs, zero where ``completion_mask`` is 0; and (B, T, H) hidden states.
    """
    hf = _unwrap(model)  # the Hugging Face model inside any wrapper: its decoder and head are read directly
    T = completion_ids.shape[1]
    first, end = _used_columns(prompt_mask, completion_mask)
    if (first > 0 or end < T) and hf.get_input_embeddings().weight.dtype == torch.float32:
        cut = completion_logprobs(model, prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :end], completion_mask[:, :end],
                                  temperature, return_hidden)
        if not return_hidden:
            return torch.nn.functional.pad(cut, (0, T - end))
        return torch.nn.functional.pad(cut[0], (0, T - end)), torch.nn.functional.pad(cut[1], (0, 0, 0, T - end))
    original = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P + T)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    head = _plain_head(hf)
    with _layers_checkpointed(model):
        if head is None:
            out = model(**inputs, logits_to_keep=T + 1, output_hidden_states=return_hidden)
            logps = token_logprobs(out.logits[:, :-1], completion_ids, temperature)  # position P-1+t predicts token t
            states = out.hidden_states[-1][:, -T - 1 : -1] if return_hidden else None
        else:
            with _final_hidden(hf) as final:
                out = model(**inputs, logits_to_keep=1)
            if not _check_plain_head(hf, head, final.hidden[:, -1], out.logits[:, -1]):
                return completion_logprobs(model, *original, temperature, return_hidden)  # the plain path from now on
            states = final.hidden[:, -T - 1 : -1]  # (B, T, H) states s_0 .. s_{T-1}
            logps = _head_logprobs(states, head, completion_ids, completion_mask, temperature)
    logps = logps * completion_mask.to(logps.dtype)
    if not return_hidden:
        return logps
    return logps, states


def packed_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi at temperature 1 of the ``targets`` of packed sequences, and the final hidden
    states that predict them.

    Each row of ``input_ids`` (n, L) holds several sequences one after the other, ``position_ids``
    (n, L) restarting at 0 where each begins. With no attention mask, Transformers reads the
    restarts as sequence boundaries and lets each token attend only to its own sequence (a model
    whose attention ignores them must not be packed: the caller checks against the unpacked
    log-probs once). ``targets`` (n, L) marks the tokens to score; the first token of a sequence
    has nothing before it and must not be one.

    Returns:
        (n, L-1) float32 log-probs of tokens 1..L-1, zero where not a target, and (n, L-1, H) the
        hidden states at positions 0..L-2, each predicting the next token.
    """
    hf = _unwrap(model)
    head = _plain_head(hf)
    inputs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    labels, picked = input_ids[:, 1:], targets[:, 1:]
    with _layers_checkpointed(model):
        if head is None:
            out = model(**inputs, output_hidden_states=True)
            logps = token_logprobs(out.logits[:, :-1], labels) * picked.to(torch.float32)
            return logps, out.hidden_states[-1][:, :-1]
        with _final_hidden(hf) as final:
            out = model(**inputs, logits_to_keep=1)
        if not _check_plain_head(hf, head, final.hidden[:, -1], out.logits[:, -1]):
            return packed_logprobs(model, input_ids, position_ids, targets)  # the plain path from now on
    states = final.hidden[:, :-1]  # (n, L-1, H)
    return _head_logprobs(states, head, labels, picked, 1.0), states


def _used_columns(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[int, int]:
    """The first prompt column and the end of the completion columns that some row uses; at least one
    completion column is kept."""
    used_prompt = prompt_mask.any(dim=0).nonzero()
    used_completion = completion_mask.any(dim=0).nonzero()
    first = int(used_prompt[0]) if len(used_prompt) else 0
    end = int(used_completion[-1]) + 1 if len(used_completion) else 1
    return first, end


# Rows of output-head logits computed at once: 2**24 float32 elements is 64 MB (341 rows of a
# 49k vocabulary), small next to the activations, large enough that each chunk is one big GEMM.
CHUNK_ELEMENTS = 2**24


class _LinearTokenLogprob(torch.autograd.Function):
    """log softmax(h W^T / temperature)[label] for each row of h, a chunk of rows at a time.

    Forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits and uses
    d out_i / d z_i = onehot(y_i) - softmax(z_i), so at most one chunk of logits exists at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk):
        # hidden: (N, H), weight: (V, H), labels: (N,) -> (N,) float32
        out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            z = (hidden[s : s + chunk] @ weight.T).float().div_(temperature)  # (c, V), the head's own dtype first, as in the model
            lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
            out[s : s + chunk] = z.gather(-1, labels[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s : s + ctx.chunk], grad_out[s : s + ctx.chunk, None]  # (c, H), (c, 1)
            # (c, V) d out / d logits = (onehot(y) - softmax(z)) g / temperature, z = logits / temperature,
            # built in place in the one (c, V) buffer of the recomputed logits
            g = g / ctx.temperature
            dz = (h @ weight.T).float().div_(ctx.temperature).sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g)
            dz = dz.scatter_add_(-1, labels[s : s + ctx.chunk, None], g).to(hidden.dtype)  # back to the head's dtype
            if want_h:
                grad_h[s : s + ctx.chunk] = dz @ weight
            if want_w and dz.dtype == grad_w.dtype:
                grad_w.addmm_(dz.T, h)  # no (V, H) temporary
            elif want_w:
                grad_w += (dz.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                          chunk: int | None = None) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T, labels, temperature)`` without the full logits, forward or backward.

    Args:
        hidden: (N, H) final hidden states, one row per predicted token.
        weight: (V, H) output-head (unembedding) weight.
        labels: (N,) token ids.
        chunk: rows per chunk; default ``CHUNK_ELEMENTS // V``.

    Returns:
        (N,) float32 log-probs, differentiable in ``hidden`` and ``weight``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearTokenLogprob.apply(hidden, weight, labels, float(temperature), chunk)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside data-parallel and PEFT wrappers (and the LoRA reference view)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


# Models whose output is not their head applied to the decoder's output (soft-capped or scaled
# logits), found on their first call; they take the plain path from then on.
_HEAD_IS_PLAIN: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _plain_head(hf: torch.nn.Module) -> torch.nn.Linear | None:
    """The output head of Hugging Face model ``hf`` if logits are just ``head(final hidden state)`` (or not known yet)."""
    decoder = getattr(hf, "base_model", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if decoder is None or decoder is hf or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return None if _HEAD_IS_PLAIN.get(hf) is False else head


def _check_plain_head(hf, head, last_hidden: torch.Tensor, last_logits: torch.Tensor) -> bool:
    """Compare the head on the captured state with the model's own logits once per model."""
    if hf not in _HEAD_IS_PLAIN:
        with torch.no_grad():
            mine = (last_hidden @ head.weight.T).float()
        tol = 1e-4 if head.weight.dtype == torch.float32 else 1e-2
        _HEAD_IS_PLAIN[hf] = torch.allclose(mine, last_logits.float(), rtol=tol, atol=tol)
    return _HEAD_IS_PLAIN[hf]


@contextlib.contextmanager
def _final_hidden(hf: torch.nn.Module):
    """Capture the decoder's output (the final, normalised hidden states) during a forward."""
    captured = types.SimpleNamespace(hidden=None)

    def keep(module, args, output):
        captured.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = hf.base_model.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def _layers_checkpointed(model: torch.nn.Module):
    """Activation checkpointing for a training forward of a model kept in eval mode.

    Hugging Face layers checkpoint only while ``training`` is set; the policy stays in eval mode so
    that dropout never makes the learner differ from the sampler. Setting the flag on the layer
    objects alone (not their submodules) turns checkpointing on and leaves dropout off.
    """
    layers = []
    if torch.is_grad_enabled():
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def _head_logprobs(states, head, completion_ids, completion_mask, temperature) -> torch.Tensor:
    """(B, T) log-probs of the completion tokens from (B, T, H) final states, padding left at 0."""
    real = completion_mask.bool()
    picked = linear_token_logprobs(states[real], head.weight, completion_ids[real], temperature)  # (n,)
    return torch.zeros(completion_ids.shape, dtype=torch.float32, device=states.device).masked_scatter(real, picked)


def by_length(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``rows`` reordered shortest first by ``lengths[rows]`` (stable), so that micro-batches cut from a
    minibatch group rows of similar length and each costs its own longest row. The minibatch's
    gradient is the same sum in any order."""
    return rows[lengths[rows].argsort(stable=True)]


def row_lengths(rollout) -> torch.Tensor:
    """(N,) prompt plus completion tokens of each row of ``rollout``."""
    return rollout.prompt_mask.sum(dim=1) + rollout.completion_mask.sum(dim=1)


@torch.no_grad()
def rollout_logprobs(model, rollout, temperature: float, batch_size: int = 16) -> torch.Tensor:
    """Per-token log-probs of every completion in ``rollout`` under ``model``, in micro-batches of
    rows of similar length.

    Returns:
        (N, T) float32, zero on padding.
    """
    order = row_lengths(rollout).argsort(stable=True)
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
    for rows in order.split(batch_size):
        out[rows] = completion_logprobs(
            model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows], rollout.completion_mask[rows], temperature
        )
    return out
