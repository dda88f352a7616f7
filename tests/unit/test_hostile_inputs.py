"""Inputs that were accepted and then ignored, misread or crashed with a traceback: each is refused
through the CLI with one line naming the config key, or the file, row and field, before any model
loads (or, for the user's own code, where it runs)."""

import json
import re

import pytest

from rebelrl.cli import main
from tests.tiny_run import REFUEL_ARGS, TINY_ARGS, one_line, setup_task

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


# --- D, E: settings that would be ignored, values that crashed later ------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.lora_r=4", "model.lora_dropout=0.1"], "model.lora_dropout=0.1: dropout is off while training, because the policy "
         "that is regressed must be the one that sampled"),
        (["task.env=tiny_rules:TinyDialogueEnv"], "task.env='tiny_rules:TinyDialogueEnv' is read only with task.name=env or openenv; with "
         "task.name=prompts it would be ignored"),
        (["task.user=tiny_hostile:ExitingUser"], "task.user='tiny_hostile:ExitingUser' is read only with task.name=chitchat-dialogue"),
        (["algo=online_dpo", "online_dpo.r_max=2"], "online_dpo.r_max=2 clips chi-PO's margin only: with online_dpo.loss=dpo it would be ignored"),
        (["rollout.temperature=0.001"], "rollout.temperature=0.001: expected >= 0.01: below it sampling is greedy in practice"),
        (["eval.temperature=0.005"], "eval.temperature=0.005: expected >= 0.01"),
        (["threads=100000"], "threads=100000: this machine gives the run"),
        (["seed=-1"], "seed=-1: expected in [0, 2147483647] (numpy's seeds are below 2**32"),
        (["seed=4294967296"], "seed=4294967296: expected in [0, 2147483647]"),
        (["eval.seed=100000000000000000000"], "eval.seed=100000000000000000000: expected in [0, 2147483647]"),
        (["model.name="], "model.name='': expected a model: a built-in alias"),
        (["model.ref_name=' '"], "model.ref_name=' ': expected a model"),
    ],
)
def test_a_setting_that_would_be_ignored_or_crash_later_is_refused_naming_its_key(extra, message, task, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(task, run, *extra) == 2
    line = one_line(capsys)
    assert line.startswith(f"rebelrl train: config error: {message}"), line
    assert not run.exists()


def test_task_prompts_with_a_built_in_task_is_refused(task, tmp_path, capsys):
    assert train(task, tmp_path / "run", "task.name=chitchat-warm") == 2
    assert one_line(capsys) == (
        f"rebelrl train: config error: task.prompts={str(task)!r} is read only with task.name=prompts; with task.name=chitchat-warm "
        "it would be ignored: remove it, or set task.name"
    )


@pytest.mark.parametrize("n", ["0", "-2"])
def test_num_processes_below_one_is_refused(n, task, tmp_path, capsys):
    assert main(["train", "--num_processes", n, *TINY_ARGS, f"task.prompts={task}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert one_line(capsys) == f"rebelrl train: config error: --num_processes={n}: expected >= 1 (the number of local processes to train in)"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["tasks=[]"], "tasks=[]: list at least one {name, overrides}"),
        (["threads=0"], "threads=0: expected >= 1 (null leaves each run's own default)"),
        (["budget=10"], "task tiny, method R: budget=10 is less than one iteration's 16 completions: raise the budget"),
    ],
)
def test_a_comparison_that_would_run_nothing_or_past_its_budget_is_refused(extra, message, tmp_path, capsys):
    path = tmp_path / "compare.yaml"
    path.write_text(
        f"run_dir: {tmp_path / 'cmp'}\n"
        "base: {model: {name: tiny-random}, rollout: {prompts_per_iter: 8}}\n"
        "tasks: [{name: tiny, overrides: {}}]\n"
        "methods: [{name: R, overrides: {algo: rebel}}]\n"
        "budget: 32\n"
    )
    assert main(["compare", str(path), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rebelrl compare:")]
    assert err == [f"rebelrl compare: config error: {message}"] or err[0].startswith(f"rebelrl compare: config error: {message}"), err
    assert not (tmp_path / "cmp").exists()


# --- C: text that spells a control token stays text, on every template family ---------------------


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from tests.families import FAMILIES, build_family

    root = tmp_path_factory.mktemp("families")
    return {family: build_family(family, root / family) for family in FAMILIES}


def _specials(tokenizer) -> list[str]:
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special})


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "neox", "sampling-defaults"])
def test_a_prompt_spelling_control_tokens_is_counted_as_plain_text(family, family_dirs, task, tmp_path, capsys):
    """Each family's tokenizer reads one character a token, so a prompt of 600 characters, some of
    them spelling every special token of the tokenizer, is as long as 600 x's: the context check
    reports the same count for both. Read as control tokens, each would have been one token."""
    from rebelrl.models import load_tokenizer

    forged = " ".join(_specials(load_tokenizer(str(family_dirs[family]))))
    counts = []
    for text in ("x" * (600 - len(forged)) + forged, "x" * 600):
        prompts = tmp_path / f"p{len(counts)}.jsonl"
        prompts.write_text(task.read_text() + json.dumps({"prompt": text}) + "\n")
        run = tmp_path / f"run{len(counts)}"
        assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run}", f"model.name={family_dirs[family]}", "iterations=1"]) == 2
        line = one_line(capsys)
        counts.append(int(re.search(r"line 31\): (\d+) tokens with the chat template", line).group(1)))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "neox"])
def test_forged_turns_never_become_control_tokens_in_prompts_or_dialogues(family, family_dirs):
    from rebelrl.models import load_tokenizer
    from rebelrl.rollout.chat import encode_prompt
    from rebelrl.rollout.dialogue import encode_dialogue
    from rebelrl.types import Conversation, Message

    tokenizer = load_tokenizer(str(family_dirs[family]))
    special_ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    forged = "hi " + " then ".join(_specials(tokenizer)) + " bye"
    plain = "hi " + "x" * (len(forged) - 3)

    def controls(ids):
        return [i for i in ids if i in special_ids]

    for system in (None, "be " + forged):
        hostile = Conversation.from_prompt(forged, system=system)
        benign = Conversation.from_prompt(plain, system=None if system is None else "be " + plain)
        ids = encode_prompt(tokenizer, hostile)
        assert controls(ids) == controls(encode_prompt(tokenizer, benign))
        as_text = tokenizer(forged, add_special_tokens=False, split_special_tokens=True).input_ids
        assert any(ids[i : i + len(as_text)] == as_text for i in range(len(ids)))  # the message, character by character
    dialogue = Conversation((Message("user", forged), Message("assistant", "ok " + forged), Message("user", forged), Message("assistant", "done")))
    ids, spans = encode_dialogue(tokenizer, dialogue)
    benign_ids, benign_spans = encode_dialogue(tokenizer, Conversation(tuple(Message(m.role, m.content.replace(forged, plain)) for m in dialogue.messages)))
    assert controls(ids) == controls(benign_ids) and spans == benign_spans
    reply = tokenizer("ok " + forged, add_special_tokens=False, split_special_tokens=True).input_ids
    assert ids[spans[0][0] : spans[0][0] + len(reply)] == reply


# --- F: messages that blame the right thing -------------------------------------------------------


@pytest.mark.parametrize("key", ["rollout.max_new_tokens", "eval.max_new_tokens"])
def test_a_token_budget_past_the_context_names_the_budget_not_the_prompt(key, task, tmp_path, capsys):
    assert train(task, tmp_path / "run", f"{key}=4096") == 2
    assert one_line(capsys) == (
        f"rebelrl train: config error: {key}=4096 leaves no room for a prompt in the model's context of 2048 tokens: set it below 2048"
    )


def test_a_huge_eta_is_named_when_the_loss_overflows(task, tmp_path, capsys):
    assert train(task, tmp_path / "run", "rebel.eta=1e30") == 2
    line = one_line(capsys)
    assert line.startswith("rebelrl train: iteration 1: the loss is inf; stopped before the optimizer step"), line
    assert "or lower rebel.eta=1e+30 if it is (the target is eta times the reward difference)" in line


# --- G: no non-finite number is logged ------------------------------------------------------------


def test_a_non_finite_method_metric_stops_the_run_instead_of_being_logged_as_null(task, tmp_path, capsys):
    """GRPO with beta 0 reports its KL to the reference without using it: a learning rate of 10 makes it
    inf at the first iteration, while the loss stays finite."""
    args = [a for a in TINY_ARGS if not a.startswith(("rebel.", "optim.lr", "update.minibatch_size", "update.micro_batch_size"))]
    run = tmp_path / "run"
    assert main(["train", *args, f"task.prompts={task}", f"run_dir={run}", "iterations=2", "algo=grpo", "rollout.samples_per_prompt=4",
                 "update.minibatch_size=8", "update.micro_batch_size=8", "optim.lr=10"]) == 2
    line = one_line(capsys)
    assert re.match(r"rebelrl train: iteration 1: the grpo/kl is (inf|nan); stopped before logging, evaluating or saving this iteration", line), line
    assert not (run / "metrics.jsonl").exists() or "null" not in (run / "metrics.jsonl").read_text()


def test_an_unknown_reasoning_gym_dataset_is_named_before_any_model_loads(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "model.name=tiny-random", "task.name=reasoning-gym", "task.dataset=basic_arithmatic", f"run_dir={run}"]) == 2
    assert one_line(capsys) == "rebelrl train: config error: task.dataset='basic_arithmatic': reasoning-gym has no such dataset (did you mean basic_arithmetic, bitwise_arithmetic, decimal_arithmetic?)"


def test_lora_target_modules_that_match_nothing_are_named_with_the_ones_there_are(task, tmp_path, capsys):
    assert train(task, tmp_path / "run", "model.lora_r=4", "model.lora_target_modules=qkv") == 2
    assert one_line(capsys) == (
        "rebelrl train: config error: model.lora_target_modules='qkv' matches no module of tiny-random; its linear layers are "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or use all-linear)"
    )


@pytest.mark.parametrize("offline", ["1", ""])
def test_a_hub_id_that_cannot_be_reached_fails_fast_with_one_line(offline, task, tmp_path, capsys, monkeypatch):
    """Offline, or with no network (where these tests run): one line at once, not a minute of retries
    and a traceback. On a machine that reaches the hub the name is refused as no model there."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    start = time.perf_counter()
    assert train(task, tmp_path / "run", "model.name=no-such-owner-rebelrl/no-such-model") == 2
    assert time.perf_counter() - start < 30
    line = one_line(capsys)
    assert line.startswith("rebelrl train: config error: model.name='no-such-owner-rebelrl/no-such-model' is "), line
    assert not (tmp_path / "run").exists()
