import json

import pytest

from rebelrl.cli import main
from rebelrl.envs import UserEnv, UserSimulatorError
from rebelrl.envs.users import LMUser, clean_user_message, user_view
from rebelrl.types import Conversation
from tests.tiny_run import REFUEL_ARGS, read_jsonl, setup_task

CHAT = Conversation.from_chat(
    [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "I got a puppy!"},
        {"role": "assistant", "content": "How lovely! What is its name?"},
    ]
)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Her name is Bella.", "Her name is Bella."),
        ('User: "Her name is Bella."', "Her name is Bella."),
        ("  human:  Bella!\nAssistant: What a nice name.", "Bella!"),
        ("Bella\nAI: nice", "Bella"),
        ("   ", ""),
    ],
)
def test_clean_user_message(raw, clean):
    assert clean_user_message(raw) == clean


def test_user_view_shows_the_transcript_from_the_users_side():
    view = user_view(CHAT)
    assert view.messages[0].role == "system" and "role-playing a human user" in view.messages[0].content
    assert "User: I got a puppy!\nAssistant: How lovely! What is its name?" in view.first_user
    assert "be kind" not in view.first_user  # the assistant's system prompt is not the user's business


def test_lm_user_is_deterministic_and_redraws_on_a_retry():
    a, b = LMUser("tiny-random", seed=3, max_new_tokens=8), LMUser("tiny-random", seed=3, max_new_tokens=8)
    first = a.respond([CHAT, CHAT])
    assert first == b.respond([CHAT, CHAT])  # same seed, same transcripts: same user turns
    assert a.respond([CHAT, CHAT]) != first  # asked again at once: a fresh draw


def test_user_env_gives_up_on_a_silent_lm_user_after_bounded_retries():
    class Silent(LMUser):
        def respond(self, conversations):
            return ["" for _ in conversations]

    env = UserEnv([CHAT], Silent("tiny-random"), horizon=3, max_retries=2)
    with pytest.raises(UserSimulatorError, match="row 0"):
        env.step([CHAT])


def test_chitchat_dialogue_task_with_an_lm_user_and_with_a_plugged_user(tmp_path, monkeypatch):
    setup_task(tmp_path, monkeypatch)
    base = [a for a in REFUEL_ARGS if not a.startswith(("task.", "reward."))]
    common = ["task.name=chitchat-dialogue", "task.horizon=2", "task.n_train=16", "task.n_eval=3", "iterations=1"]
    lm = tmp_path / "lm"
    assert main(["train", *base, *common, "task.user_model=tiny-random", f"run_dir={lm}"]) == 0
    plugged = tmp_path / "plugged"
    assert main(["train", *base, *common, "task.user=tiny_rules:GoOnUser", f"run_dir={plugged}"]) == 0
    dialogue = read_jsonl(plugged / "eval_samples_latest.jsonl")[0]["messages"]
    assert [m["content"] for m in dialogue if m["role"] == "user"][1:] == ["go on"]
    assert len(read_jsonl(lm / "metrics.jsonl")) == 1


def test_eval_command_on_a_dialogue_task_reports_per_turn_win_rates(tmp_path, monkeypatch, capsys):
    setup_task(tmp_path, monkeypatch)
    args = ["eval", "model=tiny-random", "baseline=tiny-random", "task.name=env", "task.env=tiny_rules:TinyDialogueEnv",
            "task.horizon=2", "task.n_train=4", "task.n_eval=3", "reward.fn=tiny_rules:lowercase_fraction", "max_new_tokens=5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[: out.index("\nwin rate vs baseline by turn")])
    # the same model and seed on both sides: every turn a tie
    assert result["win_rate_vs_baseline_turn_1"] == 0.5 and result["win_rate_vs_baseline_turn_2"] == 0.5
    assert "| h=1 | h=2 |" in out
