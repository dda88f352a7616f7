"""A run that cannot go on stops early with one line naming the cause: non-finite numbers, prompts too
long for the model, a failing reward, a user's env that returns the wrong things."""

import json
import math
import re

import pytest
import torch

from rebelrl.algos.run import Run
from rebelrl.cli import main
from rebelrl.errors import NonFiniteError
from rebelrl.models import tiny_model, tiny_tokenizer
from rebelrl.train.config import TrainConfig
from rebelrl.train.optim import make_optimizer, make_schedule
from tests.tiny_run import PROMPTS, REFUEL_ARGS, TINY_ARGS, one_line, setup_task

GUARD_MODULE = '''
from rebelrl.envs import StepResult
from tiny_rules import TinyDialogueEnv, lowercase_fraction


def huge(conversations):
    """A reward on a scale that overflows the squared loss."""
    return [1e30 * s for s in lowercase_fraction(conversations)]


def always_nan(conversations):
    return [float("nan")] * len(conversations)


class ShortEnv(TinyDialogueEnv):
    def step(self, conversations):
        return super().step(conversations)[:-1]


class SilentEnv(TinyDialogueEnv):
    def step(self, conversations):
        return [StepResult("", False) for _ in conversations]


class ShortResetEnv(TinyDialogueEnv):
    def reset(self, n, seed):
        return super().reset(n, seed)[:-1]
'''


@pytest.fixture
def task(tmp_path, monkeypatch):
    prompts = setup_task(tmp_path, monkeypatch)
    (tmp_path / "tiny_guards.py").write_text(GUARD_MODULE)
    return prompts


def train(prompts, run_dir, *extra):
    return main(["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", "iterations=2", *extra])


def test_a_reward_that_overflows_the_loss_stops_before_any_checkpoint(task, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(task, run, "reward.fn=tiny_guards:huge", "checkpoint.every=1") == 2
    line = one_line(capsys)
    assert line.startswith("rebelrl train: iteration 1: the loss is inf; stopped before the optimizer step, so no checkpoint")
    assert "(last complete checkpoint: none yet)" in line
    assert re.search(r"the pair rewards span \[0, [0-9.]+e\+29\]: scale the reward down if it is large", line)
    assert not (run / "metrics.jsonl").exists() and not list(run.glob("checkpoints/iter-*"))


def _bare_run(tmp_path) -> Run:
    """A ``Run`` holding just what stepping needs: a tiny policy, AdamW and a schedule."""
    run = object.__new__(Run)
    run.cfg, run.run_dir, run.iteration = TrainConfig(model=TrainConfig().model), tmp_path, 7
    run.policy = tiny_model(tiny_tokenizer())
    run.optimizer = make_optimizer(run.policy.parameters(), 1e-3, 0.0, [0.9, 0.999])
    run.scheduler = make_schedule(run.optimizer, "constant", 10)
    return run


def test_a_non_finite_gradient_norm_stops_before_the_step(tmp_path):
    run = _bare_run(tmp_path)
    before = {k: v.clone() for k, v in run.policy.state_dict().items()}
    params = [p for p in run.policy.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"^iteration 7: the gradient norm is nan; stopped before the optimizer step"):
        run.clip_and_step()
    assert all(torch.equal(before[k], v) for k, v in run.policy.state_dict().items())


def test_non_finite_metrics_or_weights_are_never_logged_or_saved(tmp_path):
    run = _bare_run(tmp_path)
    with pytest.raises(NonFiniteError, match=r"iteration 7: the loss is nan; stopped before logging, evaluating or saving"):
        run.end_iteration(7, {"loss": math.nan, "grad_norm": 1.0})
    with torch.no_grad():
        next(run.policy.parameters())[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"iteration 7: some weights are NaN or infinite"):
        run.end_iteration(7, {"loss": 1.0, "grad_norm": 1.0})
    assert not list(tmp_path.iterdir())


def test_a_prompt_longer_than_the_context_is_named_before_any_compute(task, tmp_path, capsys):
    """The tiny model's context is 2048 tokens, its tokenizer one token per character: the prompt is
    <|im_start|> "user\n" (1 + 5), 3000 x, <|im_end|> "\n" (2), <|im_start|> "assistant\n" (1 + 10) = 3019
    tokens, against 2048 - 8 (the completion budget) = 2040."""
    with open(task, "a") as f:
        f.write(json.dumps({"prompt": "x" * 3000}) + "\n")
    run = tmp_path / "run"
    assert train(task, run) == 2
    line = one_line(capsys)
    where = rf"(training|held-out) prompt \d+ \({re.escape(str(task))}, line {len(PROMPTS) + 1}\)"
    assert re.match(rf"rebelrl train: {where}: 3019 tokens with the chat template; the model's context of 2048 tokens", line), line
    assert "minus the completion budget of 8 leaves 2040: shorten or drop the prompt" in line
    assert not (run / "eval.jsonl").exists()  # nothing was generated


def test_a_reward_failing_in_evaluation_is_named_by_its_spec_and_row(task, tmp_path, capsys):
    assert train(task, tmp_path / "run", "reward.fn=tiny_guards:always_nan") == 2
    line = one_line(capsys)
    assert re.fullmatch(
        rf"rebelrl train: reward 'tiny_guards:always_nan': held-out prompt 0 \({re.escape(str(task))}, line \d+\) is nan, expected a finite float",
        line,
    ), line
    # dialogues too: the per-turn judge names the reward, not 'reward'
    assert main(["train", *REFUEL_ARGS, "reward.fn=tiny_guards:always_nan", f"run_dir={tmp_path / 'dialogue'}", "iterations=1"]) == 2
    assert one_line(capsys) == "rebelrl train: reward 'tiny_guards:always_nan': held-out prompt 0 is nan, expected a finite float"


@pytest.mark.parametrize(
    "env, message",
    [
        ("ShortEnv", r"env tiny_guards:ShortEnv: step returned \d+ results for a batch of \d+ for row 0 \(and \d+ more rows\) after 3 attempts"),
        ("SilentEnv", r"env tiny_guards:SilentEnv: step returned user_message='' with done=False for row 0 \(and \d+ more rows\) after 3 attempts"),
        ("ShortResetEnv", r"env tiny_guards:ShortResetEnv: reset\(24, seed=\d+\) returned 23 conversations; expected 24 Conversations"),
    ],
)
def test_a_users_env_that_returns_the_wrong_things_is_named(env, message, task, tmp_path, capsys):
    args = [a for a in REFUEL_ARGS if not a.startswith("task.env=")]
    assert main(["train", *args, f"task.env=tiny_guards:{env}", f"run_dir={tmp_path / 'run'}", "iterations=1"]) == 2
    line = one_line(capsys)
    assert re.match(rf"rebelrl train: {message}", line), line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["task.prompts=missing.jsonl"], "rebelrl train: missing.jsonl: file not found"),
        (["reward.fn=tiny_rules:no_such_reward"], "rebelrl train: reward 'tiny_rules:no_such_reward': 'tiny_rules' has no attribute 'no_such_reward'"),
        (["reward.fn=null"], "rebelrl train: config error: reward.fn: task 'prompts' has no default reward"),
        (["task.n_eval=40"], "rebelrl train: config error: task.n_eval=40 must be less than the 30 prompts of task.prompts="),
    ],
)
def test_anticipated_mistakes_print_one_line_and_exit_2(extra, message, task, tmp_path, capsys):
    assert train(task, tmp_path / "run", *extra) == 2
    assert one_line(capsys).startswith(message)
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed
