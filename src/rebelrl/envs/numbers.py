"""Guess my number: the user holds a number in 1..N and answers each guess with "Higher." or "Lower.".

The reward (``number_reward``) is 1 only if the dialogue's last reply guesses the number, so a guess
is worth what it teaches about the later ones: with N = 8 and four turns, halving the range each
turn (4, then 2 or 6, ...) always wins, while a guess that ignores the answers rarely does. A
single-turn method that scores each reply on its own turn sees every first guess as a 1-in-N shot
and cannot learn the halving; REFUEL, scoring the future of each guess, can. Small models name
numbers readily, which makes this the cheaper of the two planning tasks to learn on a CPU.

With ``hints=True`` the player may also ask for a hint instead of guessing: a reply with no number
in it is answered with the number itself ("Hint: my number is 6."). Asking scores nothing on its
turn, while a guess is right one time in N, so a method that judges each reply on its own turn
learns to guess; the hint pays one turn later, when repeating the number wins every game. This is
the planning gap in its plainest form: a question whose value lies entirely in the future, and an
action a 135M-parameter model can learn on a CPU (repeating a number it was just told).

``ScriptedNumberUser`` reads the last integer of each reply, deterministically, with no model.
"""

from __future__ import annotations

import random
import re

from rebelrl.envs.base import UserEnv
from rebelrl.types import Conversation

_INTEGER = re.compile(r"-?\d+")


def guessed_number(text: str) -> int | None:
    """The last integer in a reply ("I guess 4." -> 4; "Is it 3 or 5?" -> 5), None if there is none."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def number_intro(max_number: int, horizon: int, hints: bool = False, rounds: int = 1) -> str:
    if hints:
        turns = "1 turn" if horizon == 1 else f"{horizon} turns"
        rules = "In each turn, either guess the number or ask me for a hint."
    else:
        turns = "1 guess" if horizon == 1 else f"{horizon} guesses"
        rules = "Each time, guess one number; I will answer Higher, Lower or Correct."
    if rounds > 1:
        rules += " Each time you find my number, you score a point and I think of a new one."
    return (
        f"Let's play a game. I am thinking of a whole number from 1 to {max_number}. You have {turns}. "
        f"{rules} Reply with your guess."
    )


def answer(text: str, secret: int, max_number: int, hints: bool = False) -> str:
    """The user's reply to ``text``: Higher/Lower/Correct for a guess; for a reply with no number, the
    number itself when ``hints`` (any such reply counts as asking), else a request to guess."""
    guess = guessed_number(text)
    if guess is None:
        if hints:
            return f"Hint: my number is {secret}."
        return f"Please guess one whole number from 1 to {max_number}."
    if guess == secret:
        return "Correct!"
    return "Higher." if secret > guess else "Lower."


def secret_numbers(conversation: Conversation) -> list[int]:
    """The numbers the user holds, in order: ``meta["numbers"]``, or ``[meta["number"]]`` for one round."""
    meta = conversation.meta
    return list(meta["numbers"]) if "numbers" in meta else [meta["number"]]


def numbers_found(conversation: Conversation) -> int:
    """How many of the user's numbers the assistant found: each reply that guesses the current number
    finds it, and the next one becomes current."""
    numbers, found = secret_numbers(conversation), 0
    for message in conversation.messages:
        if message.role == "assistant" and found < len(numbers) and guessed_number(message.content) == numbers[found]:
            found += 1
    return found


class ScriptedNumberUser:
    """``UserSimulator`` that holds the numbers of ``secret_numbers`` and answers each guess about the
    current one; after a find that leaves more, it says so and moves to the next."""

    def __init__(self, max_number: int, hints: bool = False):
        self.max_number = max_number
        self.hints = hints

    def respond(self, conversations: list[Conversation]) -> list[str]:
        return [self._respond(c) for c in conversations]

    def _respond(self, conversation: Conversation) -> str:
        numbers, found = secret_numbers(conversation), numbers_found(conversation)
        if found and guessed_number(conversation.last_assistant) == numbers[found - 1]:  # this reply found one
            if found == len(numbers):
                return "Correct!"
            return f"Correct! I am thinking of a new number from 1 to {self.max_number}."
        return answer(conversation.last_assistant, numbers[found], self.max_number, self.hints)


def number_reward(conversations: list[Conversation]) -> list[float]:
    """The numbers found (``numbers_found``): with one round, 1.0 if the dialogue guessed the number, else 0.0."""
    return [float(numbers_found(c)) for c in conversations]


class NumberEnv(UserEnv):
    """The game as an ``Env``: ends at ``horizon`` replies or when all ``rounds`` numbers are found.

    ``rounds`` > 1 holds that many numbers, one after another (``meta["numbers"]``); the reward counts
    the numbers found, so a policy that finds one every two turns scores about h/2 by turn h.
    """

    def __init__(
        self,
        horizon: int = 4,
        max_number: int = 8,
        seed: int = 0,
        system_prompt: str | None = None,
        hints: bool = False,
        rounds: int = 1,
    ):
        if max_number < 2:
            raise ValueError(f"max_number must be >= 2, got {max_number}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.max_number = max_number
        self.seed = seed
        self.system_prompt = system_prompt
        self.hints = hints
        self.rounds = rounds
        super().__init__(self._starts, ScriptedNumberUser(max_number, hints), horizon, stop=_solved, reward=number_reward)

    def _starts(self, n: int, seed: int) -> list[Conversation]:
        rng = random.Random(f"number/{self.seed}/{seed}")  # str seeds hash the same in every process
        text = number_intro(self.max_number, self.horizon, self.hints, self.rounds)
        starts = []
        for _ in range(n):
            numbers = [rng.randint(1, self.max_number) for _ in range(self.rounds)]
            meta = {"number": numbers[0]} if self.rounds == 1 else {"numbers": numbers}
            starts.append(Conversation.from_prompt(text, self.system_prompt, meta))
        return starts


def _solved(conversation: Conversation) -> bool:
    return numbers_found(conversation) == len(secret_numbers(conversation))
