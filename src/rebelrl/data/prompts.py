"""Prompt files: JSONL, Parquet, a saved ``datasets`` directory or a hub dataset, as conversations.

Every row is checked before anything is returned, and a bad file fails with one
``PromptDataError`` listing the first problems by file, row and field, so a user fixes the file
once instead of one training launch per typo. Nothing is silently skipped except blank JSONL lines.

Row format (field names configurable)::

    {"prompt": "Write a haiku about rain.", "system": "Be brief.", "id": 7}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]}

Columns other than the prompt, messages and system fields go into ``Conversation.meta``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rebelrl.errors import UserError
from rebelrl.types import ROLES, Conversation, Message

MAX_LISTED_ERRORS = 10


class PromptDataError(UserError, ValueError):
    """A prompt source that cannot be read, or rows that do not hold a valid prompt."""


class _RowError(Exception):
    """One bad row; ``field`` is the display label of the field at fault (quoted), ``None`` for the row."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's keys, refusing a repeated one: ``json`` keeps the last silently, so a row
    ``{"prompt": "a", "prompt": "b"}`` would train on "b" with nothing said."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) per non-blank line; a line that is not UTF-8 JSON yields a ``_RowError`` as its row."""
    with path.open("rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"line {number}", _RowError(None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                yield f"line {number}", _RowError(None, f"invalid JSON ({e})")
            except _DuplicateKey as e:
                yield f"line {number}", _RowError(repr(e.args[0]), "the key appears twice in the row (JSON would keep the last silently): keep one")


def _read_table(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of a Parquet file, a ``save_to_disk`` directory or ``hf:NAME[:SPLIT]``."""
    if source.startswith("hf:"):
        from datasets import load_dataset

        name, _, hub_split = source[3:].partition(":")
        return list(load_dataset(name, split=hub_split or split))
    path = Path(source)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if split not in data:
                raise PromptDataError(f"{source}: no split {split!r}; splits are {sorted(data)}")
            data = data[split]
        return list(data)
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs; ``where`` names the row the way the user finds it in the source."""
    if not source.startswith("hf:"):
        path = Path(source)
        if not path.exists():
            raise PromptDataError(f"{source}: file not found")
        if not (path.is_file() or path.is_dir()):  # a FIFO would block forever, /dev/null read as no rows
            raise PromptDataError(f"{source}: not a regular file (a pipe, device or socket): give a .jsonl or .parquet file or a datasets folder")
        if path.is_file() and path.suffix == ".jsonl":
            yield from _read_jsonl(path)
            return
        if path.is_file() and path.suffix != ".parquet":
            raise PromptDataError(
                f"{source}: unknown file type {path.suffix or '(no extension)'!r}; expected .jsonl, "
                ".parquet, a directory saved with datasets' save_to_disk, or hf:NAME[:SPLIT]"
            )
    try:
        rows = _read_table(source, split)
    except PromptDataError:
        raise
    except Exception as e:  # pyarrow and datasets raise many types for an unreadable source
        raise PromptDataError(f"{source}: cannot read ({type(e).__name__}: {e})") from e
    for index, row in enumerate(rows):
        yield f"row {index} (0-based)", row


def _text(value: str, field: str) -> str:
    """``value`` if it is text that can be encoded; a lone surrogate (JSON's ``"\\ud800"``) is not
    Unicode text, and the tokenizer would fail on it mid-run."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _RowError(repr(field), f"holds a lone surrogate {value[e.start]!r} at character {e.start}, which is not text") from None
    return value


def _text_tree(value: Any, field: str) -> None:
    if isinstance(value, str):
        _text(value, field)
    elif isinstance(value, dict):
        for k, v in value.items():
            _text_tree(v, f"{field}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _text_tree(v, f"{field}[{i}]")


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _RowError(repr(field), f"expected a non-empty list of messages, got {_type_name(value)}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            got = _type_name(m)
            raise _RowError(repr(f"{field}[{i}]"), f"expected an object with 'role' and 'content', got {got}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _RowError(repr(f"{field}[{i}].role"), f"expected one of {'/'.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _RowError(repr(f"{field}[{i}].content"), f"expected a string, got {_type_name(content)}")
        messages.append(Message(role, _text(content, f"{field}[{i}].content")))
    last = len(messages) - 1
    if messages[last].role != "user":
        got = messages[last].role
        raise _RowError(repr(f"{field}[{last}].role"), f"the last message must be from the user, got {got!r}")
    if not messages[last].content.strip():
        raise _RowError(repr(f"{field}[{last}].content"), "the last user message is empty")
    return messages


def _conversation(
    row: Any, prompt_field: str, messages_field: str, system_field: str, system_prompt: str | None
) -> Conversation:
    """One row as a conversation, or a ``_RowError`` naming the first bad field."""
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict):
        raise _RowError(None, f"expected an object, got {_type_name(row)}")
    prompt, chat = row.get(prompt_field), row.get(messages_field)
    if prompt is None and chat is None:
        raise _RowError(f"{prompt_field!r} or {messages_field!r}", "missing; each row needs one of them")
    if prompt is not None and chat is not None:
        raise _RowError(f"{prompt_field!r} and {messages_field!r}", "both given; keep one (or rename the other field)")
    if chat is not None:
        messages = _messages(chat, messages_field)
    elif not isinstance(prompt, str):
        raise _RowError(repr(prompt_field), f"expected a string, got {_type_name(prompt)}")
    elif not prompt.strip():
        raise _RowError(repr(prompt_field), "the prompt is empty")
    else:
        messages = [Message("user", _text(prompt, prompt_field))]
    system = row.get(system_field)
    if system is not None and not isinstance(system, str):
        raise _RowError(repr(system_field), f"expected a string, got {_type_name(system)}")
    if system is not None:
        _text(system, system_field)
    has_system = messages[0].role == "system"
    if system and has_system:
        raise _RowError(repr(system_field), f"given, but {messages_field!r} already starts with a system message")
    system = system or (None if has_system else system_prompt)
    if system:
        messages.insert(0, Message("system", system))
    meta = {k: v for k, v in row.items() if k not in (prompt_field, messages_field, system_field)}
    for key, value in meta.items():  # saved with the samples, which a lone surrogate would stop
        _text_tree(value, str(key))
    return Conversation(tuple(messages), meta)


def _report(source: str, errors: list[str], total: int) -> str:
    if total == 1:
        return errors[0]
    more = f"\n  ... and {total - len(errors)} more" if total > len(errors) else ""
    return f"{source}: {total} invalid rows:\n  " + "\n  ".join(errors) + more


def load_prompts(source: str, **kwargs: Any) -> list[Conversation]:
    """Read and validate prompts from ``source``; see ``load_prompt_rows`` for the arguments."""
    return [conversation for _, conversation in load_prompt_rows(source, **kwargs)]


def load_prompt_rows(
    source: str,
    *,
    prompt_field: str = "prompt",
    messages_field: str = "messages",
    system_field: str = "system",
    split: str = "train",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> list[tuple[str, Conversation]]:
    """Read and validate prompts from ``source``; see the module docstring for the row format.

    ``source``: a ``.jsonl`` file (rows named by 1-based line number; blank lines skipped), a
    ``.parquet`` file or a ``save_to_disk`` directory (rows named by 0-based index; ``split`` picks
    from a ``DatasetDict``), or ``hf:NAME[:SPLIT]`` for a hub dataset. ``system_prompt`` is added to
    rows without a system message. ``limit`` keeps (and checks) only the first ``limit`` rows.

    Returns (where, conversation) pairs; ``where`` names the row in the source ("data.jsonl, line 3"),
    for errors found later (a prompt too long for the model, a reward that fails on it).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit}")
    conversations, errors, total = [], [], 0
    for where, row in _rows(str(source), split):
        if limit is not None and len(conversations) + total >= limit:
            break
        try:
            conversation = _conversation(row, prompt_field, messages_field, system_field, system_prompt)
            conversations.append((f"{source}, {where}", conversation))
        except _RowError as e:
            total += 1
            if len(errors) < MAX_LISTED_ERRORS:
                field = f", field {e.field}" if e.field else ""
                errors.append(f"{source}, {where}{field}: {e.message}")
    if total:
        raise PromptDataError(_report(str(source), errors, total))
    if not conversations:
        raise PromptDataError(f"{source}: no prompts (the dataset is empty)")
    return conversations
