"""Offline data in the formats TRL reads: preference pairs and demonstrations, checked row by row.

Sources are those of ``rebelrl.data.prompts`` (``.jsonl``, ``.parquet``, a ``save_to_disk`` folder,
``hf:NAME[:SPLIT]``) and so are the rules: every row is checked before anything is returned, and a
bad file fails with one error listing the first problems by file, row and field.

Preference rows (field names configurable)::

    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "margin": 1.5}
    {"prompt": [{"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]}
    {"chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}]}

The last is TRL's implicit prompt: the messages chosen and rejected share. With message lists, each
side holds exactly one assistant reply after the prompt (it may repeat the prompt before it, as
UltraFeedback does). Demonstration rows::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": "Hi", "completion": "Hello!"}

Columns not named by a field go into ``meta`` (``PreferencePair.meta``, ``Conversation.meta``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rebelrl.data.prompts import (
    MAX_LISTED_ERRORS,
    PromptDataError,
    _messages,
    _rows,
    _RowError,
    _text,
    _text_tree,
    _type_name,
)
from rebelrl.errors import UserError
from rebelrl.types import Conversation, Message, PreferencePair


class PreferenceDataError(UserError, ValueError):
    """A preference source that cannot be read, or rows that do not hold a valid pair."""


class DemonstrationDataError(UserError, ValueError):
    """A demonstration source that cannot be read, or rows that do not hold a valid demonstration."""


# --- preference pairs -------------------------------------------------------------------------------


def load_preference_rows(
    source: str,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    margin_field: str = "margin",
    system_field: str = "system",
    split: str = "train",
) -> tuple[list[PreferencePair], list[str]]:
    """Read and validate preference pairs from ``source``; see the module docstring for the rows.

    ``split`` picks from a ``DatasetDict`` folder (or a hub dataset without ``:SPLIT``).

    Returns the pairs and, parallel to them, where each came from ("data/p.jsonl, line 3"), for
    errors found later (a pair too long for the model).
    """
    fields = (prompt_field, chosen_field, rejected_field, margin_field, system_field)

    def parse(row: Any) -> PreferencePair:
        return _pair(row, *fields)

    return _load(str(source), split, parse, PreferenceDataError, "preference pairs")


def _pair(row: Any, prompt_field: str, chosen_field: str, rejected_field: str, margin_field: str, system_field: str) -> PreferencePair:
    """One row as a pair, or a ``_RowError`` naming the first bad field."""
    row = _object(row)
    chosen, rejected = row.get(chosen_field), row.get(rejected_field)
    for name, value in ((chosen_field, chosen), (rejected_field, rejected)):
        if value is None:
            raise _RowError(repr(name), "missing; each row needs a chosen and a rejected reply")
        if not isinstance(value, (str, list)):
            raise _RowError(repr(name), f"expected a string or a list of messages, got {_type_name(value)}")
    if type(chosen) is not type(rejected):
        raise _RowError(repr(rejected_field), f"expected a {_kind(chosen)} like {chosen_field!r}, got a {_kind(rejected)}")
    explicit = row.get(prompt_field)
    if isinstance(chosen, str):
        if explicit is None:
            raise _RowError(repr(prompt_field), "missing; with replies given as strings each row needs the prompt")
        prompt = _prompt(explicit, prompt_field)
        chosen_text, rejected_text = chosen, rejected
    elif explicit is not None:
        prompt = _prompt(explicit, prompt_field)
        chosen_text = _reply_after(prompt, _chat(chosen, chosen_field), chosen_field, prompt_field)
        rejected_text = _reply_after(prompt, _chat(rejected, rejected_field), rejected_field, prompt_field)
    else:
        prompt, chosen_text, rejected_text = _implicit(_chat(chosen, chosen_field), _chat(rejected, rejected_field), chosen_field, rejected_field)
    for name, text in ((chosen_field, chosen_text), (rejected_field, rejected_text)):
        if not text.strip():
            raise _RowError(repr(name), "the reply is empty")
        _text(text, name)
    if chosen_text == rejected_text:
        raise _RowError(f"{chosen_field!r} and {rejected_field!r}", "the same reply: a pair needs two different replies")
    prompt = _with_system(prompt, row, system_field, prompt_field)
    margin = _margin(row.get(margin_field), margin_field)
    meta = _meta(row, fields=(prompt_field, chosen_field, rejected_field, margin_field, system_field))
    return PreferencePair(Conversation(tuple(prompt)), chosen_text, rejected_text, margin, meta)


def _kind(value: Any) -> str:
    return "string" if isinstance(value, str) else "list of messages"


def _implicit(chosen: list[Message], rejected: list[Message], chosen_field: str, rejected_field: str) -> tuple[list[Message], str, str]:
    """TRL's implicit prompt: the leading messages both sides share; after it, one assistant reply each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same(chosen[shared], rejected[shared]):
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise _RowError(f"{chosen_field!r} and {rejected_field!r}", "the same messages: a pair needs two different replies")
    if shared == 0:
        raise _RowError(f"{chosen_field!r} and {rejected_field!r}",
                        "no leading messages in common, so no prompt: give the prompt in its own field or start both with it")
    sides = ((chosen_field, chosen, rejected_field), (rejected_field, rejected, chosen_field))
    for name, side, other in sides:
        if shared == len(side):
            raise _RowError(repr(name), f"holds no reply after the messages it shares with {other!r}")
    for name, side, other in sides[::-1]:
        if side[shared].role != "assistant":
            raise _RowError(repr(f"{name}[{shared}]"),
                            f"continues a different prompt than {other!r}: message {shared} differs, and it is not the reply")
    prompt = chosen[:shared]
    if prompt[-1].role != "user":
        raise _RowError(repr(f"{chosen_field}[{shared - 1}].role"),
                        f"the prompt the two sides share must end with a user message, got {prompt[-1].role!r}")
    if not prompt[-1].content.strip():
        raise _RowError(repr(f"{chosen_field}[{shared - 1}].content"), "the last user message is empty")
    replies = [_one_reply(side[shared:], name, shared) for name, side in ((chosen_field, chosen), (rejected_field, rejected))]
    return prompt, replies[0], replies[1]


def _reply_after(prompt: list[Message], side: list[Message], field: str, prompt_field: str) -> str:
    """The reply of ``side``: the whole list is the reply, or it repeats ``prompt`` and the reply follows."""
    if side[0].role == "assistant":
        return _one_reply(side, field, 0)
    for i, (given, expected) in enumerate(zip(side, prompt)):
        if not _same(given, expected):
            raise _RowError(repr(f"{field}[{i}]"), f"continues a different prompt than the one in {prompt_field!r}: message {i} differs")
    if len(side) <= len(prompt):
        raise _RowError(repr(field), f"repeats the prompt of {prompt_field!r} and holds no reply after it")
    return _one_reply(side[len(prompt):], field, len(prompt))


def _one_reply(messages: list[Message], field: str, start: int) -> str:
    """The text of ``messages`` (what follows the prompt, from index ``start``), if it is one assistant message."""
    if len(messages) == 1 and messages[0].role == "assistant":
        return messages[0].content
    if not messages:
        raise _RowError(repr(field), "holds no reply after the prompt")
    found = ", ".join(m.role for m in messages)
    if len(messages) == 1:
        raise _RowError(repr(f"{field}[{start}].role"), f"the reply must be from the assistant, got {messages[0].role!r}")
    raise _RowError(repr(field), f"multi-turn continuations are not supported: after the prompt it holds {len(messages)} "
                                 f"messages ({found}), expected one assistant reply")


def _same(a: Message, b: Message) -> bool:
    return a.role == b.role and a.content == b.content


def _margin(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _RowError(repr(field), f"expected a number (the reward margin of chosen over rejected), got {_type_name(value)}")
    try:  # a JSON integer has no size limit; one past float's range overflows
        margin = float(value)
    except OverflowError:
        margin = math.inf
    if not math.isfinite(margin):
        raise _RowError(repr(field), f"expected a finite number, got {margin!r}")
    return margin


# --- demonstrations ---------------------------------------------------------------------------------


def load_demonstration_rows(
    source: str,
    *,
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    system_field: str = "system",
    split: str = "train",
) -> tuple[list[Conversation], list[str]]:
    """Read and validate demonstrations from ``source``: whole chats (every assistant turn is trained
    on) or prompt + completion rows. Returns conversations ending with an assistant message, and
    where each came from ("data/sft.jsonl, line 3")."""
    fields = (messages_field, prompt_field, completion_field, system_field)

    def parse(row: Any) -> Conversation:
        return _demonstration(row, *fields)

    return _load(str(source), split, parse, DemonstrationDataError, "demonstrations")


def _demonstration(row: Any, messages_field: str, prompt_field: str, completion_field: str, system_field: str) -> Conversation:
    row = _object(row)
    chat, prompt, completion = row.get(messages_field), row.get(prompt_field), row.get(completion_field)
    if chat is None and prompt is None and completion is None:
        raise _RowError(f"{messages_field!r} or {prompt_field!r} and {completion_field!r}", "missing; each row needs one of them")
    if chat is not None and (prompt is not None or completion is not None):
        other = prompt_field if prompt is not None else completion_field
        raise _RowError(f"{messages_field!r} and {other!r}", "both given; keep one form (or rename the other field)")
    if chat is not None:
        messages = _chat(chat, messages_field)
        _check_turns(messages, messages_field)
    else:
        if prompt is None:
            raise _RowError(repr(prompt_field), f"missing; a row with {completion_field!r} needs the prompt")
        if completion is None:
            raise _RowError(repr(completion_field), f"missing; a row with {prompt_field!r} needs the completion")
        messages = _prompt(prompt, prompt_field)
        if isinstance(completion, list):
            reply = _one_reply(_chat(completion, completion_field), completion_field, 0)
        elif isinstance(completion, str):
            reply = completion
        else:
            raise _RowError(repr(completion_field), f"expected a string or a list with one assistant message, got {_type_name(completion)}")
        if not reply.strip():
            raise _RowError(repr(completion_field), "the completion is empty")
        messages = messages + [Message("assistant", _text(reply, completion_field))]
    messages = _with_system(messages, row, system_field, messages_field if chat is not None else prompt_field)
    meta = _meta(row, fields=(messages_field, prompt_field, completion_field, system_field))
    return Conversation(tuple(messages), meta)


def _check_turns(messages: list[Message], field: str) -> None:
    """A chat to train on: it ends with an assistant reply, each reply answers a user message, no reply is empty."""
    if messages[-1].role != "assistant":
        last = len(messages) - 1
        raise _RowError(repr(f"{field}[{last}].role"), f"the last message must be the assistant's reply, got {messages[-1].role!r}")
    for i, m in enumerate(messages):
        if m.role == "system" and i > 0:
            raise _RowError(repr(f"{field}[{i}].role"), "a system message can only come first")
        if m.role != "assistant":
            continue
        if i == 0 or messages[i - 1].role != "user":
            before = "nothing" if i == 0 else repr(messages[i - 1].role)
            raise _RowError(repr(f"{field}[{i}].role"), f"an assistant reply must follow a user message, got {before} before it")
        if not m.content.strip():
            raise _RowError(repr(f"{field}[{i}].content"), "the assistant reply is empty")


# --- shared by both ---------------------------------------------------------------------------------


def _load(source: str, split: str, parse: Callable[[Any], Any], error: type[Exception], what: str) -> tuple[list, list[str]]:
    """(items, wheres) of every row of ``source`` through ``parse``, or one ``error`` listing the bad rows."""
    items, wheres, errors, bad, total = [], [], [], 0, 0
    for where, row in _source_rows(source, split, error):
        total += 1
        try:
            items.append(parse(row))
            wheres.append(f"{source}, {where}")
        except _RowError as e:
            bad += 1
            if len(errors) < MAX_LISTED_ERRORS:
                field = f", field {e.field}" if e.field else ""
                errors.append(f"{source}, {where}{field}: {e.message}")
    if bad == 1:
        raise error(errors[0])
    if bad:
        more = f"\n  ... and {bad - len(errors)} more" if bad > len(errors) else ""
        raise error(f"{source}: {bad} bad rows out of {total}:\n  " + "\n  ".join(errors) + more)
    if not items:
        raise error(f"{source}: no {what} (the dataset is empty)")
    return items, wheres


def _source_rows(source: str, split: str, error: type[Exception]) -> Iterator[tuple[str, Any]]:
    """``_rows`` of the prompt reader, its errors about the source itself raised as ``error``."""
    try:
        yield from _rows(source, split)
    except PromptDataError as e:
        raise error(str(e)) from None


def _object(row: Any) -> dict:
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict):
        raise _RowError(None, f"expected an object, got {_type_name(row)}")
    return row


def _prompt(value: Any, field: str) -> list[Message]:
    """A prompt given as a string (one user message) or as a list of messages ending with the user's."""
    if isinstance(value, list):
        return _messages(value, field)
    if not isinstance(value, str):
        raise _RowError(repr(field), f"expected a string or a list of messages, got {_type_name(value)}")
    if not value.strip():
        raise _RowError(repr(field), "the prompt is empty")
    return [Message("user", _text(value, field))]


# Stands after a chat that ends with a reply, so that ``_messages`` (which wants a prompt: the last
# message the user's) checks every message of it, with the indices the user sees.
_CLOSING_TURN = {"role": "user", "content": "."}


def _chat(value: Any, field: str) -> list[Message]:
    """Any non-empty list of valid messages (roles and string contents checked)."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type_name(value)
        raise _RowError(repr(field), f"expected a non-empty list of messages, got {got}")
    return _messages([*value, _CLOSING_TURN], field)[:-1]


def _with_system(messages: list[Message], row: dict, system_field: str, prompt_field: str) -> list[Message]:
    system = row.get(system_field)
    if system is None:
        return messages
    if not isinstance(system, str):
        raise _RowError(repr(system_field), f"expected a string, got {_type_name(system)}")
    if not system:
        return messages
    if messages[0].role == "system":
        raise _RowError(repr(system_field), f"given, but {prompt_field!r} already starts with a system message")
    return [Message("system", _text(system, system_field)), *messages]


def _meta(row: dict, fields: Sequence[str]) -> dict:
    meta = {k: v for k, v in row.items() if k not in fields}
    for key, value in meta.items():  # saved with samples and checkpoints, which a lone surrogate would stop
        _text_tree(value, str(key))
    return meta


# --- lengths ----------------------------------------------------------------------------------------


def check_pair_lengths(pairs: Sequence[PreferencePair], wheres: Sequence[str], tokenizer, context: int | None) -> None:
    """Refuse pairs whose prompt and longer reply, rendered with the chat template, exceed the model's
    ``context`` (``None``: no limit known), naming the rows; the message text is kept plain text."""
    from rebelrl.rollout.chat import encode_chat

    def tokens(i: int) -> int:
        pair = pairs[i]
        chat = pair.prompt.to_chat()
        return max(len(encode_chat(tokenizer, chat + [{"role": "assistant", "content": reply}])) for reply in (pair.chosen, pair.rejected))

    _check_lengths(len(pairs), wheres, tokens, context, "prompt and its longer reply", PreferenceDataError)


def check_demonstration_lengths(conversations: Sequence[Conversation], wheres: Sequence[str], tokenizer, context: int | None,
                                limit_name: str = "the model's context") -> None:
    """Refuse demonstrations that, rendered with the chat template, exceed the model's ``context`` (or
    another limit of ``context`` tokens, named ``limit_name``)."""
    from rebelrl.rollout.chat import encode_chat

    def tokens(i: int) -> int:
        return len(encode_chat(tokenizer, conversations[i].to_chat()))

    _check_lengths(len(conversations), wheres, tokens, context, "chat", DemonstrationDataError, limit_name)


def _check_lengths(n: int, wheres: Sequence[str], tokens: Callable[[int], int], context: int | None, what: str,
                   error: type[Exception], limit_name: str = "the model's context") -> None:
    from rebelrl.rollout.chat import ChatTemplateError

    if len(wheres) != n:
        raise ValueError(f"wheres: one a row, got {len(wheres)} for {n} rows")
    if not context:
        return
    errors, bad = [], 0
    for i in range(n):
        try:
            length = tokens(i)
        except ChatTemplateError as e:
            raise error(f"{wheres[i]}: {e}") from None
        if length > context:
            bad += 1
            if len(errors) < MAX_LISTED_ERRORS:
                errors.append(f"{wheres[i]}: {length} tokens ({what}, with the chat template); {limit_name} is {context}")
    if bad == 1:
        raise error(f"{errors[0]}: shorten or drop the row")
    if bad:
        more = f"\n  ... and {bad - len(errors)} more" if bad > len(errors) else ""
        raise error(f"{bad} rows out of {n} are longer than {limit_name} of {context} tokens; shorten or drop them:\n  "
                    + "\n  ".join(errors) + more)
