"""Helpers for end-to-end runs of the tiny in-process model through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS = ["say hello", "write", "go on", "a b c", "tell me", "xyz", "why?", "ok", "more please", "now"] * 3

RULE_MODULE = '''
from rebelrl.envs import UserEnv
from rebelrl.types import Conversation

OPENINGS = ["hello", "talk to me", "what now?", "ok go", "tell me more", "and then?"]


class GoOnUser:
    def respond(self, conversations):
        return ["go on" for _ in conversations]


class TinyDialogueEnv(UserEnv):
    """A user who always says "go on"; the reward looks only at the last reply."""

    def __init__(self, horizon):
        super().__init__([Conversation.from_prompt(t) for t in OPENINGS], GoOnUser(), horizon)


def lowercase_fraction(conversations):
    """Share of the reply's characters that are lowercase letters: a rule a tiny model can learn."""
    out = []
    for c in conversations:
        text = c.last_assistant
        out.append(sum(ch.islower() for ch in text) / max(len(text), 1))
    return out
'''

TINY_ARGS = [
    "model.name=tiny-random",
    "task.name=prompts",
    "task.n_eval=6",
    "reward.fn=tiny_rules:lowercase_fraction",
    "reward.no_eos_penalty=null",
    "rollout.prompts_per_iter=8",
    "rollout.max_new_tokens=8",
    "update.minibatch_size=4",
    "update.micro_batch_size=4",
    "update.epochs=2",
    "rebel.eta=10",
    "rebel.kl_coef=0.0",
    "optim.lr=3e-3",
    "optim.schedule=constant",
    "eval.every=2",
    "checkpoint.every=2",
]


def setup_task(tmp_path: Path, monkeypatch) -> Path:
    """Writes the prompts and a reward module to ``tmp_path`` and makes the module importable."""
    (tmp_path / "tiny_rules.py").write_text(RULE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return prompts


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def strip_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


# The same budget on a three-turn dialogue with a user who always says "go on".
REFUEL_ARGS = [
    "algo=refuel",
    *(a for a in TINY_ARGS if not a.startswith(("task.", "rollout.max_new_tokens", "eval.every", "checkpoint.every"))),
    "task.name=env",
    "task.env=tiny_rules:TinyDialogueEnv",
    "task.horizon=3",
    "task.n_train=24",
    "task.n_eval=6",
    "rollout.max_new_tokens=6",
    "eval.every=3",
    "checkpoint.every=3",
]


def die_after_logging(monkeypatch, iteration: int) -> None:
    """Make runs raise KeyboardInterrupt (as a kill would stop them) right after they log
    ``iteration`` to metrics.jsonl; ``monkeypatch.undo()`` or the test's end restores the logger."""
    from rebelrl.train import metrics as metrics_module

    real_log = metrics_module.JsonlLogger.log

    def log_then_die(self, record):
        real_log(self, record)
        if self.path.name == "metrics.jsonl" and record["iteration"] == iteration:
            raise KeyboardInterrupt

    monkeypatch.setattr(metrics_module.JsonlLogger, "log", log_then_die)


# Equivalence tests compare parameters after training with plain SGD and no clipping: the step is then
# the gradient itself. AdamW divides each entry by its own magnitude, turning last-bit differences of
# entries near 0 into differences of a whole step, and clipping would hide a wrongly scaled gradient.
PLAIN_SGD_ARGS = ("optim.max_grad_norm=0",)


def use_plain_sgd(monkeypatch) -> None:
    import torch

    from rebelrl.algos import run as run_module

    def sgd(params, lr, weight_decay, betas):
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr)

    monkeypatch.setattr(run_module, "make_optimizer", sgd)


def one_line(capsys) -> str:
    """The one error line a refused ``rebelrl train`` printed (and no traceback)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rebelrl train:") or "Traceback" in line]
    assert len(err) == 1, err
    return err[0]
