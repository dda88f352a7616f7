"""Built-in single-turn tasks: training prompts, held-out prompts and the reward that judges them."""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from collections.abc import Callable
from functools import partial
from pathlib import Path

from rebelrl.config import ConfigError
from rebelrl.types import Conversation

# Split seed is fixed, not the run seed: every run of a task must be judged on the same held-out prompts.
_SPLIT_SEED = 20240521

CHITCHAT_SYSTEM = "You are a friendly conversational partner. Reply to the user in one or two short sentences."


@dataclass
class Task:
    name: str
    train: list[Conversation]
    eval: list[Conversation]
    # default reward: a spec (built-in name or module:function), or the function itself (an OpenEnv environment's
    # rewards); None: the user must name one
    reward: str | Callable | None
    env: object | None = None  # multi-turn tasks: the Env whose user answers each assistant turn
    # Where each prompt came from ("data.jsonl, line 3"), when it came from a file: errors name it.
    train_rows: list[str] = field(default_factory=list)
    eval_rows: list[str] = field(default_factory=list)
    # Offline data, row for row with train / eval: PreferencePairs, or demonstrations (Conversations ending
    # with the assistant's reply); None for tasks that are prompts alone. train / eval then hold the rows' prompts.
    train_data: list | None = None
    eval_data: list | None = None

    def where(self, split: str, i: int) -> str:
        """How an error names prompt ``i`` of ``split`` ("train" or "eval")."""
        rows = self.train_rows if split == "train" else self.eval_rows
        label = "training prompt" if split == "train" else "held-out prompt"
        return f"{label} {i} ({rows[i]})" if i < len(rows) else f"{label} {i}"


def task_reward(task: Task, reward_cfg):
    """The reward a run uses: ``reward.fn`` if set, else the task's own. -> (name, reward function)."""
    from rebelrl.rewards import load_reward
    from rebelrl.rewards.registry import user_reward

    if reward_cfg.fn is None and callable(task.reward):
        return task.name, user_reward(task.reward, task.name)
    name = reward_cfg.fn or task.reward
    if name is None:
        raise ConfigError(f"reward.fn: task {task.name!r} has no default reward: set reward.fn (a built-in name or module:function)")
    return name, user_reward(load_reward(name, reward_cfg.kwargs), name)


def build_task(cfg) -> Task:
    """Prompts and default reward for ``cfg`` (a ``TaskConfig``); the held-out set never overlaps training."""
    if cfg.name == "chitchat-warm":
        system = cfg.system_prompt if cfg.system_prompt is not None else CHITCHAT_SYSTEM
        prompts = [Conversation.from_prompt(text, system=system) for text in chitchat_openings()]
        train, held_out = _split(prompts, cfg.n_eval, "the chitchat-dataset openings")
        return Task(cfg.name, train[: cfg.n_train], held_out, "vader")
    if cfg.name == "reasoning-gym":
        from rebelrl.rewards.reasoning import reasoning_gym_prompts

        prompts = reasoning_gym_prompts(cfg.dataset, cfg.n_train + cfg.n_eval, _SPLIT_SEED, cfg.instruction, **cfg.dataset_kwargs)
        if cfg.system_prompt:
            prompts = [Conversation.from_chat([{"role": "system", "content": cfg.system_prompt}] + p.to_chat(), p.meta) for p in prompts]
        return Task(f"reasoning-gym:{cfg.dataset}", prompts[: cfg.n_train], prompts[cfg.n_train :], "reasoning_gym")
    if cfg.name == "prompts":
        from rebelrl.data import load_prompt_rows

        if cfg.prompts is None:
            raise ConfigError("task.name=prompts needs task.prompts: a .jsonl/.parquet file, a datasets folder or hf:NAME")
        kw = dict(prompt_field=cfg.prompt_field, messages_field=cfg.messages_field, system_prompt=cfg.system_prompt)
        rows = load_prompt_rows(cfg.prompts, **kw)
        if cfg.eval_prompts:
            train, held_out = rows, load_prompt_rows(cfg.eval_prompts, limit=cfg.n_eval, **kw)
        else:
            train, held_out = _split(rows, cfg.n_eval, f"task.prompts={cfg.prompts}")
        train = train[: cfg.n_train]
        return Task(
            Path(cfg.prompts).stem, [c for _, c in train], [c for _, c in held_out], None,
            train_rows=[w for w, _ in train], eval_rows=[w for w, _ in held_out],
        )
    if cfg.name in ("preferences", "demonstrations"):
        return _data_task(cfg)
    if cfg.name == "chitchat-dialogue":
        from rebelrl.envs.base import CheckedEnv, UserEnv, load_user_simulator
        from rebelrl.envs.users import LMUser

        system = cfg.system_prompt if cfg.system_prompt is not None else CHITCHAT_SYSTEM
        openings = [Conversation.from_prompt(t, system=system) for t in chitchat_openings()]
        train, held_out = _split(openings, cfg.n_eval, "the chitchat-dataset openings")
        user = load_user_simulator(cfg.user, cfg.user_kwargs) if cfg.user else LMUser(cfg.user_model, seed=_SPLIT_SEED)
        env = CheckedEnv(UserEnv(train[: cfg.n_train], user, cfg.horizon), cfg.user or "chitchat-dialogue")
        return Task(cfg.name, train[: cfg.n_train], held_out, "vader", env)
    if cfg.name == "openenv":
        from rebelrl.envs.base import CheckedEnv
        from rebelrl.envs.openenv import OpenEnvAdapter

        adapter = OpenEnvAdapter(cfg.env, cfg.horizon, cfg.env_kwargs, cfg.action_field, cfg.observation_field, cfg.action_class)
        env = CheckedEnv(adapter, f"openenv {cfg.env}")
        # Different seeds for the two sets: held-out games are never trained on.
        train, held_out = env.reset(cfg.n_train, seed=_SPLIT_SEED), env.reset(cfg.n_eval, seed=_SPLIT_SEED + 1)
        return Task(f"openenv:{cfg.env}", train, held_out, adapter.reward, env)
    if cfg.name in ("secret", "guess-number", "env"):
        from rebelrl.envs.base import CheckedEnv

        env = CheckedEnv(_build_env(cfg), cfg.env if cfg.name == "env" else cfg.name)
        # Different seeds for the two sets: held-out games are never trained on.
        train, held_out = env.reset(cfg.n_train, seed=_SPLIT_SEED), env.reset(cfg.n_eval, seed=_SPLIT_SEED + 1)
        reward = {"secret": "rebelrl.envs.secret:secret_reward", "guess-number": "rebelrl.envs.numbers:number_reward"}.get(cfg.name)
        return Task(cfg.env if cfg.name == "env" else cfg.name, train, held_out, reward, env)
    raise ConfigError(f"task.name: unknown task {cfg.name!r}")


def _data_task(cfg) -> Task:
    """Preference pairs or demonstrations; held-out rows from ``task.eval_data`` or split off ``task.data``."""
    from rebelrl.data import load_demonstration_rows, load_preference_rows

    if cfg.name == "preferences":
        load = partial(load_preference_rows, prompt_field=cfg.prompt_field)
    else:
        load = partial(load_demonstration_rows, prompt_field=cfg.prompt_field, messages_field=cfg.messages_field)
    rows = [(where, row) for row, where in zip(*load(cfg.data))]
    if cfg.eval_data:
        held_out = [(where, row) for row, where in zip(*load(cfg.eval_data))][: cfg.n_eval]
        train = rows
    else:
        train, held_out = _split(rows, cfg.n_eval, f"task.data={cfg.data}")
    train = train[: cfg.n_train]

    def prompt(row):  # a pair's other columns (a reasoning-gym entry, say) travel with its prompt to the reward
        return row.context if cfg.name == "preferences" else before_last_reply(row)

    return Task(
        Path(cfg.data).stem if not cfg.data.startswith("hf:") else cfg.data, [prompt(r) for _, r in train], [prompt(r) for _, r in held_out], None,
        train_rows=[w for w, _ in train], eval_rows=[w for w, _ in held_out],
        train_data=[r for _, r in train], eval_data=[r for _, r in held_out],
    )


def before_last_reply(conversation: Conversation) -> Conversation:
    """A demonstration's prompt: the conversation before its last assistant message."""
    last = max(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
    return Conversation(conversation.messages[:last], conversation.meta)


def _build_env(cfg):
    if cfg.name == "secret":
        from rebelrl.envs.secret import SecretEnv

        try:
            return SecretEnv(horizon=cfg.horizon, items=cfg.items or None, system_prompt=cfg.system_prompt)
        except ValueError as e:
            raise ConfigError(f"task.items: {e}") from None
    if cfg.name == "guess-number":
        from rebelrl.envs.numbers import NumberEnv

        return NumberEnv(horizon=cfg.horizon, max_number=cfg.max_number, system_prompt=cfg.system_prompt, hints=cfg.hints, rounds=cfg.rounds)
    from rebelrl.imports import build_object, import_object

    if not cfg.env:
        raise ConfigError("task.name=env needs task.env: the import path module:attr of your Env (or of a factory)")
    env = build_object(import_object(cfg.env, "env"), cfg.env, "env", cfg.env_kwargs, horizon=cfg.horizon)
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise ConfigError(f"task.env: env {cfg.env!r}: {type(env).__name__} has no {method}() method")
    return env


def chitchat_openings(min_chars: int = 12, max_chars: int = 200) -> list[str]:
    """The first turn of each conversation in the chitchat-dataset package (7,168 real chats)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the chitchat-dataset package is not installed: pip install chitchat-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    data = json.loads(path.read_text())
    openings = []
    for key in sorted(data):  # sorted: the same order whatever the JSON's
        turns = data[key].get("messages") or []
        if not turns:
            continue
        text = " ".join(m["text"].strip() for m in turns[0] if m.get("text")).strip()
        if min_chars <= len(text) <= max_chars:
            openings.append(text)
    return list(dict.fromkeys(openings))  # drop exact duplicates ("Hello how are you")


def _split(prompts: list, n_eval: int, source: str) -> tuple[list, list]:
    """(training, held-out) items: ``n_eval`` held out by a fixed shuffle, the same in every run."""
    if n_eval >= len(prompts):
        raise ConfigError(
            f"task.n_eval={n_eval} must be less than the {len(prompts)} prompts of {source}: none would be left to train on"
        )
    order = list(range(len(prompts)))
    random.Random(_SPLIT_SEED).shuffle(order)
    held_out = [prompts[i] for i in order[:n_eval]]
    train = [prompts[i] for i in order[n_eval:]]
    return train, held_out
