"""Where prompts come from: built-in tasks and the user's own prompt files."""

from rebelrl.envs.tasks import Task, build_task

__all__ = ["Task", "build_task"]
