"""OpenEnv environments as rebelrl dialogues (``task.name=openenv``).

An OpenEnv ``Environment`` is stateful (``reset(seed)`` -> observation, ``step(action)`` ->
observation with ``reward`` and ``done``); a rebelrl ``Env`` answers transcripts passed by value, so
that REFUEL can branch a dialogue at any turn. The adapter joins them: each dialogue is one episode
of its own environment instance, seeded from the dialogue's row; the first observation is the first
user message, each assistant reply becomes an action (its text in ``task.action_field``), and the
observation's text (``task.observation_field``) the next user message. The reward of a dialogue is
the sum of the rewards the environment gave along it (``openenv_reward``, the task's reward).

The instance that played a transcript is kept, keyed by the transcript. A second continuation of
the same transcript (a branch) gets a deep copy of it where the environment can be copied; where it
cannot, the earlier turns are replayed in a fresh instance with the same seed, and a replay whose
observations differ from the transcript's is refused: the environment is not a function of its seed
and its actions, and no branch of it can be trusted.

The environment is a class (``module:Class``, built with ``task.env_kwargs``) run in this process, or
the URL of one served on loopback (``http://127.0.0.1:8000``, through OpenEnv's generic client, one
connection an episode).
"""

from __future__ import annotations

import copy
import typing
from collections import OrderedDict
from typing import Any

from rebelrl.config import ConfigError
from rebelrl.envs.base import EnvError, StepResult, count_assistant_turns
from rebelrl.types import Conversation

SEED_KEY = "openenv_seed"
_KEPT = 4096  # live instances kept for branching; older ones are closed (a later branch replays)


class OpenEnvError(EnvError):
    pass


class _InProcess:
    """One episode of an in-process ``Environment``."""

    def __init__(self, cls, kwargs: dict, action_cls, action_field: str):
        self.env, self.action_cls, self.action_field = cls(**kwargs), action_cls, action_field

    def reset(self, seed: int):
        return _outcome(self.env.reset(seed=seed))

    def step(self, text: str):
        return _outcome(self.env.step(self.action_cls(**{self.action_field: text})))

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if callable(close):
            close()


class _Served:
    """One episode of a served environment: its own connection."""

    def __init__(self, url: str, action_field: str):
        from openenv import GenericAction, GenericEnvClient

        self.client, self.action, self.action_field = GenericEnvClient(base_url=url).sync(), GenericAction, action_field
        self.client.connect()

    def reset(self, seed: int):
        result = self.client.reset(seed=seed)
        return result.observation, result.reward, result.done

    def step(self, text: str):
        result = self.client.step(self.action(**{self.action_field: text}))
        return result.observation, result.reward, result.done

    def close(self) -> None:
        self.client.close()

    def __deepcopy__(self, memo):  # a connection's session cannot be copied: branches replay
        raise TypeError("a served episode cannot be copied")


def _outcome(observation) -> tuple[Any, float | None, bool]:
    return observation, getattr(observation, "reward", None), bool(getattr(observation, "done", False))


class OpenEnvAdapter:
    """An OpenEnv environment as a rebelrl ``Env`` of horizon ``horizon``, and its reward (``reward``)."""

    def __init__(self, spec: str, horizon: int, kwargs: dict | None = None, action_field: str = "message",
                 observation_field: str | None = None, action_cls: str | None = None):
        self.spec, self.horizon, self.observation_field = spec, horizon, observation_field
        if spec.startswith(("http://", "https://", "ws://", "wss://")):
            if kwargs:
                raise ConfigError("task.env_kwargs: a served OpenEnv environment is built by its server; the kwargs would be ignored")
            self._open = lambda: _Served(spec, action_field)
        else:
            from rebelrl.imports import import_object

            cls = import_object(spec, "env")
            action = import_object(action_cls, "env") if action_cls else _action_class(cls, spec)
            if action_field not in getattr(action, "model_fields", {}):
                fields = ", ".join(f for f in getattr(action, "model_fields", {}) if f != "metadata")
                raise ConfigError(f"task.action_field={action_field!r}: {action.__name__}, the action of {spec}, has no such field (it has {fields})")
            self._open = lambda: _InProcess(cls, dict(kwargs or {}), action, action_field)
        self._live: OrderedDict[tuple, tuple[Any, float]] = OrderedDict()  # transcript -> (episode at its end, reward so far)
        self._rewards: OrderedDict[tuple, float] = OrderedDict()  # transcript ending with a reply -> the rewards the environment gave along it

    # --- the Env protocol ---------------------------------------------------------------------------

    def reset(self, n: int, seed: int) -> list[Conversation]:
        out = []
        for i in range(n):
            episode_seed = (seed * 1_000_003 + i) % 2**31  # one seed a dialogue; sets drawn with other seeds do not meet
            episode = self._open()
            observation, reward, done = episode.reset(episode_seed)
            conversation = Conversation.from_prompt(self._text(observation, f"reset(seed={episode_seed})"), meta={SEED_KEY: episode_seed})
            episode.close()  # the first step replays the reset: thousands of openings hold no instances (or connections)
            if done:
                raise OpenEnvError(f"openenv {self.spec}: reset(seed={episode_seed}) ended the episode before the first reply")
            out.append(conversation)
        return out

    def step(self, conversations: list[Conversation]) -> list[StepResult]:
        results = []
        for c in conversations:
            episode, total = self._take(Conversation(c.messages[:-1], c.meta))
            observation, reward, done = episode.step(c.messages[-1].content)
            total += float(reward or 0.0)
            self._record(c, total)
            done = done or count_assistant_turns(c) >= self.horizon
            if done:
                episode.close()
                results.append(StepResult(None, True, total))
                continue
            text = self._text(observation, f"step {count_assistant_turns(c)} of the dialogue seeded {c.meta.get(SEED_KEY)}")
            self._keep(c.with_reply(text, role="user"), episode, total)
            results.append(StepResult(text, False))
        return results

    def reward(self, conversations: list[Conversation]) -> list[float]:
        """The rewards the environment gave along each dialogue (one that ends with a reply), summed."""
        out = []
        for c in conversations:
            if _key(c) not in self._rewards:  # not played in this process (a dialogue cut at an earlier turn is)
                self._replay(c, with_last_reply=True)
            out.append(self._rewards[_key(c)])
        return out

    # --- branching ----------------------------------------------------------------------------------

    def _record(self, conversation: Conversation, total: float) -> None:
        self._rewards[_key(conversation)] = total
        self._rewards.move_to_end(_key(conversation))
        while len(self._rewards) > 16 * _KEPT:  # a reward no longer kept is found again by a replay
            self._rewards.popitem(last=False)

    def _keep(self, conversation: Conversation, episode, total: float) -> None:
        self._live[_key(conversation)] = (episode, total)
        self._live.move_to_end(_key(conversation))
        while len(self._live) > _KEPT:
            _, (old, _) = self._live.popitem(last=False)
            old.close()

    def _take(self, prefix: Conversation):
        """An episode at the end of ``prefix`` (which ends with a user message), for one more step."""
        kept = self._live.get(_key(prefix))
        if kept is not None:
            episode, total = kept
            try:
                return copy.deepcopy(episode), total  # the kept one stays for other branches
            except Exception:  # not copyable: this branch takes it; a later one replays
                del self._live[_key(prefix)]
                return episode, total
        return self._replay(prefix, with_last_reply=False)

    def _replay(self, conversation: Conversation, with_last_reply: bool):
        """A fresh episode played through the transcript's replies, its observations checked against
        the transcript's user messages; with ``with_last_reply`` the last reply is played too (and its
        episode closed). Returns (episode, reward so far)."""
        seed = conversation.meta.get(SEED_KEY)
        if not isinstance(seed, int):
            raise OpenEnvError(f"openenv {self.spec}: a dialogue without meta[{SEED_KEY!r}] cannot be replayed: it did not come from this task's reset")
        episode = self._open()
        observation, reward, _ = episode.reset(seed)
        total, turn = float(reward or 0.0), 0
        messages = [m for m in conversation.messages if m.role in ("user", "assistant")]
        self._check(observation, messages[0].content, seed, 0)
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            turn += 1
            last = i == len(messages) - 1
            observation, reward, done = episode.step(m.content)
            total += float(reward or 0.0)
            if last:
                self._record(conversation, total)
                episode.close()
                return None, total
            self._check(observation, messages[i + 1].content, seed, turn)
        return episode, total

    def _check(self, observation, expected: str, seed: int, turn: int) -> None:
        got = self._text(observation, f"the replay of the dialogue seeded {seed}")
        if got != expected:
            where = "reset" if turn == 0 else f"turn {turn}"
            raise OpenEnvError(
                f"openenv {self.spec}: replaying the dialogue seeded {seed} gave {got[:60]!r} at {where} where the dialogue has "
                f"{expected[:60]!r}: the environment is not a function of its seed and the replies, so its dialogues cannot be "
                "branched (REFUEL) or scored again; make reset(seed=...) seed every random choice, or make it copyable")

    def _text(self, observation, where: str) -> str:
        """The user message an observation carries: ``task.observation_field``, or its only text field."""
        data = observation if isinstance(observation, dict) else (observation.model_dump() if hasattr(observation, "model_dump") else vars(observation))
        if self.observation_field is not None:
            if self.observation_field not in data:
                raise OpenEnvError(f"openenv {self.spec}: {where}: the observation has no field {self.observation_field!r} "
                                   f"(task.observation_field); it has {', '.join(sorted(data))}")
            text = data[self.observation_field]
        else:
            texts = [k for k, v in data.items() if isinstance(v, str) and k != "metadata"]
            if len(texts) != 1:
                raise OpenEnvError(f"openenv {self.spec}: {where}: the observation has {len(texts)} text fields ({', '.join(texts) or 'none'}); "
                                   "name the one that is the user's message with task.observation_field")
            text = data[texts[0]]
        if not isinstance(text, str) or not text.strip():
            raise OpenEnvError(f"openenv {self.spec}: {where}: the observation's {self.observation_field or 'text'} is {text!r}, "
                               "expected the non-empty text of the next user message")
        return text


def _key(conversation: Conversation) -> tuple:
    return (conversation.meta.get(SEED_KEY), tuple((m.role, m.content) for m in conversation.messages))


def _action_class(cls, spec: str):
    """The action type an ``Environment[Action, Observation, State]`` subclass declares."""
    for klass in getattr(cls, "__mro__", ()):
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type):
                return args[0]
    raise ConfigError(f"task.env={spec!r}: the environment does not declare its action type (Environment[MyAction, ...]); "
                      "name it with task.action_class=module:MyAction")

