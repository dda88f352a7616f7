"""Inputs that were accepted and then ignored, misread or crashed with a traceback: each is refused
through the CLI with one line naming the config key, or the file, row and field, before any model
loads (or, for the user's own code, where it runs)."""

import json
import re

import pytest

from rebelrl.cli import main
from tests.tiny_run import REFUEL_ARGS, TINY_ARGS, setup_task

HOSTILE_MODULE = '''
import sys

from tiny_rules import TinyDialogueEnv, lowercase_fraction


def as_dict(conversations):
    return {i: 0.5 for i in range(len(conversations))}


def as_set(conversations):
    return {0.5}


def as_text(conversations):
    return "1" * len(conversations)


def exits(conversations):
    sys.exit(0)


def raises(conversations):
    raise ValueError("my reward is broken")


class ExitingEnv(TinyDialogueEnv):
    def step(self, conversations):
        sys.exit(3)


class ExitingUser:
    def respond(self, conversations):
        sys.exit(0)
'''


@pytest.fixture
def task(tmp_path, monkeypatch):
    prompts = setup_task(tmp_path, monkeypatch)
    (tmp_path / "tiny_hostile.py").write_text(HOSTILE_MODULE)
    return prompts


def train(prompts, run_dir, *extra):
    return main(["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", "iterations=1", *extra])


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rebelrl train:") or "Traceback" in line]
    assert len(err) == 1, err
    return err[0]


# --- A: what the user's own code returns, and how it ends -----------------------------------------


@pytest.mark.parametrize("reward, got", [("as_dict", "dict"), ("as_set", "set"), ("as_text", "str")])
def test_a_reward_returning_a_mapping_set_or_string_is_refused(reward, got, task, tmp_path, capsys):
    assert train(task, tmp_path / "run", f"reward.fn=tiny_hostile:{reward}") == 2
    line = one_line(capsys)
    assert line.startswith(f"rebelrl train: reward 'tiny_hostile:{reward}' returned {got}, expected a list of 6 floats"), line


def test_sys_exit_in_a_reward_is_an_error_naming_it(task, tmp_path, capsys):
    assert train(task, tmp_path / "run", "reward.fn=tiny_hostile:exits") == 2
    assert one_line(capsys) == (
        "rebelrl train: reward 'tiny_hostile:exits' called sys.exit(0) while scoring 6 conversations; it must return (or raise), not exit"
    )


def test_sys_exit_in_an_env_or_a_user_simulator_is_an_error_naming_it(task, tmp_path, capsys):
    args = [a for a in REFUEL_ARGS if not a.startswith("task.env=")]
    assert main(["train", *args, "task.env=tiny_hostile:ExitingEnv", f"run_dir={tmp_path / 'env'}", "iterations=1"]) == 2
    assert re.fullmatch(r"rebelrl train: env tiny_hostile:ExitingEnv called sys\.exit\(3\) while answering \d+ dialogues \(step\); "
                        r"it must return \(or raise\), not exit", one_line(capsys))
    user_args = [a for a in REFUEL_ARGS if not a.startswith(("task.env=", "task.name=", "task.n_train="))]
    assert main(["train", *user_args, "task.name=chitchat-dialogue", "task.user=tiny_hostile:ExitingUser", "task.n_train=8",
                 f"run_dir={tmp_path / 'user'}", "iterations=1"]) == 2
    assert re.fullmatch(r"rebelrl train: user simulator ExitingUser called sys\.exit\(0\) while answering \d+ dialogues; "
                        r"it must return \(or raise\), not exit", one_line(capsys))


def test_an_exception_in_a_reward_keeps_its_traceback_after_one_line_naming_the_reward(task, tmp_path, capsys):
    assert train(task, tmp_path / "run", "reward.fn=tiny_hostile:raises") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rebelrl train:")]
    assert lines == ["rebelrl train: reward 'tiny_hostile:raises' raised ValueError while scoring 6 conversations; its traceback follows"]
    assert "Traceback (most recent call last)" in err and 'raise ValueError("my reward is broken")' in err
    assert err.rstrip().endswith("ValueError: my reward is broken")


# --- B, E, F: prompt files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, field, message",
    [
        ('{"prompt": "say hi", "prompt": "ignore that, say bye"}', "'prompt'", "the key appears twice in the row"),
        ('{"messages": [{"role": "user", "role": "system", "content": "hi"}]}', "'role'", "the key appears twice in the row"),
        ('{"prompt": "bad \\ud800 text"}', "'prompt'", "holds a lone surrogate '\\ud800' at character 4, which is not text"),
        ('{"messages": [{"role": "user", "content": "\\udfff"}]}', "'messages[0].content'", "holds a lone surrogate"),
        ('{"prompt": "fine", "system": "\\ud800"}', "'system'", "holds a lone surrogate"),
        ('{"prompt": "fine", "answer": ["ok", "\\ud800"]}', "'answer[1]'", "holds a lone surrogate"),
    ],
)
def test_a_bad_row_is_named_by_file_line_and_field(row, field, message, task, tmp_path, capsys):
    with open(task, "a") as f:
        f.write(row + "\n")
    assert train(task, tmp_path / "run") == 2
    line = one_line(capsys)
    assert line.startswith(f"rebelrl train: {task}, line 31, field {field}: {message}"), line


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_a_prompts_path_that_is_not_a_regular_file_says_so(special, task, tmp_path, capsys):
    import os

    path = "/dev/null" if special == "/dev/null" else str(tmp_path / "prompts.fifo")
    if special == "fifo":
        os.mkfifo(path)
    assert train(task, tmp_path / "run", f"task.prompts={path}") == 2
    assert one_line(capsys) == (
        f"rebelrl train: {path}: not a regular file (a pipe, device or socket): give a .jsonl or .parquet file or a datasets folder"
    )


def test_a_config_file_that_is_not_a_regular_file_or_text_that_is_not_text_is_refused(task, tmp_path, capsys):
    assert main(["train", "/dev/null", *TINY_ARGS, f"task.prompts={task}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert one_line(capsys) == "rebelrl train: config error: config file /dev/null is not a regular file"
    assert train(task, tmp_path / "run", 'task.system_prompt="be \\ud800 kind"') == 2
    assert one_line(capsys) == "rebelrl train: config error: task.system_prompt: holds '\\ud800' at character 3, which is not text (a lone surrogate)"
