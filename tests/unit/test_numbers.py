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


def test_rounds_hold_one_number_after_another_and_the_reward_counts_those_found():
    env = NumberEnv(horizon=4, max_number=8, hints=True, rounds=4)
    (start,) = env.reset(1, seed=3)
    numbers = start.meta["numbers"]
    assert len(numbers) == 4 and "think of a new one" in start.messages[-1].content
    conv = start
    for turn, reply in enumerate(["hint?", str(numbers[0]), "hint?", str(numbers[1])], start=1):
        conv = conv.with_reply(reply)
        assert number_reward([conv]) == [float(turn // 2)]
        (step,) = env.step([conv])
        if turn == 4:
            assert step.done and step.reward == 2.0  # the horizon
            break
        assert not step.done
        conv = conv.with_reply(step.user_message, role="user")
    users = [m.content for m in conv.messages if m.role == "user"][1:]
    assert users == [f"Hint: my number is {numbers[0]}.", "Correct! I am thinking of a new number from 1 to 8.", f"Hint: my number is {numbers[1]}."]
    # a guess of the found number no longer counts: only the current number can be found
    assert number_reward([start.with_reply(str(numbers[1]))]) == [float(numbers[1] == numbers[0])]
    (last,) = NumberEnv(horizon=4, max_number=8, rounds=2).step([Conversation.from_prompt("p", meta={"numbers": [3, 5]}).with_reply("3").with_reply("ok", role="user").with_reply("5")])
    assert last.done and last.user_message is None and last.reward == 2.0  # all numbers found ends the game
