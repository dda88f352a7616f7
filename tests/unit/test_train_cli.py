"""REBEL end to end on the tiny model, through the CLI entry point."""

import math

import pytest
import torch
from safetensors.torch import load_file

from rebelrl.algos import rebel
from rebelrl.cli import main
from rebelrl.config import load_config
from rebelrl.train.config import TrainConfig
from rebelrl.models import tiny_model, tiny_tokenizer
from tests.tiny_run import PLAIN_SGD_ARGS, TINY_ARGS, read_jsonl, setup_task, strip_timings, use_plain_sgd


def train(tmp_path, monkeypatch, run_dir, *extra):
    prompts = setup_task(tmp_path, monkeypatch)
    args = ["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", *extra]
    assert main(args) == 0
    return run_dir


def test_rebel_learns_a_custom_rule_reward(tmp_path, monkeypatch):
    run = train(tmp_path, monkeypatch, tmp_path / "run", "iterations=12")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == list(range(1, 13))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    early = sum(m["score_mean"] for m in metrics[:3]) / 3
    late = sum(m["score_mean"] for m in metrics[-3:]) / 3
    assert late > early + 0.15, (early, late)
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["iteration"] for e in evals] == [0, 2, 4, 6, 8, 10, 12]
    assert evals[-1]["reward_mean"] > evals[0]["reward_mean"]
    assert evals[-1]["win_rate_vs_initial"] > 0.5
    # before the first step the training forward pass reproduces the sampler's log-probs
    assert metrics[0]["logp_mismatch_max"] < 1e-4

    # parameters moved away from the initial weights
    initial = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    trained = load_file(run / "checkpoints" / "iter-000012" / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)

    for name in ("config.yaml", "report.md", "plots/reward.png", "plots/win_rate.png", "eval_initial.jsonl"):
        assert (run / name).exists(), name


def test_gradient_accumulation_matches_one_big_minibatch(tmp_path, monkeypatch):
    """4 pairs per step as 1 micro-batch of 4, or 4 micro-batches of 1: the same updates (plain SGD)."""
    use_plain_sgd(monkeypatch)
    one = train(tmp_path, monkeypatch, tmp_path / "one", "iterations=2", *PLAIN_SGD_ARGS, "update.micro_batch_size=4")
    four = train(tmp_path, monkeypatch, tmp_path / "four", "iterations=2", *PLAIN_SGD_ARGS, "update.micro_batch_size=1")
    a = load_file(one / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    b = load_file(four / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    ma, mb = read_jsonl(one / "metrics.jsonl"), read_jsonl(four / "metrics.jsonl")
    assert ma[0]["loss"] == pytest.approx(mb[0]["loss"], rel=1e-4)


def test_resume_after_a_kill_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    full = train(tmp_path, monkeypatch, tmp_path / "full", "iterations=5")

    # Kill the second run right after it logs iteration 3 (its last checkpoint is iteration 2).
    from rebelrl.train import metrics as metrics_module

    real_log = metrics_module.JsonlLogger.log

    def log_then_die(self, record):
        real_log(self, record)
        if self.path.name == "metrics.jsonl" and record["iteration"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(metrics_module.JsonlLogger, "log", log_then_die)
    killed = tmp_path / "killed"
    prompts = setup_task(tmp_path, monkeypatch)
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={killed}", "iterations=5"]) == 130
    monkeypatch.setattr(metrics_module.JsonlLogger, "log", real_log)
    assert len(read_jsonl(killed / "metrics.jsonl")) == 3

    # Starting again without --resume must not touch it.
    from rebelrl.train.run_dir import RunDirError

    with pytest.raises(RunDirError, match="already holds a run"):
        rebel.train(load_config(TrainConfig, None, [*TINY_ARGS, f"task.prompts={prompts}", f"run_dir={killed}", "iterations=5"]))
    train(tmp_path, monkeypatch, killed, "iterations=5", "--resume")

    assert strip_timings(read_jsonl(killed / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))
    assert strip_timings(read_jsonl(killed / "eval.jsonl")) == strip_timings(read_jsonl(full / "eval.jsonl"))
    a = load_file(full / "checkpoints" / "iter-000005" / "model" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "iter-000005" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill(tmp_path, monkeypatch):
    """A real kill (SIGKILL, wherever it lands: mid-iteration or mid-checkpoint), then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    full = train(tmp_path, monkeypatch, tmp_path / "full", "iterations=6", "checkpoint.every=1")
    prompts = tmp_path / "prompts.jsonl"
    killed = tmp_path / "killed"
    args = ["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={killed}", "iterations=6", "checkpoint.every=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-m", "rebelrl.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = killed / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert main([*args, "--resume"]) == 0
    assert strip_timings(read_jsonl(killed / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))
    # what the kill left half-written is cleaned up
    assert not list(killed.rglob("*.rebelrl-tmp"))
