"""Multi-turn envs: UserEnv validation and retries, the simulator loader, and the guess-my-secret task."""

import doctest

import pytest

from rebelrl.envs import secret
from rebelrl.envs.base import Env, EnvError, StepResult, UserEnv, UserSimulatorError, load_user_simulator
from rebelrl.envs.secret import (
    CATALOG,
    KEYWORDS,
    OFF_TOPIC_REPLY,
    ScriptedSecretUser,
    SecretEnv,
    answer,
    named_items,
    secret_guessed_at,
    secret_reward,
)
from rebelrl.types import Conversation

# ---- simulators addressed by import path in the loader tests --------------------------------------


class EchoUser:
    def __init__(self, prefix: str = "you said: "):
        self.prefix = prefix

    def respond(self, conversations):
        return [self.prefix + c.last_assistant for c in conversations]


def make_echo_user(prefix):
    return EchoUser(prefix)


ECHO = EchoUser()
NOT_A_USER = 3


class FlakyUser:
    """Returns "" for rows whose meta has ``bad`` on the first ``failures`` calls; records every batch."""

    def __init__(self, failures: int):
        self.failures = failures
        self.batches = []

    def respond(self, conversations):
        self.batches.append([c.meta["id"] for c in conversations])
        failing = len(self.batches) <= self.failures
        return ["" if failing and c.meta.get("bad") else "ok" for c in conversations]


def _starts(n=2, bad=(1,)):
    return [Conversation.from_prompt(f"hello {i}", meta={"id": i, "bad": i in bad}) for i in range(n)]


def _replied(conversations, text="hi"):
    return [c.with_reply(text) for c in conversations]


def _game(secret_name: str, *replies: str) -> Conversation:
    """A guessing-game transcript: the intro, then each reply followed by the scripted user's answer."""
    c = Conversation.from_prompt("Guess my animal.", meta={"secret": secret_name})
    for i, reply in enumerate(replies):
        c = c.with_reply(reply)
        if i < len(replies) - 1:
            c = c.with_reply(answer(reply, secret_name), role="user")
    return c


# ---- the scripted user ------------------------------------------------------------------------------


def test_catalog_is_solvable_and_keywords_never_name_an_item():
    rows = [tuple(attrs.values()) for attrs in CATALOG.values()]
    assert len(CATALOG) == 24 and len(set(rows)) == len(rows)  # questions alone can pin down every secret
    assert not [w for w in KEYWORDS if named_items(w)]


@pytest.mark.parametrize(
    "attribute,questions,yes_for,no_for",
    [
        ("mammal", ["Is it a mammal?", "IS IT MAMMALIAN", "One of the mammals?"], "whale", "shark"),
        ("water", ["Does it live in water?", "Can it swim?", "A sea creature?", "Is it aquatic?"], "shark", "lion"),
        ("land", ["Does it live on land?", "Is it terrestrial?"], "lion", "shark"),
        ("fly", ["Can it fly?", "Does it FLY", "Is it a flying animal?", "Is it airborne?"], "bee", "dog"),
        ("flightless", ["Is it flightless?"], "dog", "bee"),
        ("domestic", ["Is it a pet?", "Is it domesticated?", "Would I find it on a farm?"], "sheep", "tiger"),
        ("wild", ["Is it wild?", "Is it a wild animal?"], "tiger", "sheep"),
        ("large", ["Is it big?", "Is it large?", "A huge animal?", "Bigger than most?"], "elephant", "mouse"),
        ("small", ["Is it small?", "Is it tiny?"], "mouse", "elephant"),
        ("medium", ["Is it medium-sized?", "Is it of medium size?"], "dog", "elephant"),
        ("grey", ["Is it grey?", "Is it gray?", "Is its colour grey?", "Is it GREY in color?"], "elephant", "lion"),
        ("yellow", ["Is it yellow?", "Is it golden?"], "lion", "elephant"),
    ],
)
def test_scripted_user_answers_yes_no_questions(attribute, questions, yes_for, no_for):
    for q in questions:
        assert answer(q, yes_for) == "Yes.", (q, yes_for)
        assert answer(q, no_for) == "No.", (q, no_for)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_scripted_user_agrees_with_the_catalog_for_every_item(name):
    attrs = CATALOG[name]
    yes_no = {True: "Yes.", False: "No."}
    assert answer("Is it a mammal?", name) == yes_no[attrs["mammal"]]
    assert answer("Does it live in the ocean?", name) == yes_no[attrs["lives_in_water"]]
    assert answer("Can it fly?", name) == yes_no[attrs["can_fly"]]
    assert answer("Is it kept as a pet?", name) == yes_no[attrs["domestic"]]
    assert answer("Is it large?", name) == yes_no[attrs["size"] == "large"]
    assert answer("How big is it?", name) == f"It is {attrs['size']}."
    assert answer("What color is it?", name) == f"It is {attrs['color']}."


def test_scripted_user_open_and_ambiguous_questions():
    assert answer("What size is it?", "mouse") == "It is small."
    assert answer("Is it big or small?", "mouse") == "It is small."  # two values: say which
    assert answer("Which colour is it?", "whale") == "It is blue."
    assert answer("Does it live on land or in water?", "shark") == "It lives in water."
    assert answer("Is it a large mammal?", "whale") == "Please ask about one attribute at a time."


def test_scripted_user_recognises_guesses_and_off_topic_messages():
    assert answer("Is it an elephant?", "elephant") == "Correct! It is an elephant."
    assert answer("My guess: the ELEPHANT.", "elephant").startswith("Correct!")
    assert answer("Is it one of the mice?", "mouse").startswith("Correct!")
    assert answer("Is it a dog?", "elephant") == "No, it is not a dog."
    assert answer("Is it a dog or a cat?", "dog") == "Please name only one animal per guess."
    assert answer("Is it bigger than a cat?", "dog") == "No, it is not a cat."  # any named animal is a guess
    off = answer("What is your favourite food?", "dog")
    assert off == OFF_TOPIC_REPLY and off.startswith("I can only answer questions about its attributes: ")
    assert "mammal" in off and "color" in off


def test_scripted_user_answers_a_batch_and_names_a_row_without_a_secret():
    user = ScriptedSecretUser()
    games = [_game("bat", "Can it fly?"), _game("frog", "Can it fly?")]
    assert user.respond(games) == ["Yes.", "No."]
    broken = Conversation.from_prompt("hi").with_reply("Can it fly?")
    with pytest.raises(ValueError, match=r"conversation 1: meta\['secret'\] is None"):
        user.respond([games[0], broken])


# ---- reward and per-turn analysis ---------------------------------------------------------------------


def test_secret_reward_judges_only_the_last_assistant_message():
    games = [
        _game("mouse", "Is it a mammal?", "Is it the mouse?"),
        _game("mouse", "Is it a mammal?", "It must be one of the MICE."),  # plural, any case
        _game("mouse", "Is it a mouse?", "Is it small?"),  # named earlier, not at the end
        _game("mouse", "Is it a rabbit?"),
        _game("mouse", "Mouse, cat or dog?"),  # listing animals does not win
        _game("mouse", "Is it a mousetrap?"),  # whole words only
    ]
    assert secret_reward(games) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="conversation 0"):
        secret_reward([Conversation.from_prompt("hi").with_reply("a mouse")])


def test_secret_guessed_at_counts_assistant_turns_from_one():
    assert secret_guessed_at(_game("bat", "Can it fly?", "Is it a bat?")) == 2
    assert secret_guessed_at(_game("bat", "Is it a bee?", "Is it a bat?", "A bat!")) == 2
    assert secret_guessed_at(_game("bat", "Is it a bee?")) is None


def test_secret_doctests():
    assert doctest.testmod(secret).failed == 0


# ---- SecretEnv ----------------------------------------------------------------------------------------


def test_secret_env_reset_is_deterministic_under_a_seed():
    env = SecretEnv(horizon=4)
    assert isinstance(env, Env)
    first = env.reset(20, seed=7)
    secrets = [c.meta["secret"] for c in first]
    assert secrets == [c.meta["secret"] for c in SecretEnv(horizon=4).reset(20, seed=7)]
    assert secrets != [c.meta["secret"] for c in env.reset(20, seed=8)]
    assert secrets != [c.meta["secret"] for c in SecretEnv(horizon=4, seed=1).reset(20, seed=7)]
    assert all(s in CATALOG for s in secrets)
    intro = first[0].to_chat()
    assert [m["role"] for m in intro] == ["user"] and "4 turns" in intro[0]["content"]
    assert "whale" in intro[0]["content"] and "secret" not in intro[0]["content"].lower()


def test_secret_env_items_and_system_prompt():
    env = SecretEnv(horizon=2, items=["cat", "dog"], system_prompt="Play along.")
    starts = env.reset(10, seed=0)
    assert {c.meta["secret"] for c in starts} <= {"cat", "dog"}
    assert starts[0].messages[0].content == "Play along." and "cat, dog." in starts[0].first_user
    with pytest.raises(ValueError, match="unicorn"):
        SecretEnv(items=["cat", "unicorn"])


def test_secret_env_step_ends_at_the_horizon_or_a_correct_guess():
    env = SecretEnv(horizon=3, items=["bat"])
    (start,) = env.reset(1, seed=0)
    c = start.with_reply("Can it fly?")
    before = c.messages
    assert env.step([c]) == [StepResult("Yes.", False)]
    assert c.messages == before  # inputs are never mutated
    c = c.with_reply("Yes.", role="user").with_reply("Is it a bee?")
    assert env.step([c]) == [StepResult("No, it is not a bee.", False)]
    c = c.with_reply("No, it is not a bee.", role="user")
    assert env.step([c.with_reply("Is it small?")]) == [StepResult(None, True, 0.0)]  # turn 3 of 3
    assert env.step([c.with_reply("It is a bat.")]) == [StepResult(None, True, 1.0)]
    assert env.step([start.with_reply("A bat?")]) == [StepResult(None, True, 1.0)]  # solved at turn 1


# ---- UserEnv ------------------------------------------------------------------------------------------


def test_user_env_reset_cycles_a_shuffled_list_and_checks_start_functions():
    env = UserEnv(_starts(3), EchoUser(), horizon=2)
    ids = [c.meta["id"] for c in env.reset(6, seed=0)]
    assert sorted(ids[:3]) == [0, 1, 2] and ids[3:] == ids[:3]
    assert ids == [c.meta["id"] for c in env.reset(6, seed=0)]
    a, b = env.reset(4, seed=0)[0], env.reset(4, seed=0)[3]
    assert a.meta is not b.meta  # the same start drawn twice does not share its meta
    with pytest.raises(EnvError, match="UserEnv: start function returned 1 items for n=2"):
        UserEnv(lambda n, seed: _starts(1), EchoUser(), horizon=2).reset(2, seed=0)


def test_user_env_step_marks_done_exactly_at_the_horizon_and_skips_done_rows():
    user = FlakyUser(failures=0)
    env = UserEnv(_starts(2, bad=()), user, horizon=2)
    one_turn = _replied(env.reset(2, seed=0))
    assert [r.done for r in env.step(one_turn)] == [False, False]
    two_turns = [one_turn[0], _replied([one_turn[1].with_reply("ok", role="user")])[0]]
    results = env.step(two_turns)
    assert [r.done for r in results] == [False, True] and results[1].user_message is None
    assert user.batches[-1] == [two_turns[0].meta["id"]]  # the finished row was not sent to the user
    with pytest.raises(ValueError, match="conversation 0 must end with an assistant message"):
        env.step(env.reset(1, seed=0))


def test_user_env_retries_only_the_failing_rows():
    user = FlakyUser(failures=1)
    results = UserEnv(_starts(3), user, horizon=3).step(_replied(_starts(3)))
    assert [r.user_message for r in results] == ["ok", "ok", "ok"]
    assert user.batches == [[0, 1, 2], [1]]


def test_user_env_raises_naming_the_row_after_max_retries():
    user = FlakyUser(failures=10**6)
    env = UserEnv(_starts(3), user, horizon=3, max_retries=2)
    with pytest.raises(UserSimulatorError, match=r"returned '' for row 1 after 3 attempts"):
        env.step(_replied(_starts(3)))
    assert len(user.batches) == 3  # 1 + max_retries, never more


def test_user_env_on_failure_end_ends_the_dialogue():
    env = UserEnv(_starts(2), FlakyUser(failures=10**6), horizon=3, max_retries=1, on_failure="end")
    results = env.step(_replied(_starts(2)))
    assert results == [StepResult("ok", False), StepResult(None, True)]


@pytest.mark.parametrize(
    "output,message",
    [
        (["a", "b", "c"], "3 messages for a batch of 2"),
        ("just one string", "a str for a batch of 2"),
        (["fine", None], "returned None for row 1"),
        (["fine", 7], "returned 7 for row 1"),
        (["fine", "  \n"], r"returned '  \\n' for row 1"),
    ],
)
def test_user_env_rejects_malformed_simulator_output(output, message):
    class Broken:
        def respond(self, conversations):
            return output

    with pytest.raises(UserSimulatorError, match=message):
        UserEnv(_starts(2), Broken(), horizon=3, max_retries=0).step(_replied(_starts(2)))


def test_user_env_checks_its_arguments():
    with pytest.raises(ValueError, match="horizon"):
        UserEnv(_starts(), EchoUser(), horizon=0)
    with pytest.raises(ValueError, match="on_failure"):
        UserEnv(_starts(), EchoUser(), horizon=1, on_failure="skip")
    with pytest.raises(TypeError, match="respond"):
        UserEnv(_starts(), lambda cs: ["x"] * len(cs), horizon=1)


# ---- load_user_simulator ------------------------------------------------------------------------------


def test_load_user_simulator_builds_from_import_paths():
    assert load_user_simulator(f"{__name__}:ECHO") is ECHO
    assert isinstance(load_user_simulator(f"{__name__}:EchoUser"), EchoUser)  # a class is always built
    user = load_user_simulator(f"{__name__}:make_echo_user", {"prefix": "> "})
    assert user.respond(_replied(_starts(1), "hey")) == ["> hey"]
    assert isinstance(load_user_simulator("rebelrl.envs.secret:ScriptedSecretUser"), ScriptedSecretUser)


@pytest.mark.parametrize(
    "spec,kwargs,message",
    [
        ("no_colon_here", None, "expected an import path 'package.module:attr'"),
        ("rebelrl.no_such_module:User", None, "cannot import module 'rebelrl.no_such_module'"),
        (f"{__name__}:Missing", None, "has no attribute 'Missing'"),
        (f"{__name__}:NOT_A_USER", None, "int object has no respond"),
        (f"{__name__}:EchoUser", {"colour": "red"}, r"building it with kwargs \['colour'\] failed"),
        (f"{__name__}:NOT_A_USER", {"x": 1}, "is not callable"),
    ],
)
def test_load_user_simulator_errors_name_the_spec(spec, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        load_user_simulator(spec, kwargs)
    assert f"user simulator {spec!r}" in str(err.value)


# ---- a user's own Env, checked where its results enter the library ------------------------------------


class ScriptedEnv:
    """Answers "ok" to every conversation, except that ``bad(i, call)`` can spoil the answers."""

    horizon = 3

    def __init__(self, spoil=None):
        self.spoil = spoil or (lambda results, call: results)
        self.calls = 0

    def reset(self, n, seed):
        return _starts(n, bad=())

    def step(self, conversations):
        self.calls += 1
        return self.spoil([StepResult("ok", False) for _ in conversations], self.calls)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda rs, call: rs[:-1], "env my:Env: step returned 2 results for a batch of 3 for row 0 (and 2 more rows) after 3 attempts"),
        (lambda rs, call: [*rs[:-1], StepResult("", False)], "env my:Env: step returned user_message='' with done=False for row 2 after 3 attempts"),
        (lambda rs, call: [*rs[:-1], StepResult(None, False)], "user_message=None with done=False for row 2"),
        (lambda rs, call: [*rs[:-1], ("ok", False)], "returned ('ok', False) (tuple) for row 2"),
        (lambda rs, call: "ok", "returned a str for a batch of 3"),
    ],
)
def test_checked_step_names_the_env_and_what_it_returned(spoil, message):
    from rebelrl.envs.base import EnvError, checked_step

    env = ScriptedEnv(spoil)
    with pytest.raises(EnvError) as err:
        checked_step(env, _replied(_starts(3)), "my:Env")
    assert message in str(err.value)
    assert env.calls == 3  # asked once, then twice more, like UserEnv's user


def test_checked_step_retries_only_the_bad_rows_and_accepts_done_without_a_message():
    from rebelrl.envs.base import checked_step

    asked = []

    class Env(ScriptedEnv):
        def step(self, conversations):
            asked.append([c.meta["id"] for c in conversations])
            return [StepResult("", False) if c.meta["id"] == 1 and len(asked) == 1 else StepResult(None, True) if c.meta["id"] == 2 else StepResult("ok", False) for c in conversations]

    results = checked_step(Env(), _replied(_starts(3)), "e")
    assert results == [StepResult("ok", False), StepResult("ok", False), StepResult(None, True)]
    assert asked == [[0, 1, 2], [1]]


@pytest.mark.parametrize(
    "reset, message",
    [
        (lambda n: _starts(n - 1), "env e: reset(4, seed=0) returned 3 conversations; expected 4 Conversations"),
        (lambda n: [*_starts(n - 1), "hi"], "returned str for row 3; expected a Conversation"),
        (lambda n: [*_starts(n - 1), _replied(_starts(1))[0]], "row 3: a dialogue must open with a non-empty user message last"),
    ],
)
def test_checked_reset_names_the_env_and_the_row(reset, message):
    from rebelrl.envs.base import CheckedEnv, EnvError

    env = ScriptedEnv()
    env.reset = lambda n, seed: reset(n)
    with pytest.raises(EnvError) as err:
        CheckedEnv(env, "e").reset(4, seed=0)
    assert message in str(err.value)
