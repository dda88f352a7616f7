"""How conversations become tokens: the chat template (or plain text), and the token that ends a turn.

A model's chat template decides both what the policy is conditioned on and which token closes an
assistant turn: ``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama-3 (whose EOS is another token),
``<end_of_turn>`` in Gemma, the EOS in plain text. Sampling stops at that token, and turn spans in a
rendered dialogue end at it, so it is read from the template itself rather than assumed to be EOS.

Message text is never read as control tokens: a prompt holding ``<|im_end|>`` or ``<|eot_id|>``
would otherwise close its turn and open another with any role. ``encode_chat`` tokenizes the
template's own text as usual and every message's text as plain text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rebelrl.types import Conversation

_PROBE = "rebelrl-probe-reply-7f3a"
_SLOT = "@@rebelrl-message-{}@@"  # stands for a message's text while the template is rendered


class ChatTemplateError(ValueError):
    pass


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> str:
    """The text the policy continues: the conversation so far, ready for the assistant's turn."""
    return render(tokenizer, conversation.to_chat(), add_generation_prompt=True)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the template, every message's text tokenized as plain text.

    Where no special token of the tokenizer overlaps a message's text, this is the rendered string
    tokenized whole (the tokens the model was trained on). Otherwise the template's own text is
    tokenized as usual and each message's text with special tokens split into plain text, so a row
    cannot forge a turn, a role or an end of text.
    """
    text = render(tokenizer, messages, add_generation_prompt)
    spans = _message_spans(tokenizer, messages, add_generation_prompt, text)
    if spans is None:
        # The template rewrites message text beyond trimming it: where the text lies is unknown.
        for k, m in enumerate(messages):
            token = next((t for t in _special_strings(tokenizer) if t in m["content"]), None)
            if token is not None:
                raise ChatTemplateError(
                    f"message {k} ({m['role']}) holds {token!r}, a control token of this tokenizer, and the chat template "
                    "changes message text, so it cannot be kept apart as plain text: remove it from the text"
                )
        return _tokens(tokenizer, text)
    if not any(_overlaps(tokenizer, text, start, end) for start, end in spans):
        return _tokens(tokenizer, text)
    ids, pos = [], 0
    for start, end in spans:
        ids += _tokens(tokenizer, text[pos:start])
        ids += _tokens(tokenizer, text[start:end], split_special_tokens=True)
        pos = end
    return ids + _tokens(tokenizer, text[pos:])


def encode_prompt(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> list[int]:
    """Token ids of the prompt the policy continues (``render_prompt``), its text kept plain."""
    return encode_chat(tokenizer, conversation.to_chat(), add_generation_prompt=True)


def _tokens(tokenizer, text: str, **kwargs) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **kwargs).input_ids if text else []


def _special_strings(tokenizer) -> list[str]:
    """The texts the tokenizer turns into special tokens wherever they appear; cached on it."""
    cached = getattr(tokenizer, "_rebelrl_special_strings", None)
    if cached is None:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        cached = sorted({t.content for t in added.values() if t.special and t.content} | set(tokenizer.all_special_tokens), key=len)
        tokenizer._rebelrl_special_strings = cached
    return cached


def _overlaps(tokenizer, text: str, start: int, end: int) -> bool:
    """Whether a special token's text in ``text`` overlaps [start, end) (inside it or across its edges)."""
    for token in _special_strings(tokenizer):
        i = text.find(token, max(0, start - len(token) + 1))
        if i != -1 and i < end:
            return True
    return False


def _message_spans(tokenizer, messages: list[dict], add_generation_prompt: bool, text: str) -> list[tuple[int, int]] | None:
    """[start, end) of each message's text in ``text`` (its rendering), in order; None where they cannot be told.

    The template is rendered again with a placeholder for each text: the template's own text lies
    between the placeholders, and each text is found where its placeholder was, as written or
    trimmed (Llama-3 and Gemma templates trim it); a message the template leaves out has no span."""
    slots = [_SLOT.format(k) for k in range(len(messages))]
    skeleton = render(tokenizer, [{**m, "content": slot} for m, slot in zip(messages, slots)], add_generation_prompt)
    spans, pos, shift = [], 0, 0  # pos: in the skeleton; shift: text position minus skeleton position
    for m, slot in zip(messages, slots):
        at = skeleton.find(slot, pos)
        if at == -1:
            continue  # the template leaves this message out
        if skeleton.find(slot, at + len(slot)) != -1 or text[pos + shift : at + shift] != skeleton[pos:at]:
            return None
        start = at + shift
        written = next((v for v in (m["content"], m["content"].strip()) if text.startswith(v, start)), None)
        if written is None:
            return None
        spans.append((start, start + len(written)))
        shift += len(written) - len(slot)
        pos = at + len(slot)
    return spans if text[pos + shift :] == skeleton[pos:] else None


def turn_terminator(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the token the chat template puts after an assistant reply (the first special token there).

    Found by rendering a probe reply and tokenizing what the template writes after it; cached on the
    tokenizer, whose template does not change under a run.
    """
    cached = getattr(tokenizer, "_rebelrl_terminator", None)
    if cached is not None:
        return cached
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}])
    if _PROBE not in text:
        raise ChatTemplateError("the chat template does not render the assistant's reply verbatim; cannot find where a turn ends")
    suffix = text[text.index(_PROBE) + len(_PROBE):]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = tokenizer(suffix, add_special_tokens=False).input_ids
    found = next((i for i in ids if i in special), None)
    if found is None:
        raise ChatTemplateError(
            f"the chat template ends an assistant turn with {suffix!r}, which holds no special token: rebelrl cannot "
            "tell where a reply ends. Use a template that closes turns with a token, or task.prompt_format=plain"
        )
    tokenizer._rebelrl_terminator = found
    return found


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model=None) -> list[int]:
    """Tokens that end a reply: the template's turn terminator, the tokenizer's EOS, and the EOS ids
    the checkpoint declares (Llama-3 lists ``<|eot_id|>`` and ``<|end_of_text|>``). Stopping is the
    only thing taken from the checkpoint's generation config; it never changes a token's probability."""
    ids = {turn_terminator(tokenizer), tokenizer.eos_token_id}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
