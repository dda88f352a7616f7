"""Guess my secret: a hidden-information dialogue where asking good questions early pays off later.

The user holds a secret animal from ``CATALOG`` (in ``meta["secret"]``). Each assistant turn either
asks a yes/no question about one attribute or names one animal; a correct guess ends the game. The
reward (``secret_reward``) looks only at the end of the dialogue, so a question at turn 1 earns
nothing by itself: it pays when it makes a later guess right. Twenty-four animals need about
log2(24) = 4.6 well-chosen questions, so with a small horizon a policy must plan across turns,
which is what REFUEL's regression on the relative future is meant to learn.

``ScriptedSecretUser`` answers by keyword matching, deterministically, with no model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from rebelrl.envs.base import StepResult, UserEnv
from rebelrl.types import Conversation

ATTRIBUTES = ("mammal", "lives_in_water", "can_fly", "domestic", "size", "color")
SIZES = ("small", "medium", "large")
COLORS = ("black", "blue", "brown", "green", "grey", "orange", "red", "white", "yellow")

# name: (mammal, lives_in_water, can_fly, domestic, size, color); every row differs from every other,
# so any secret can be pinned down by questions alone.
_ROWS = {
    "bat": (True, False, True, False, "small", "black"),
    "bear": (True, False, False, False, "large", "brown"),
    "bee": (False, False, True, False, "small", "yellow"),
    "cat": (True, False, False, True, "small", "black"),
    "crocodile": (False, True, False, False, "large", "green"),
    "dog": (True, False, False, True, "medium", "brown"),
    "dolphin": (True, True, False, False, "medium", "grey"),
    "eagle": (False, False, True, False, "medium", "brown"),
    "elephant": (True, False, False, False, "large", "grey"),
    "frog": (False, True, False, False, "small", "green"),
    "goldfish": (False, True, False, True, "small", "orange"),
    "horse": (True, False, False, True, "large", "brown"),
    "lion": (True, False, False, False, "large", "yellow"),
    "mouse": (True, False, False, False, "small", "grey"),
    "octopus": (False, True, False, False, "medium", "red"),
    "parrot": (False, False, True, True, "small", "green"),
    "penguin": (False, True, False, False, "medium", "black"),
    "rabbit": (True, False, False, True, "small", "white"),
    "shark": (False, True, False, False, "large", "grey"),
    "sheep": (True, False, False, True, "medium", "white"),
    "snake": (False, False, False, False, "medium", "green"),
    "spider": (False, False, False, False, "small", "black"),
    "tiger": (True, False, False, False, "large", "orange"),
    "whale": (True, True, False, False, "large", "blue"),
}
CATALOG: dict[str, dict[str, bool | str]] = {name: dict(zip(ATTRIBUTES, row)) for name, row in _ROWS.items()}

_PLURALS = {"mouse": ("mice",), "octopus": ("octopuses", "octopi")}
# Every spelling that names an item, singular or plural: "Is it one of the mice?" guesses mouse.
_ITEM_FORMS = {
    form: name for name in CATALOG for form in (name, name + "s", name + "es", *_PLURALS.get(name, ()))
}

# Word -> (attribute, value). For yes/no attributes the value is the truth that makes the question
# true ("wild" asks "domestic? no"); for categorical ones it is the category asked about, or None for
# the attribute's own name ("what color is it?"). Words match whole and lower-cased.
KEYWORDS: dict[str, tuple[str, bool | str | None]] = {}


def _add(attribute: str, value: bool | str | None, words: str) -> None:
    for word in words.split():
        KEYWORDS[word] = (attribute, value)


_add("mammal", True, "mammal mammals mammalian")
_add("lives_in_water", True, "water aquatic marine underwater swim swims swimming swimmer")
_add("lives_in_water", True, "sea seas ocean oceans river rivers lake lakes pond ponds")
_add("lives_in_water", False, "land terrestrial")
_add("can_fly", True, "fly flies flying flight flier flyer fliers flyers airborne")
_add("can_fly", False, "flightless")
_add("domestic", True, "domestic domesticated pet pets tame farm farmyard livestock household")
_add("domestic", False, "wild")
_add("size", None, "size sized")
_add("size", "large", "large larger largest big bigger biggest huge giant enormous")
_add("size", "medium", "medium mid midsize midsized")
_add("size", "small", "small smaller smallest tiny")
_add("color", None, "color colors colour colours colored coloured")
_add("color", "grey", "gray")
_add("color", "yellow", "golden")
for _color in COLORS:
    _add("color", _color, _color)

# A categorical question with one of these words wants the value, not a yes/no ("what color is it?").
_OPEN_WORDS = {"what", "which", "how"}
_STATEMENTS = {  # attribute: (sentence when False, sentence when True)
    "mammal": ("It is not a mammal.", "It is a mammal."),
    "lives_in_water": ("It does not live in water.", "It lives in water."),
    "can_fly": ("It cannot fly.", "It can fly."),
    "domestic": ("It is wild.", "It is domestic."),
}
ATTRIBUTE_HELP = (
    "whether it is a mammal, whether it lives in water, whether it can fly, whether it is domestic "
    f"(a pet or farm animal) or wild, its size ({', '.join(SIZES)}) and its color ({', '.join(COLORS)})"
)
OFF_TOPIC_REPLY = f"I can only answer questions about its attributes: {ATTRIBUTE_HELP}. Or name the animal."


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def named_items(text: str) -> list[str]:
    """Catalog animals named in ``text``, sorted, each once (whole words, any case, singular or plural)."""
    return sorted({_ITEM_FORMS[w] for w in _words(text) if w in _ITEM_FORMS})


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def answer(message: str, secret: str) -> str:
    """What the scripted user says to ``message`` when its animal is ``secret``.

    Naming exactly one animal is a guess (even inside a question: "is it bigger than a cat?" guesses
    cat). Otherwise the words pick the attribute (see ``KEYWORDS``); negations are not parsed.

    >>> answer("Does it live in the sea?", "whale"), answer("What colour is it?", "whale")
    ('Yes.', 'It is blue.')
    >>> answer("Is it a tiny animal?", "whale"), answer("Is it a whale?", "whale")
    ('No.', 'Correct! It is a whale.')
    """
    guesses = named_items(message)
    if len(guesses) > 1:
        return "Please name only one animal per guess."
    if guesses:
        guess = guesses[0]
        return f"Correct! It is {_article(guess)}." if guess == secret else f"No, it is not {_article(guess)}."
    words = _words(message)
    asked: dict[str, set] = {}
    for w in words:
        if w in KEYWORDS:
            attribute, value = KEYWORDS[w]
            asked.setdefault(attribute, set()).add(value)
    if not asked:
        return OFF_TOPIC_REPLY
    if len(asked) > 1:
        return "Please ask about one attribute at a time."
    ((attribute, values),) = asked.items()
    truth = CATALOG[secret][attribute]
    if isinstance(truth, bool):
        if len(values) == 1:  # "is it wild?" and "is it a pet?" read the same attribute, opposite ways
            return "Yes." if truth == next(iter(values)) else "No."
        return _STATEMENTS[attribute][truth]  # "land or water?": both ways at once
    named = values - {None}
    if len(named) == 1 and not _OPEN_WORDS & set(words):
        return "Yes." if truth in named else "No."
    return f"It is {truth}."  # "what size?", "is it big or small?"


def _secret_of(conversation: Conversation, row: int | None = None) -> str:
    secret = conversation.meta.get("secret")
    if secret not in CATALOG:
        where = "a conversation" if row is None else f"conversation {row}"
        raise ValueError(f"{where}: meta['secret'] is {secret!r}, expected an animal of the secret catalog")
    return secret


class ScriptedSecretUser:
    """A ``UserSimulator`` that answers from ``meta["secret"]`` with ``answer``; no model, no randomness."""

    def respond(self, conversations: list[Conversation]) -> list[str]:
        return [answer(c.last_assistant, _secret_of(c, i)) for i, c in enumerate(conversations)]


def secret_reward(conversations: list[Conversation]) -> list[float]:
    """1.0 when the last assistant message names the secret and no other animal, else 0.0.

    The reward is terminal: earlier turns count only through the guess they lead to. Naming several
    animals in one message earns nothing, or listing the whole catalog would always win.

    >>> start = Conversation.from_prompt("Guess my animal.", meta={"secret": "mouse"})
    >>> secret_reward([start.with_reply("Is it one of the MICE?"), start.with_reply("A mouse or a cat?")])
    [1.0, 0.0]
    """
    return [float(named_items(c.last_assistant) == [_secret_of(c, i)]) for i, c in enumerate(conversations)]


def secret_guessed_at(conversation: Conversation) -> int | None:
    """The assistant turn (1-based, as h = 1..H in REFUEL) that first named the secret alone; None if none did."""
    secret = _secret_of(conversation)
    turns = [m.content for m in conversation.messages if m.role == "assistant"]
    return next((h for h, text in enumerate(turns, start=1) if named_items(text) == [secret]), None)


def secret_intro(items: Sequence[str], horizon: int) -> str:
    """The first user message: the rules, the candidate animals and the number of turns."""
    turns = "1 turn" if horizon == 1 else f"{horizon} turns"
    return (
        f"Let's play a guessing game. I am thinking of one of these animals: {', '.join(items)}. "
        f"You have {turns}. In each turn, either ask me one yes/no question about one of its attributes, "
        f"or guess by naming exactly one animal. I can tell you {ATTRIBUTE_HELP}. "
        "A correct guess wins and ends the game; a wrong guess uses up a turn. "
        "Name the animal by your last turn at the latest."
    )


class SecretEnv(UserEnv):
    """The guessing game as an ``Env``: ``ScriptedSecretUser`` behind a ``UserEnv``.

    ``reset(n, seed)`` draws each secret uniformly from ``items`` (default: the whole catalog) with
    ``random.Random``, seeded by both the constructor's ``seed`` and the reset seed, so the same pair
    gives the same secrets in any process. A dialogue ends at ``horizon`` assistant turns or at the
    first correct guess; each ending ``StepResult`` carries ``secret_reward`` as its reward.
    """

    def __init__(
        self,
        horizon: int = 5,
        seed: int = 0,
        items: Sequence[str] | None = None,
        system_prompt: str | None = None,
    ):
        self.items = sorted(CATALOG if items is None else set(items))
        unknown = [name for name in self.items if name not in CATALOG]
        if unknown or not self.items:
            raise ValueError(f"SecretEnv items must be a non-empty subset of {sorted(CATALOG)}; unknown: {unknown}")
        self.seed = seed
        self.system_prompt = system_prompt
        super().__init__(self._starts, ScriptedSecretUser(), horizon, stop=_solved, reward=secret_reward)

    def _starts(self, n: int, seed: int) -> list[Conversation]:
        rng = random.Random(f"secret/{self.seed}/{seed}")  # str seeds hash the same in every process
        text = secret_intro(self.items, self.horizon)
        secrets = [rng.choice(self.items) for _ in range(n)]
        return [Conversation.from_prompt(text, self.system_prompt, {"secret": secret}) for secret in secrets]

def _solved(conversation: Conversation) -> bool:
    return named_items(conversation.last_assistant) == [_secret_of(conversation)]
