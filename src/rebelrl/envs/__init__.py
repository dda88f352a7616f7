"""Where prompts and dialogues come from: built-in tasks, environments and simulated users."""

from rebelrl.envs.base import (
    CheckedEnv,
    Env,
    EnvError,
    StepResult,
    UserEnv,
    UserSimulator,
    UserSimulatorError,
    checked_reset,
    checked_step,
    count_assistant_turns,
    load_user_simulator,
)
from rebelrl.envs.secret import CATALOG, ScriptedSecretUser, SecretEnv, secret_guessed_at, secret_reward
from rebelrl.envs.tasks import Task, build_task, task_reward

__all__ = [
    "CATALOG",
    "CheckedEnv",
    "Env",
    "EnvError",
    "ScriptedSecretUser",
    "SecretEnv",
    "StepResult",
    "Task",
    "UserEnv",
    "UserSimulator",
    "UserSimulatorError",
    "checked_reset",
    "checked_step",
    "build_task",
    "task_reward",
    "count_assistant_turns",
    "load_user_simulator",
    "secret_guessed_at",
    "secret_reward",
]
