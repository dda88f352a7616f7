import pytest

from rebelrl.envs.numbers import NumberEnv, ScriptedNumberUser, answer, guessed_number, number_reward
from rebelrl.types import Conversation


@pytest.mark.parametrize("text, number", [("I guess 4.", 4), ("Is it 3 or 5?", 5), ("no idea", None), ("7", 7)])
def test_guessed_number_is_the_last_integer(text, number):
    assert guessed_number(text) == number


def test_answers_follow_the_secret():
    assert answer("4", secret=6, max_number=8) == "Higher."
    assert answer("My guess: 7", secret=6, max_number=8) == "Lower."
    assert answer("6!", secret=6, max_number=8) == "Correct!"
    assert answer("hmm", secret=6, max_number=8) == "Please guess one whole number from 1 to 8."


def test_reset_is_seeded_and_steps_end_on_a_correct_guess_or_the_horizon():
    env = NumberEnv(horizon=2, max_number=8)
    a, b = env.reset(20, seed=1), env.reset(20, seed=1)
    assert [c.meta["number"] for c in a] == [c.meta["number"] for c in b]
    assert [c.meta["number"] for c in env.reset(20, seed=2)] != [c.meta["number"] for c in a]
    assert {c.meta["number"] for c in a} <= set(range(1, 9))
    start = a[0]
    n = start.meta["number"]
    wrong = start.with_reply(str(n % 8 + 1))
    (step,) = env.step([wrong])
    assert not step.done and step.user_message in ("Higher.", "Lower.")
    (step,) = env.step([start.with_reply(f"It is {n}.")])
    assert step.done and step.reward == 1.0
    two_turns = wrong.with_reply(step.user_message or "Lower.", role="user").with_reply(str(n % 8 + 1))
    (step,) = env.step([two_turns])
    assert step.done  # the horizon


def test_halving_wins_every_game_in_four_turns():
    """Binary search over 1..8 (guess the middle, follow Higher/Lower) finds every number by turn 4."""
    user = ScriptedNumberUser(8)
    for secret in range(1, 9):
        conv, lo, hi = Conversation.from_prompt("play", meta={"number": secret}), 1, 8
        for _ in range(4):
            guess = (lo + hi) // 2
            conv = conv.with_reply(str(guess))
            reply = user.respond([conv])[0]
            if reply == "Correct!":
                break
            lo, hi = (guess + 1, hi) if reply == "Higher." else (lo, guess - 1)
            conv = conv.with_reply(reply, role="user")
        assert number_reward([conv]) == [1.0], secret


def test_with_hints_a_reply_without_a_number_is_told_the_number():
    assert answer("Can I have a hint?", secret=6, max_number=8, hints=True) == "Hint: my number is 6."
    assert answer("4", secret=6, max_number=8, hints=True) == "Higher."  # guesses play as before
    env = NumberEnv(horizon=3, max_number=8, hints=True)
    (start,) = env.reset(1, seed=0)
    assert "ask me for a hint" in start.messages[-1].content and "3 turns" in start.messages[-1].content
    n = start.meta["number"]
    (step,) = env.step([start.with_reply("A hint, please.")])
    assert not step.done and step.user_message == f"Hint: my number is {n}."


def test_with_hints_asking_first_wins_every_game_while_one_guess_wins_one_in_n():
    """The planning gap: the hint earns nothing on its turn and a sure win on the next; a first guess
    earns 1/N on its own turn, which is all a single-turn score sees."""
    user = ScriptedNumberUser(8, hints=True)
    asked, guessed = [], []
    for secret in range(1, 9):
        start = Conversation.from_prompt("play", meta={"number": secret})
        ask = start.with_reply("hint?")
        told = ask.with_reply(user.respond([ask])[0], role="user").with_reply(str(secret))
        asked.append(number_reward([ask])[0] + number_reward([told])[0])
        guessed.append(number_reward([start.with_reply("4")])[0])
    assert asked == [1.0] * 8
    assert sum(guessed) == 1.0
