"""Multi-turn environments: the ``Env`` and ``UserSimulator`` protocols and ``UserEnv``, which joins them.

A dialogue alternates policy (assistant) and user turns. The policy side lives in ``rollout/``; an
environment only says how a dialogue starts (``reset``) and what the user says next (``step``).
Everything is batched, because an LM-backed user generates for the whole batch in one call, and
in-process: conversations are immutable values passed and returned, never files or pickles.

A dialogue of horizon ``H`` has at most ``H`` assistant turns (REFUEL, Gao et al. 2025, uses H=5).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from rebelrl.errors import UserError
from rebelrl.imports import SpecError, build_object, call_user_code, import_object
from rebelrl.types import Conversation

StartFn = Callable[[int, int], list[Conversation]]  # (n, seed) -> n starting conversations
StopFn = Callable[[Conversation], bool]  # the task is over before the horizon (e.g. solved)
ScoreFn = Callable[[list[Conversation]], list[float]]  # a reward function, see rebelrl.rewards

ON_FAILURE = ("raise", "end")


@dataclass(frozen=True)
class StepResult:
    """The user's answer to one conversation. ``user_message`` is None exactly when ``done``."""

    user_message: str | None
    done: bool
    reward: float | None = None  # terminal reward when the env knows it; None: a reward function judges later


@runtime_checkable
class UserSimulator(Protocol):
    """Plays the user: the next user message for each transcript (each ends with an assistant message)."""

    def respond(self, conversations: list[Conversation]) -> list[str]: ...


@runtime_checkable
class Env(Protocol):
    """Where dialogues start and how the user answers.

    ``reset(n, seed)`` gives ``n`` starting conversations (optional system message and the first user
    message; hidden task data in ``meta``), the same ones for the same seed. ``step`` takes
    conversations that end with the assistant's latest reply and returns one ``StepResult`` each,
    without mutating them.
    """

    horizon: int  # H: the most assistant turns a dialogue may have

    def reset(self, n: int, seed: int) -> list[Conversation]: ...

    def step(self, conversations: list[Conversation]) -> list[StepResult]: ...


class EnvError(UserError, RuntimeError):
    """An environment returned something the library cannot use (wrong count, wrong type, no message)."""


class UserSimulatorError(EnvError):
    """A user simulator kept returning unusable messages (wrong count, not a string, or blank)."""


def ask_rows(
    ask: Callable[[list[int]], Any], n: int, row_problem: Callable[[Any], str | None], max_retries: int, noun: str = "results"
) -> tuple[list[Any], dict[int, str]]:
    """Ask for ``n`` rows, then again for the unusable ones alone, at most ``max_retries`` more times.

    ``ask(rows)`` returns one answer per row asked; an answer that is not a list of that length
    spoils every row asked, and ``row_problem(answer)`` says what is wrong with one row's answer
    (None: usable). Returns the answers (None where unusable) and ``{row: problem}`` for the rows that
    stayed unusable after every attempt.
    """
    answers: list[Any] = [None] * n
    pending = list(range(n))
    problems: dict[int, str] = {}
    for _ in range(1 + max_retries):
        if not pending:
            break
        out = ask(pending)
        is_list = isinstance(out, Sequence) and not isinstance(out, (str, bytes))
        if not is_list or len(out) != len(pending):
            got = f"{len(out)} {noun}" if is_list else f"a {type(out).__name__}"
            problems = {i: f"{got} for a batch of {len(pending)}" for i in pending}
            continue
        problems = {}
        for i, answer in zip(pending, out):
            problem = row_problem(answer)
            if problem is None:
                answers[i] = answer
            else:
                problems[i] = problem
        pending = [i for i in pending if i in problems]
    return answers, problems


def _failure(who: str, problems: dict[int, str], attempts: int, expected: str) -> str:
    row = min(problems)
    others = f" (and {len(problems) - 1} more rows)" if len(problems) > 1 else ""
    return f"{who} returned {problems[row]} for row {row}{others} after {attempts} attempts; expected {expected}"


def _step_problem(result: Any) -> str | None:
    if not isinstance(result, StepResult):
        return f"{result!r} ({type(result).__name__})"
    if not result.done and not (isinstance(result.user_message, str) and result.user_message.strip()):
        return f"user_message={result.user_message!r} with done=False"
    return None


def checked_step(env: Env, conversations: list[Conversation], name: str, max_retries: int = 2) -> list[StepResult]:
    """``env.step(conversations)``, checked where its results enter the library.

    Every dialogue needs one ``StepResult``: done, or a non-empty user message. Unusable rows are
    asked again, alone, up to ``max_retries`` more times (the policy ``UserEnv`` applies to its user),
    then ``EnvError`` names the env, the row and what came back: a result too few would otherwise
    be dropped by a ``zip`` and leave two assistant turns back to back.
    """
    def step(rows):
        return call_user_code(env.step, f"env {name}", f"answering {len(rows)} dialogues (step)", [conversations[i] for i in rows])

    results, problems = ask_rows(step, len(conversations), _step_problem, max_retries)
    if problems:
        expected = "one StepResult per conversation, with a non-empty user_message unless done"
        raise EnvError(_failure(f"env {name}: step", problems, 1 + max_retries, expected))
    return results


def checked_reset(env: Env, n: int, seed: int, name: str) -> list[Conversation]:
    """``env.reset(n, seed)``, checked: ``n`` conversations, each ending with a non-empty user message."""
    out = call_user_code(env.reset, f"env {name}", f"opening dialogues (reset({n}, seed={seed}))", n, seed)
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or len(out) != n:
        got = f"{len(out)} conversations" if isinstance(out, Sequence) else f"a {type(out).__name__}"
        raise EnvError(f"env {name}: reset({n}, seed={seed}) returned {got}; expected {n} Conversations")
    for i, c in enumerate(out):
        if not isinstance(c, Conversation):
            raise EnvError(f"env {name}: reset({n}, seed={seed}) returned {type(c).__name__} for row {i}; expected a Conversation")
        if not c.messages or c.messages[-1].role != "user" or not c.messages[-1].content.strip():
            raise EnvError(f"env {name}: reset({n}, seed={seed}), row {i}: a dialogue must open with a non-empty user message last")
    return list(out)


class CheckedEnv:
    """An ``Env`` whose results are checked (``checked_reset``, ``checked_step``) before any use."""

    def __init__(self, env: Env, name: str, max_retries: int = 2):
        self.env, self.name, self.max_retries = env, name, max_retries

    @property
    def horizon(self) -> int:
        return self.env.horizon

    def reset(self, n: int, seed: int) -> list[Conversation]:
        return checked_reset(self.env, n, seed, self.name)

    def step(self, conversations: list[Conversation]) -> list[StepResult]:
        return checked_step(self.env, conversations, self.name, self.max_retries)

    def __getattr__(self, attr: str) -> Any:  # anything else the task's own code reads
        if attr in ("env", "name", "max_retries") or attr.startswith("__"):
            raise AttributeError(attr)  # not yet set (a copy being built): no recursion through self.env
        return getattr(self.env, attr)


def count_assistant_turns(conversation: Conversation) -> int:
    return sum(m.role == "assistant" for m in conversation.messages)


class UserEnv:
    """An ``Env`` from starting conversations, a ``UserSimulator`` and a horizon.

    ``starts`` is a list of conversations (``reset`` shuffles it with the seed and cycles, so every
    start is used once before any is used twice) or a function ``(n, seed) -> list[Conversation]``.
    A dialogue is done once it has ``horizon`` assistant turns, or earlier when ``stop`` says so.
    ``reward``, when given, scores each dialogue as it ends and fills ``StepResult.reward``.

    The simulator's output is checked row by row. Rows with a bad reply (wrong count, not a string,
    empty or blank) are asked again, alone, up to ``max_retries`` more times; then
    ``on_failure="raise"`` raises ``UserSimulatorError`` naming the row and what came back, and
    ``on_failure="end"`` ends that dialogue (done=True) so one bad row does not stop a whole run.
    Exceptions raised by the simulator itself are not retried: they propagate as they are.
    """

    def __init__(
        self,
        starts: Sequence[Conversation] | StartFn,
        user: UserSimulator,
        horizon: int,
        *,
        stop: StopFn | None = None,
        reward: ScoreFn | None = None,
        max_retries: int = 2,
        on_failure: str = "raise",
    ):
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        if not callable(starts):
            starts = list(starts)
            if not starts:
                raise ValueError("UserEnv needs at least one starting conversation")
        if not callable(getattr(user, "respond", None)):
            raise TypeError(f"user simulator {user!r} has no respond(conversations) method")
        self.starts = starts
        self.user = user
        self.horizon = horizon
        self.stop = stop
        self.reward = reward
        self.max_retries = max_retries
        self.on_failure = on_failure

    def reset(self, n: int, seed: int) -> list[Conversation]:
        if n < 0:
            raise ValueError(f"reset needs n >= 0, got {n}")
        if callable(self.starts):
            out = list(self.starts(n, seed))
            if len(out) != n or not all(isinstance(c, Conversation) for c in out):
                raise EnvError(f"UserEnv: start function returned {len(out)} items for n={n}, expected {n} Conversations")
        else:
            order = list(range(len(self.starts)))
            random.Random(seed).shuffle(order)
            out = [self.starts[order[i % len(order)]] for i in range(n)]
        # Fresh meta dicts: the same start drawn twice must not share mutable task data.
        return [replace(c, meta=dict(c.meta)) for c in out]

    def step(self, conversations: list[Conversation]) -> list[StepResult]:
        for i, c in enumerate(conversations):
            if not c.messages or c.messages[-1].role != "assistant":
                raise ValueError(f"step: conversation {i} must end with an assistant message")
        ended = [
            count_assistant_turns(c) >= self.horizon
            or (self.stop is not None and bool(call_user_code(self.stop, f"UserEnv stop function {self.stop!r}", f"checking dialogue {i}", c)))
            for i, c in enumerate(conversations)
        ]
        open_rows = [i for i, e in enumerate(ended) if not e]
        replies = self._ask([conversations[i] for i in open_rows])
        messages: list[str | None] = [None] * len(conversations)
        for i, reply in zip(open_rows, replies):
            messages[i] = reply
            ended[i] = reply is None  # only with on_failure="end"
        rewards: list[float | None] = [None] * len(conversations)
        done_rows = [i for i, e in enumerate(ended) if e]
        if self.reward is not None and done_rows:
            scores = call_user_code(self.reward, f"UserEnv reward {self.reward!r}", f"scoring {len(done_rows)} ended dialogues",
                                    [conversations[i] for i in done_rows])
            for i, r in zip(done_rows, scores):
                rewards[i] = float(r)
        return [StepResult(m, e, r) for m, e, r in zip(messages, ended, rewards)]

    def _ask(self, conversations: list[Conversation]) -> list[str | None]:
        """One reply per conversation; None for rows that failed every attempt (``on_failure="end"``)."""
        who = f"user simulator {type(self.user).__name__}"
        replies, problems = ask_rows(
            lambda rows: call_user_code(self.user.respond, who, f"answering {len(rows)} dialogues", [conversations[i] for i in rows]),
            len(conversations),
            lambda reply: None if isinstance(reply, str) and reply.strip() else repr(reply),
            self.max_retries,
            noun="messages",
        )
        if problems and self.on_failure == "raise":
            raise UserSimulatorError(_failure(who, problems, 1 + self.max_retries, "a non-empty string per conversation"))
        return replies


def load_user_simulator(spec: str, kwargs: dict | None = None) -> UserSimulator:
    """Build the user simulator named by ``spec`` (``"package.module:attr"``).

    Like ``rebelrl.rewards.load_reward``: with non-empty ``kwargs`` the object is a factory called as
    ``obj(**kwargs)``; a class is always instantiated; otherwise the object is the simulator itself.
    Whatever comes out must have a ``respond`` method.
    """
    obj = build_object(import_object(spec, "user simulator"), spec, "user simulator", kwargs)
    if not callable(getattr(obj, "respond", None)):
        raise SpecError(f"user simulator {spec!r}: {type(obj).__name__} object has no respond(conversations) method")
    return obj
