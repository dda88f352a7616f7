"""How conversations become tokens: the chat template (or plain text), and the token that ends a turn.

A model's chat template decides both what the policy is conditioned on and which token closes an
assistant turn: ``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama-3 (whose EOS is another token),
``<end_of_turn>`` in Gemma, the EOS in plain text. Sampling stops at that token, and turn spans in a
rendered dialogue end at it, so it is read from the template itself rather than assumed to be EOS.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rebelrl.types import Conversation

_PROBE = "rebelrl-probe-reply-7f3a"


class ChatTemplateError(ValueError):
    pass


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> str:
    """The text the policy continues: the conversation so far, ready for the assistant's turn."""
    return render(tokenizer, conversation.to_chat(), add_generation_prompt=True)


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
