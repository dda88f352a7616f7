"""Built-in single-turn tasks: training prompts, held-out prompts and the reward that judges them."""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from rebelrl.types import Conversation

# Split seed is fixed, not the run seed: every run of a task must be judged on the same held-out prompts.
_SPLIT_SEED = 20240521

CHITCHAT_SYSTEM = "You are a friendly conversational partner. Reply to the user in one or two short sentences."


@dataclass
class Task:
    name: str
    train: list[Conversation]
    eval: list[Conversation]
    reward: str | None  # default reward spec (built-in name or module:function); None: the user must name one
    env: object | None = None  # multi-turn tasks: the Env whose user answers each assistant turn


def task_reward(task: Task, reward_cfg):
    """The reward a run uses: ``reward.fn`` if set, else the task's own. -> (name, reward function)."""
    from rebelrl.rewards import load_reward

    name = reward_cfg.fn or task.reward
    if name is None:
        raise ValueError(f"task {task.name!r} has no default reward: set reward.fn (a built-in name or module:function)")
    return name, load_reward(name, reward_cfg.kwargs)


def build_task(cfg) -> Task:
    """Prompts and default reward for ``cfg`` (a ``TaskConfig``); the held-out set never overlaps training."""
    if cfg.name == "chitchat-warm":
        system = cfg.system_prompt if cfg.system_prompt is not None else CHITCHAT_SYSTEM
        prompts = [Conversation.from_prompt(text, system=system) for text in chitchat_openings()]
        train, held_out = _split(prompts, cfg.n_eval)
        return Task(cfg.name, train[: cfg.n_train], held_out, "vader")
    if cfg.name == "reasoning-gym":
        from rebelrl.rewards.reasoning import reasoning_gym_prompts

        prompts = reasoning_gym_prompts(cfg.dataset, size=cfg.n_train + cfg.n_eval, seed=_SPLIT_SEED)
        if cfg.system_prompt:
            prompts = [Conversation.from_chat([{"role": "system", "content": cfg.system_prompt}] + p.to_chat(), p.meta) for p in prompts]
        return Task(f"reasoning-gym:{cfg.dataset}", prompts[: cfg.n_train], prompts[cfg.n_train :], "reasoning_gym")
    if cfg.name == "prompts":
        from rebelrl.data import load_prompts

        if cfg.prompts is None:
            raise ValueError("task.name=prompts needs task.prompts: a .jsonl/.parquet file, a datasets folder or hf:NAME")
        kw = dict(prompt_field=cfg.prompt_field, messages_field=cfg.messages_field, system_prompt=cfg.system_prompt)
        prompts = load_prompts(cfg.prompts, **kw)
        if cfg.eval_prompts:
            held_out = load_prompts(cfg.eval_prompts, limit=cfg.n_eval, **kw)
            train = prompts
        else:
            train, held_out = _split(prompts, cfg.n_eval)
        return Task(Path(cfg.prompts).stem, train[: cfg.n_train], held_out, None)
    if cfg.name == "chitchat-dialogue":
        from rebelrl.envs.base import UserEnv, load_user_simulator
        from rebelrl.envs.users import LMUser

        system = cfg.system_prompt if cfg.system_prompt is not None else CHITCHAT_SYSTEM
        train, held_out = _split([Conversation.from_prompt(t, system=system) for t in chitchat_openings()], cfg.n_eval)
        user = load_user_simulator(cfg.user, cfg.user_kwargs) if cfg.user else LMUser(cfg.user_model, seed=_SPLIT_SEED)
        env = UserEnv(train[: cfg.n_train], user, cfg.horizon)
        return Task(cfg.name, train[: cfg.n_train], held_out, "vader", env)
    if cfg.name in ("secret", "guess-number", "env"):
        env = _build_env(cfg)
        # Different seeds for the two sets: held-out games are never trained on.
        train, held_out = env.reset(cfg.n_train, seed=_SPLIT_SEED), env.reset(cfg.n_eval, seed=_SPLIT_SEED + 1)
        reward = {"secret": "rebelrl.envs.secret:secret_reward", "guess-number": "rebelrl.envs.numbers:number_reward"}.get(cfg.name)
        return Task(cfg.env if cfg.name == "env" else cfg.name, train, held_out, reward, env)
    raise ValueError(f"unknown task {cfg.name!r}")


def _build_env(cfg):
    if cfg.name == "secret":
        from rebelrl.envs.secret import SecretEnv

        return SecretEnv(horizon=cfg.horizon, items=cfg.items or None, system_prompt=cfg.system_prompt)
    if cfg.name == "guess-number":
        from rebelrl.envs.numbers import NumberEnv

        return NumberEnv(horizon=cfg.horizon, max_number=cfg.max_number, system_prompt=cfg.system_prompt, hints=cfg.hints, rounds=cfg.rounds)
    from rebelrl.imports import build_object, import_object

    if not cfg.env:
        raise ValueError("task.name=env needs task.env: the import path module:attr of your Env (or of a factory)")
    env = build_object(import_object(cfg.env, "env"), cfg.env, "env", cfg.env_kwargs, horizon=cfg.horizon)
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise ValueError(f"env {cfg.env!r}: {type(env).__name__} has no {method}() method")
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


def _split(prompts: list[Conversation], n_eval: int) -> tuple[list[Conversation], list[Conversation]]:
    if n_eval >= len(prompts):
        raise ValueError(f"task.n_eval={n_eval} leaves no training prompts out of {len(prompts)}")
    order = list(range(len(prompts)))
    random.Random(_SPLIT_SEED).shuffle(order)
    held_out = [prompts[i] for i in order[:n_eval]]
    train = [prompts[i] for i in order[n_eval:]]
    return train, held_out
