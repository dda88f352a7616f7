"""A module-scoped task and an uninterrupted 4-iteration run, for the tests that kill, damage and
resume runs against it."""

from __future__ import annotations

import json
import sys

import pytest

from rebelrl.cli import main
from tests.tiny_run import PROMPTS, RULE_MODULE, TINY_ARGS

ITERATIONS = ["iterations=4", "eval.every=2", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The prompts and the reward module, importable for the whole module."""
    root = tmp_path_factory.mktemp("task")
    (root / "tiny_rules.py").write_text(RULE_MODULE)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def args(task_dir, run_dir, *extra):
    return ["train", *TINY_ARGS, f"task.prompts={task_dir / 'prompts.jsonl'}", f"run_dir={run_dir}", *ITERATIONS, *extra]


@pytest.fixture(scope="module")
def full(task_dir):
    """The uninterrupted run every interrupted one must reproduce (and a foreign run to point at)."""
    run = task_dir / "full"
    assert main(args(task_dir, run)) == 0
    return run
