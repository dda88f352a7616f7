"""Offline data: preference pairs and demonstrations load from TRL's formats, every bad row is named
by file, row and field, lengths are counted with the chat template, and ``rebelrl pairs`` writes a
file that loads back, labelled by score or by Bradley-Terry draws."""

import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from rebelrl.cli import main
from rebelrl.data import (
    DemonstrationDataError,
    PreferenceDataError,
    check_demonstration_lengths,
    check_pair_lengths,
    load_demonstration_rows,
    load_preference_rows,
)
from rebelrl.data.make_pairs import best_and_worst, bradley_terry_probability, label_pair, write_jsonl_atomically
from rebelrl.errors import UserError
from rebelrl.models import tiny_tokenizer
from rebelrl.types import Conversation, Message, PreferencePair
from tests.tiny_run import read_jsonl, setup_task


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def _jsonl(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _pair_error(source, **kwargs) -> str:
    with pytest.raises(PreferenceDataError) as err:
        load_preference_rows(source, **kwargs)
    return str(err.value)


# --- preference pairs: good files -------------------------------------------------------------------


def test_string_pairs_load_with_margin_meta_and_where(tmp_path):
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "margin": 1.5, "chosen_score": 2.0, "rejected_score": 0.5},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "system": "Be kind.", "margin": None},
    ]
    pairs, wheres = load_preference_rows(_jsonl(tmp_path, [rows[0], "", rows[1]]))
    assert pairs == [
        PreferencePair(Conversation((Message("user", "Name a colour."),)), "Blue.", "No.", 1.5),
        PreferencePair(Conversation((Message("system", "Be kind."), Message("user", "Hi"))), "Hello!", "Go away."),
    ]
    assert pairs[0].meta == {"chosen_score": 2.0, "rejected_score": 0.5} and pairs[1].meta == {}
    assert wheres == [f"{tmp_path}/pairs.jsonl, line 1", f"{tmp_path}/pairs.jsonl, line 3"]  # blank line 2 skipped


def test_message_list_pairs_with_explicit_and_implicit_prompt(tmp_path):
    rows = [
        # TRL's conversational format with an explicit prompt: each side is the reply alone
        {"prompt": [user("Q")], "chosen": [assistant("A")], "rejected": [assistant("B")]},
        # UltraFeedback: a string prompt, and each side repeats it before its reply
        {"prompt": "Q", "chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")]},
        # implicit prompt: the leading messages both sides share, several turns of them
        {"chosen": [system("S"), user("Hi"), assistant("Hey"), user("Q"), assistant("A")],
         "rejected": [system("S"), user("Hi"), assistant("Hey"), user("Q"), assistant("B")]},
        # implicit prompt with the system message given in its own field
        {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")], "system": "S", "id": 7},
    ]
    pairs, _ = load_preference_rows(_jsonl(tmp_path, rows))
    assert [p.prompt.to_chat() for p in pairs] == [
        [user("Q")],
        [user("Q")],
        [system("S"), user("Hi"), assistant("Hey"), user("Q")],
        [system("S"), user("Q")],
    ]
    assert all((p.chosen, p.rejected) == ("A", "B") for p in pairs)
    assert pairs[3].meta == {"id": 7}


def test_custom_field_names(tmp_path):
    row = {"question": "Q", "good": "A", "bad": "B", "delta": 2, "sys": "S"}
    (pair,), _ = load_preference_rows(_jsonl(tmp_path, [row]), prompt_field="question", chosen_field="good",
                                      rejected_field="bad", margin_field="delta", system_field="sys")
    assert pair.prompt.to_chat() == [system("S"), user("Q")] and (pair.chosen, pair.rejected, pair.margin) == ("A", "B", 2.0)


def test_pairs_from_parquet_and_saved_datasets(tmp_path):
    rows = [
        {"prompt": None, "chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")], "margin": 0.5},
        {"prompt": [user("R")], "chosen": [assistant("C")], "rejected": [assistant("D")], "margin": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    pairs, wheres = load_preference_rows(str(tmp_path / "pairs.parquet"))
    assert [(p.prompt.first_user, p.chosen, p.rejected, p.margin) for p in pairs] == [("Q", "A", "B", 0.5), ("R", "C", "D", None)]
    assert wheres[1] == f"{tmp_path}/pairs.parquet, row 1 (0-based)"

    DatasetDict({"test": Dataset.from_list([{"prompt": "Q", "chosen": "A", "rejected": "B"}])}).save_to_disk(str(tmp_path / "ds"))
    (pair,), _ = load_preference_rows(str(tmp_path / "ds"), split="test")
    assert (pair.prompt.first_user, pair.chosen, pair.rejected) == ("Q", "A", "B")
    assert "no split 'train'" in _pair_error(str(tmp_path / "ds"))


def test_preference_pair_stays_backward_compatible():
    prompt = Conversation.from_prompt("Q")
    old = PreferencePair(prompt, "A", "B")
    assert old.margin is None and old.meta == {}
    # meta is not part of a pair's identity: equal pairs hash alike whatever their meta
    assert PreferencePair(prompt, "A", "B", meta={"id": 1}) == old and hash(PreferencePair(prompt, "A", "B", meta={"id": 1})) == hash(old)


# --- preference pairs: bad rows ---------------------------------------------------------------------

BAD_PAIRS = [
    ({"prompt": "x", "rejected": "a"}, "field 'chosen': missing"),
    ({"prompt": "x", "chosen": "a"}, "field 'rejected': missing"),
    ({"chosen": "a", "rejected": "b"}, "field 'prompt': missing; with replies given as strings each row needs the prompt"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a string or a list of messages, got int"),
    ({"prompt": "x", "chosen": "a", "rejected": [assistant("b")]}, "field 'rejected': expected a string like 'chosen', got a list of messages"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "field 'prompt': expected a string or a list of messages, got int"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "field 'prompt': the prompt is empty"),
    ({"prompt": "x", "chosen": "  \n", "rejected": "b"}, "field 'chosen': the reply is empty"),
    ({"prompt": "x", "chosen": [assistant("a")], "rejected": [assistant(" ")]}, "field 'rejected': the reply is empty"),
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "field 'chosen' and 'rejected': the same reply"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a")]}, "field 'chosen' and 'rejected': the same messages"),
    # a rejected reply to another prompt: implicit, then against an explicit prompt
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("other q"), assistant("b")]},
     "field 'chosen' and 'rejected': no leading messages in common, so no prompt"),
    ({"chosen": [system("s"), user("q"), assistant("a")], "rejected": [system("s"), user("other q"), assistant("b")]},
     "field 'rejected[1]': continues a different prompt than 'chosen': message 1 differs"),
    ({"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("other q"), assistant("b")]},
     "field 'rejected[0]': continues a different prompt than the one in 'prompt': message 0 differs"),
    ({"prompt": "q", "chosen": [user("q")], "rejected": [assistant("b")]},
     "field 'chosen': repeats the prompt of 'prompt' and holds no reply after it"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q")]}, "field 'rejected': holds no reply after the messages it shares with 'chosen'"),
    # roles
    ({"prompt": "x", "chosen": [{"role": "bot", "content": "a"}], "rejected": [assistant("b")]},
     "field 'chosen[0].role': expected one of system/user/assistant, got 'bot'"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "b", "rejected": "c"},
     "field 'prompt[1].role': the last message must be from the user, got 'assistant'"),
    ({"prompt": "q", "chosen": [user("q"), user("more")], "rejected": [assistant("b")]},
     "field 'chosen[1].role': the reply must be from the assistant, got 'user'"),
    ({"chosen": [system("s"), assistant("a")], "rejected": [system("s"), assistant("b")]},
     "field 'chosen[0].role': the prompt the two sides share must end with a user message, got 'system'"),
    # multi-turn continuations
    ({"chosen": [user("q"), assistant("a"), user("and?"), assistant("c")], "rejected": [user("q"), assistant("b")]},
     "field 'chosen': multi-turn continuations are not supported: after the prompt it holds 3 messages (assistant, user, assistant)"),
    ({"prompt": "q", "chosen": [assistant("a")], "rejected": [assistant("b"), assistant("c")]},
     "field 'rejected': multi-turn continuations are not supported: after the prompt it holds 2 messages (assistant, assistant)"),
    # contents and other fields
    ({"prompt": "x", "chosen": [{"role": "assistant", "content": 1}], "rejected": [assistant("b")]},
     "field 'chosen[0].content': expected a string, got int"),
    ({"prompt": "x", "chosen": [], "rejected": [assistant("b")]}, "field 'chosen': expected a non-empty list of messages, got an empty list"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin': expected a number"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": True}, "field 'margin': expected a number"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "margin": NaN}', "field 'margin': expected a finite number, got nan"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "margin": -Infinity}', "field 'margin': expected a finite number, got -inf"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "system": 3}, "field 'system': expected a string, got int"),
    ({"prompt": [system("s"), user("x")], "chosen": "a", "rejected": "b", "system": "t"},
     "field 'system': given, but 'prompt' already starts with a system message"),
    ('{"prompt": "x", "chosen": "a\\ud800", "rejected": "b"}', "field 'chosen': holds a lone surrogate"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "note": "\\udfff"}', "field 'note': holds a lone surrogate"),
    ('{"prompt": "x", "chosen": "a", "chosen": "c", "rejected": "b"}', "field 'chosen': the key appears twice in the row"),
    ("[1, 2]", "expected an object, got list"),
    ("{oops", "invalid JSON"),
]


@pytest.mark.parametrize("row, expected", BAD_PAIRS, ids=[e[:60] for _, e in BAD_PAIRS])
def test_bad_pair_row_names_file_row_and_field(tmp_path, row, expected):
    source = _jsonl(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    message = _pair_error(source)
    assert message.startswith(f"{source}, line 2"), message
    assert expected in message, message


def test_every_bad_row_is_listed_with_the_count(tmp_path):
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    source = _jsonl(tmp_path, [good] * 3 + [{"prompt": "x", "chosen": "a", "rejected": "a"}] * 12)
    message = _pair_error(source)
    assert message.startswith(f"{source}: 12 bad rows out of 15:\n"), message
    assert f"{source}, line 4, field 'chosen' and 'rejected'" in message and f"{source}, line 13," in message
    assert f"{source}, line 14," not in message and message.endswith("... and 2 more")


def test_bad_parquet_row_is_named_by_index(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "", "rejected": "b"}]),
                   tmp_path / "p.parquet")
    assert _pair_error(str(tmp_path / "p.parquet")) == f"{tmp_path}/p.parquet, row 1 (0-based), field 'chosen': the reply is empty"


def test_source_errors_are_preference_errors(tmp_path):
    for source, expected in [(tmp_path / "missing.jsonl", "file not found"), (tmp_path / "p.csv", "unknown file type '.csv'")]:
        if source.suffix == ".csv":
            source.write_text("prompt,chosen\n")
        with pytest.raises(PreferenceDataError, match=expected) as err:
            load_preference_rows(str(source))
        assert isinstance(err.value, UserError)
    assert "no preference pairs (the dataset is empty)" in _pair_error(_jsonl(tmp_path, ["", " "]))


# --- demonstrations ---------------------------------------------------------------------------------


def test_demonstrations_in_both_formats(tmp_path):
    rows = [
        {"messages": [system("S"), user("Hi"), assistant("Hello"), user("Q"), assistant("A")], "id": 1},
        {"prompt": "Q", "completion": "A", "system": "S"},
        {"prompt": [user("Q")], "completion": [assistant("A")]},  # TRL's conversational prompt-completion
    ]
    chats, wheres = load_demonstration_rows(_jsonl(tmp_path, rows, "sft.jsonl"))
    assert [c.to_chat() for c in chats] == [
        [system("S"), user("Hi"), assistant("Hello"), user("Q"), assistant("A")],
        [system("S"), user("Q"), assistant("A")],
        [user("Q"), assistant("A")],
    ]
    assert [c.meta for c in chats] == [{"id": 1}, {}, {}]
    assert wheres == [f"{tmp_path}/sft.jsonl, line {i}" for i in (1, 2, 3)]
    Dataset.from_list([{"prompt": "Q", "completion": "A"}]).save_to_disk(str(tmp_path / "ds"))
    (chat,), _ = load_demonstration_rows(str(tmp_path / "ds"))
    assert chat.to_chat() == [user("Q"), assistant("A")]


BAD_DEMONSTRATIONS = [
    ({"text": "hi"}, "field 'messages' or 'prompt' and 'completion': missing"),
    ({"messages": [user("q"), assistant("a")], "prompt": "q"}, "field 'messages' and 'prompt': both given"),
    ({"prompt": "q"}, "field 'completion': missing; a row with 'prompt' needs the completion"),
    ({"completion": "a"}, "field 'prompt': missing; a row with 'completion' needs the prompt"),
    ({"prompt": "q", "completion": " "}, "field 'completion': the completion is empty"),
    ({"prompt": "q", "completion": [assistant("")]}, "field 'completion': the completion is empty"),
    ({"prompt": "q", "completion": 4}, "field 'completion': expected a string or a list with one assistant message, got int"),
    ({"prompt": "q", "completion": [user("a")]}, "field 'completion[0].role': the reply must be from the assistant, got 'user'"),
    ({"prompt": "q", "completion": [assistant("a"), user("b"), assistant("c")]},
     "field 'completion': multi-turn continuations are not supported: after the prompt it holds 3 messages"),
    ({"prompt": [assistant("q")], "completion": "a"}, "field 'prompt[0].role': the last message must be from the user, got 'assistant'"),
    ({"messages": [user("q")]}, "field 'messages[0].role': the last message must be the assistant's reply, got 'user'"),
    ({"messages": [assistant("a")]}, "field 'messages[0].role': an assistant reply must follow a user message, got nothing before it"),
    ({"messages": [user("q"), assistant("a"), assistant("b")]},
     "field 'messages[2].role': an assistant reply must follow a user message, got 'assistant' before it"),
    ({"messages": [user("q"), assistant(" "), user("r"), assistant("b")]}, "field 'messages[1].content': the assistant reply is empty"),
    ({"messages": [user("q"), system("s"), user("r"), assistant("b")]}, "field 'messages[1].role': a system message can only come first"),
    ({"messages": [user("q"), {"role": "tool", "content": "x"}, assistant("b")]}, "field 'messages[1].role': expected one of system/user/assistant"),
    ({"messages": [user("q"), {"role": "assistant", "content": None}]}, "field 'messages[1].content': expected a string, got null"),
    ({"messages": [system("s"), user("q"), assistant("a")], "system": "t"}, "field 'system': given, but 'messages' already starts with a system message"),
    ('{"prompt": "q", "completion": "\\ud83d"}', "field 'completion': holds a lone surrogate"),
]


@pytest.mark.parametrize("row, expected", BAD_DEMONSTRATIONS, ids=[e[:60] for _, e in BAD_DEMONSTRATIONS])
def test_bad_demonstration_row_names_file_row_and_field(tmp_path, row, expected):
    source = _jsonl(tmp_path, [{"prompt": "ok", "completion": "fine"}, row], "sft.jsonl")
    with pytest.raises(DemonstrationDataError) as err:
        load_demonstration_rows(source)
    assert str(err.value).startswith(f"{source}, line 2"), str(err.value)
    assert expected in str(err.value), str(err.value)


# --- lengths ----------------------------------------------------------------------------------------


def test_pair_length_is_counted_with_the_template_and_a_too_long_pair_is_named():
    """The tiny tokenizer is one token a character, and ChatML renders [user "ab", assistant "xyz"] as
    <|im_start|> "user\\n" "ab" <|im_end|> "\\n" <|im_start|> "assistant\\n" "xyz" <|im_end|> "\\n":
    1 + 5 + 2 + 1 + 1 + 1 + 10 + 3 + 1 + 1 = 26 tokens. The longer reply counts: "xyz" (3) beats "x" (1).
    A reply holding the text "<|im_end|>" is 10 plain characters, not one control token: 26 - 3 + 10 = 33."""
    tokenizer = tiny_tokenizer()
    pairs = [PreferencePair(Conversation.from_prompt("ab"), "x", "xyz"), PreferencePair(Conversation.from_prompt("ab"), "<|im_end|>", "x")]
    check_pair_lengths(pairs[:1], ["p.jsonl, line 1"], tokenizer, 26)
    check_pair_lengths(pairs, ["p.jsonl, line 1", "p.jsonl, line 2"], tokenizer, None)  # no known context: nothing to check
    with pytest.raises(PreferenceDataError) as err:
        check_pair_lengths(pairs[:1], ["p.jsonl, line 1"], tokenizer, 25)
    assert str(err.value).startswith("p.jsonl, line 1: 26 tokens (prompt and its longer reply, with the chat template); the model's context is 25")
    with pytest.raises(PreferenceDataError, match="^p.jsonl, line 2: 33 tokens"):
        check_pair_lengths(pairs, ["p.jsonl, line 1", "p.jsonl, line 2"], tokenizer, 32)
    with pytest.raises(PreferenceDataError, match="^2 rows out of 2 are longer than the model's context of 20 tokens"):
        check_pair_lengths(pairs, ["p.jsonl, line 1", "p.jsonl, line 2"], tokenizer, 20)


def test_demonstration_length_names_the_row():
    tokenizer = tiny_tokenizer()
    chat = Conversation.from_prompt("ab").with_reply("xyz")  # 26 tokens, as above
    check_demonstration_lengths([chat], ["sft.jsonl, line 4"], tokenizer, 26)
    with pytest.raises(DemonstrationDataError, match="^sft.jsonl, line 4: 26 tokens"):
        check_demonstration_lengths([chat], ["sft.jsonl, line 4"], tokenizer, 25)


# --- labelling pairs --------------------------------------------------------------------------------


def test_bradley_terry_probability_by_hand():
    """sigmoid(beta * gap): gap ln 3 at beta 1 gives 3 / (1 + 3) = 0.75; beta 2 gives 9 / 10; beta 0 a coin flip."""
    assert bradley_terry_probability(math.log(3), 1.0) == pytest.approx(0.75)
    assert bradley_terry_probability(math.log(3), 2.0) == pytest.approx(0.9)
    assert bradley_terry_probability(5.0, 0.0) == 0.5
    assert bradley_terry_probability(1e6, 1.0) == 1.0  # no overflow


def test_label_pair_by_score_and_by_bradley_terry_draws():
    """With bt_beta = 1 and s_best - s_worst = ln 3 the best reply is chosen with probability 0.75: a draw
    u < 0.75 keeps it chosen, u >= 0.75 swaps. Over 20,000 draws the flip rate is 0.25 within 4 standard
    errors, sqrt(0.25 * 0.75 / 20000) = 0.0031 each."""
    scores = [0.0, 0.5, math.log(3), 0.2]  # best 2, worst 0, gap ln 3
    best, worst = best_and_worst(scores, [True] * 4)
    assert (best, worst) == (2, 0)
    assert label_pair(best, worst, math.log(3), None, 0.99) == (2, 0)  # by score: the draw is not used
    assert label_pair(best, worst, math.log(3), 1.0, 0.74) == (2, 0)
    assert label_pair(best, worst, math.log(3), 1.0, 0.76) == (0, 2)
    rng = random.Random(0)
    n = 20_000
    flips = sum(label_pair(best, worst, math.log(3), 1.0, rng.random()) == (0, 2) for _ in range(n)) / n
    assert abs(flips - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), flips


def test_best_and_worst_skip_ties_and_unusable_replies():
    assert best_and_worst([1.0, 1.0, 1.0], [True] * 3) is None  # all equal: no preference
    assert best_and_worst([0.0, 3.0, 3.0, 0.0], [True] * 4) == (1, 0)  # the first of equal scores
    assert best_and_worst([9.0, 1.0, 2.0], [False, True, True]) == (2, 1)  # an empty reply is left out
    assert best_and_worst([9.0, 1.0, 2.0], [False, False, True]) is None


def test_atomic_write_refuses_an_existing_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomically(path, [{"a": 1}], overwrite=False)
    with pytest.raises(UserError, match="overwrite=true"):
        write_jsonl_atomically(path, [{"a": 2}], overwrite=False)
    assert read_jsonl(path) == [{"a": 1}]
    write_jsonl_atomically(path, [{"a": 3}], overwrite=True)
    assert read_jsonl(path) == [{"a": 3}] and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# --- rebelrl pairs on the tiny model ----------------------------------------------------------------

PAIRS_ARGS = ["model=tiny-random", "task.name=prompts", "task.n_eval=6", "reward.fn=tiny_rules:lowercase_fraction",
              "reward.no_eos_penalty=null", "max_new_tokens=8", "batch_size=10"]


def _pairs(tmp_path, monkeypatch, output, *extra):
    prompts = setup_task(tmp_path, monkeypatch)
    return main(["pairs", *PAIRS_ARGS, f"task.prompts={prompts}", f"output={output}", *extra])


def test_pairs_command_writes_best_vs_worst_pairs_that_load(tmp_path, monkeypatch, capsys):
    output = tmp_path / "pairs.jsonl"
    assert _pairs(tmp_path, monkeypatch, output) == 0
    rows = read_jsonl(output)
    out = capsys.readouterr().out
    skipped = int(out.split("; ")[1].split(" prompts skipped")[0])
    assert len(rows) + skipped == 24 and len(rows) > 12, out  # 30 prompts, 6 held out
    assert out.startswith(f"wrote {len(rows)} pairs from 24 prompts to {output} (labels: score)")
    for row in rows:
        assert len(row["scores"]) == 4 and row["label"] == "score" and isinstance(row["prompt"], str)
        # an empty reply (which scores 0, the lowest) is never in a pair; else the worst is the rejected one
        worst = min(x for x in row["scores"] if x > 0) if row["rejected_score"] > 0 else 0.0
        assert row["chosen_score"] == max(row["scores"]) > row["rejected_score"] == worst
        assert row["chosen_score"] == pytest.approx(sum(c.islower() for c in row["chosen"]) / len(row["chosen"]))
    pairs, wheres = load_preference_rows(str(output))
    assert [p.chosen for p in pairs] == [r["chosen"] for r in rows] and wheres[0] == f"{output}, line 1"
    assert pairs[0].meta["chosen_score"] == rows[0]["chosen_score"] and pairs[0].margin is None

    # the same seed gives the same file; an existing file is refused unless overwrite=true
    before = output.read_text()
    assert _pairs(tmp_path, monkeypatch, output) == 2
    assert "the file exists; set overwrite=true" in capsys.readouterr().err and output.read_text() == before
    assert _pairs(tmp_path, monkeypatch, output, "overwrite=true", "batch_size=3") == 0
    assert output.read_text() == before  # one seed a prompt: the batch size changes nothing


def test_pairs_command_with_bradley_terry_labels(tmp_path, monkeypatch):
    output = tmp_path / "sub" / "bt.jsonl"
    assert _pairs(tmp_path, monkeypatch, output, "bt_beta=1.0", "split=all", "samples_per_prompt=3") == 0
    rows = read_jsonl(output)
    assert rows and all(r["label"] == "bradley_terry" and len(r["scores"]) == 3 for r in rows)
    assert all(max(r["chosen_score"], r["rejected_score"]) == max(r["scores"]) for r in rows)
    assert all(min(r["chosen_score"], r["rejected_score"]) in r["scores"] for r in rows)
    assert len(load_preference_rows(str(output))[0]) == len(rows)


@pytest.mark.parametrize("args, expected", [
    ([], "output=None: expected the path of the pairs file to write, ending in .jsonl"),
    (["output=out.csv"], "output='out.csv': expected the path"),
    (["output=o.jsonl", "samples_per_prompt=1"], "samples_per_prompt=1: expected >= 2"),
    (["output=o.jsonl", "temperature=0"], "temperature=0.0: expected > 0"),
    (["output=o.jsonl", "bt_beta=-1"], "bt_beta=-1.0: expected >= 0"),
    (["output=o.jsonl", "task.name=secret"], "task.name=secret: pairs are made from single-turn prompts"),
])
def test_pairs_config_errors(args, expected, capsys):
    assert main(["pairs", "model=tiny-random", *args]) == 2
    assert expected in capsys.readouterr().err


def test_a_pairs_other_columns_reach_the_reward_with_its_prompt(tmp_path):
    """A reward reads a row's extra columns (a reasoning-gym entry) from the prompt it judges: the held-out
    prompts a pair-trained run samples, and the replies A-LoL scores, carry the pair's columns."""
    from rebelrl.envs.tasks import build_task
    from rebelrl.train.config import TaskConfig

    rows = [{"prompt": f"{i} + 1 =", "chosen": str(i + 1), "rejected": str(i), "entry": {"answer": str(i + 1)}} for i in range(6)]
    data = _jsonl(tmp_path, rows)
    task = build_task(TaskConfig(name="preferences", data=str(data), n_eval=2))
    assert [c.meta["entry"]["answer"] for c in task.train + task.eval] == [p.meta["entry"]["answer"] for p in task.train_data + task.eval_data]
    pair = task.train_data[0]
    assert pair.context.with_reply(pair.rejected).meta == {"entry": pair.meta["entry"]} and pair.prompt.meta == {}
