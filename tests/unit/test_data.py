"""Prompt loading: good files become the expected conversations; bad ones name file, row and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from rebelrl.data import PromptDataError, load_prompts
from rebelrl.types import Conversation, Message

ROWS = [
    {"prompt": "Write a haiku.", "id": 1},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 2},
    {"prompt": "Name a color.", "system": "You are terse.", "tags": ["a", "b"]},
]


def _jsonl(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _error(source, **kwargs) -> str:
    with pytest.raises(PromptDataError) as err:
        load_prompts(source, **kwargs)
    return str(err.value)


def test_good_jsonl_loads_with_meta_and_system_prompt(tmp_path):
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2])]  # blank lines skipped
    convs = load_prompts(_jsonl(tmp_path, lines), system_prompt="Default.")
    assert convs == [
        Conversation((Message("system", "Default."), Message("user", "Write a haiku."))),
        Conversation((Message("system", "Be brief."), Message("user", "Hi"))),  # own system message kept
        Conversation((Message("system", "You are terse."), Message("user", "Name a color."))),
    ]
    assert [c.meta for c in convs] == [{"id": 1}, {"id": 2}, {"tags": ["a", "b"]}]
    assert load_prompts(_jsonl(tmp_path, lines))[0].messages == (Message("user", "Write a haiku."),)
    assert len(load_prompts(_jsonl(tmp_path, lines), limit=2)) == 2


def test_custom_field_names(tmp_path):
    line = json.dumps({"question": "2+2?", "sys": "Math.", "answer": "4"})
    (conv,) = load_prompts(_jsonl(tmp_path, [line]), prompt_field="question", system_field="sys")
    assert conv.to_chat() == [{"role": "system", "content": "Math."}, {"role": "user", "content": "2+2?"}]
    assert conv.meta == {"answer": "4"}


def test_good_parquet_with_null_columns(tmp_path):
    """Parquet puts every column in every row: the unused one of prompt/messages is null there."""
    path = tmp_path / "prompts.parquet"
    rows = [
        {"prompt": "Hi", "messages": None, "id": 1},
        {"prompt": None, "messages": [{"role": "user", "content": "Yo"}], "id": 2},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    convs = load_prompts(str(path))
    assert [c.to_chat() for c in convs] == [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    assert [c.meta for c in convs] == [{"id": 1}, {"id": 2}]


def test_saved_dataset_directory_and_splits(tmp_path):
    Dataset.from_list([{"prompt": "Hi", "id": 1}]).save_to_disk(str(tmp_path / "plain"))
    (conv,) = load_prompts(str(tmp_path / "plain"))
    assert conv.first_user == "Hi" and conv.meta == {"id": 1}
    splits = DatasetDict({"test": Dataset.from_list([{"prompt": "Held out"}])})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_prompts(str(tmp_path / "splits"), split="test")[0].first_user == "Held out"
    assert "no split 'train'; splits are ['test']" in _error(str(tmp_path / "splits"))


BAD_JSONL = [
    ("{not json", "line 2: invalid JSON"),
    ("[1, 2]", "line 2: expected an object, got list"),
    ('{"text": "hi"}', "line 2, field 'prompt' or 'messages': missing; each row needs one of them"),
    ('{"prompt": 5}', "line 2, field 'prompt': expected a string, got int"),
    ('{"prompt": "   "}', "line 2, field 'prompt': the prompt is empty"),
    ('{"prompt": "hi", "messages": []}', "line 2, field 'prompt' and 'messages': both given"),
    ('{"prompt": "hi", "system": 3}', "line 2, field 'system': expected a string, got int"),
    ('{"messages": "hi"}', "line 2, field 'messages': expected a non-empty list of messages, got str"),
    ('{"messages": []}', "line 2, field 'messages': expected a non-empty list of messages, got list"),
    ('{"messages": ["hi"]}', "line 2, field 'messages[0]': expected an object with 'role' and 'content', got str"),
    (
        '{"messages": [{"role": "user", "content": null}]}',
        "line 2, field 'messages[0].content': expected a string, got null",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        "line 2, field 'messages[1].role': expected one of system/user/assistant, got 'bot'",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
        "line 2, field 'messages[1].role': the last message must be from the user, got 'assistant'",
    ),
    (
        '{"messages": [{"role": "user", "content": " "}]}',
        "line 2, field 'messages[0].content': the last user message is empty",
    ),
    (
        '{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], "system": "c"}',
        "line 2, field 'system': given, but 'messages' already starts with a system message",
    ),
]


@pytest.mark.parametrize("line, expected", BAD_JSONL)
def test_bad_jsonl_row_names_file_line_and_field(tmp_path, line, expected):
    source = _jsonl(tmp_path, [json.dumps(ROWS[0]), line, json.dumps(ROWS[2])])
    assert _error(source).startswith(f"{source}, {expected}")


def test_line_numbers_count_blank_lines(tmp_path):
    bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    source = _jsonl(tmp_path, [json.dumps(ROWS[0]), "", json.dumps(bad_role)])
    message = _error(source)
    expected = "prompts.jsonl, line 3, field 'messages[1].role': expected one of system/user/assistant, got 'bot'"
    assert message == f"{source[: -len('prompts.jsonl')]}{expected}"


def test_many_errors_are_listed_together(tmp_path):
    """12 bad lines (2..13): one exception lists the first 10 (lines 2..11) and counts the other 2."""
    source = _jsonl(tmp_path, [json.dumps(ROWS[0])] + ['{"prompt": 1}'] * 12)
    message = _error(source)
    assert message.startswith(f"{source}: 12 invalid rows:")
    assert "line 2, field 'prompt'" in message and "line 11, field 'prompt'" in message
    assert "line 12," not in message and message.endswith("... and 2 more")


def test_bad_parquet_row_is_named_by_zero_based_index(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "ok"}, {"prompt": ""}]), path)
    assert _error(str(path)) == f"{path}, row 1 (0-based), field 'prompt': the prompt is empty"


def test_source_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    assert _error(missing) == f"{missing}: file not found"
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nhi\n")
    assert _error(str(csv)).startswith(f"{csv}: unknown file type '.csv'; expected .jsonl, .parquet")
    empty = _jsonl(tmp_path, ["", "  "], name="empty.jsonl")
    assert _error(empty) == f"{empty}: no prompts (the dataset is empty)"
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty_parquet)
    assert _error(str(empty_parquet)) == f"{empty_parquet}: no prompts (the dataset is empty)"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    assert _error(str(broken)).startswith(f"{broken}: cannot read (")
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_prompts(missing, limit=0)


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n{"prompt": "also fine"}\n')
    assert _error(str(path)) == f"{path}, line 2: not valid UTF-8 (byte 0xe9 at column 16)"


def test_rows_carry_where_they_came_from(tmp_path):
    from rebelrl.data import load_prompt_rows

    rows = load_prompt_rows(_jsonl(tmp_path, [json.dumps(ROWS[0]), "", json.dumps(ROWS[2])]))
    assert [where for where, _ in rows] == [f"{tmp_path / 'prompts.jsonl'}, line 1", f"{tmp_path / 'prompts.jsonl'}, line 3"]
