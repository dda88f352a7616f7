"""The methods REBEL is compared with, through the CLI on the tiny model: online DPO/IPO/chi-PO,
RLOO, GRPO, Dr. GRPO, PPO (shared and separate critic) and A*-PO."""

import math

import pytest
import torch
from safetensors.torch import load_file

from rebelrl.cli import main
from rebelrl.models import tiny_model, tiny_tokenizer
from tests.tiny_run import PLAIN_SGD_ARGS, TINY_ARGS, die_after_logging, read_jsonl, setup_task, strip_timings, use_plain_sgd

# Each method on the lowercase rule with the budget the REBEL test uses; k = 4 where groups matter.
METHODS = {
    "online_dpo": ["algo=online_dpo", "rollout.samples_per_prompt=4", "online_dpo.beta=0.5"],
    "online_ipo": ["algo=online_dpo", "rollout.samples_per_prompt=4", "online_dpo.loss=ipo", "online_dpo.beta=0.5"],
    "online_chipo": ["algo=online_dpo", "rollout.samples_per_prompt=4", "online_dpo.loss=chipo", "online_dpo.beta=0.5", "online_dpo.r_max=5"],
    "rloo": ["algo=rloo", "rollout.samples_per_prompt=4", "rloo.kl_coef=0", "update.minibatch_size=8", "update.micro_batch_size=8"],
    "grpo": ["algo=grpo", "rollout.samples_per_prompt=4", "update.minibatch_size=8", "update.micro_batch_size=8"],
    "dr_grpo": ["algo=grpo", "rollout.samples_per_prompt=4", "grpo.scale_advantages=false", "grpo.aggregation=seq_mean_token_sum_norm",
                "update.minibatch_size=8", "update.micro_batch_size=8", "optim.lr=1e-2"],
    "dapo": ["algo=grpo", "rollout.samples_per_prompt=4", "grpo.aggregation=token_mean", "grpo.clip_eps_high=0.28", "update.minibatch_size=8",
             "update.micro_batch_size=8"],
    "ppo": ["algo=ppo", "rollout.samples_per_prompt=2", "ppo.kl_coef=0", "update.minibatch_size=8", "update.micro_batch_size=8"],
    "ppo_separate_critic": ["algo=ppo", "rollout.samples_per_prompt=2", "ppo.kl_coef=0", "ppo.critic=separate", "update.minibatch_size=8",
                            "update.micro_batch_size=8"],
    "astar_po": ["algo=astar_po", "astar.ref_samples=4", "astar.beta2=0.05", "update.minibatch_size=4", "update.micro_batch_size=4"],
}


def train(tmp_path, monkeypatch, name, *extra, exit_code=0):
    prompts = setup_task(tmp_path, monkeypatch)
    run_dir = tmp_path / name
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", *extra]) == exit_code
    return run_dir


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_a_rule_reward_through_the_cli(tmp_path, monkeypatch, method):
    run = train(tmp_path, monkeypatch, method, "iterations=12", *METHODS[method])
    metrics = read_jsonl(run / "metrics.jsonl")
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert metrics[0]["logp_mismatch_max"] < 1e-3
    early = sum(m["score_mean"] for m in metrics[:3]) / 3
    late = sum(m["score_mean"] for m in metrics[-3:]) / 3
    assert late > early + 0.1, (method, early, late)
    initial = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    trained = load_file(run / "checkpoints" / "iter-000012" / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    assert metrics[0]["completions"] == 8 * (1 if method == "astar_po" else int(METHODS[method][1].split("=")[1])) + (
        8 * 4 if method == "astar_po" else 0)  # A*-PO also counts its reference samples


@pytest.mark.parametrize("method", ["ppo", "astar_po", "grpo"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch, method):
    args = ["iterations=5", *METHODS[method]]
    full = train(tmp_path, monkeypatch, "full", *args)
    with monkeypatch.context() as patch:
        die_after_logging(patch, 3)
        train(tmp_path, monkeypatch, "killed", *args, exit_code=130)  # Ctrl-C: saved state named, exit 130
    killed = train(tmp_path, monkeypatch, "killed", *args, "--resume")
    assert strip_timings(read_jsonl(full / "metrics.jsonl")) == strip_timings(read_jsonl(killed / "metrics.jsonl"))
    a = load_file(full / "checkpoints" / "iter-000005" / "model" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "iter-000005" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["grpo", "dapo", "ppo", "rloo"])
def test_gradient_accumulation_matches_one_big_minibatch(tmp_path, monkeypatch, method):
    """8 completions a step as one micro-batch of 8 or eight of 1: the same updates (token-weighted
    for PPO's and DAPO's token means, completion-weighted for GRPO's and RLOO's sequence means; plain
    SGD). The completions differ in length (some end early, some run to the budget), so a token mean
    weighted by completions per micro-batch would give other updates."""
    use_plain_sgd(monkeypatch)
    args = ["iterations=2", *METHODS[method], *PLAIN_SGD_ARGS]
    one = train(tmp_path, monkeypatch, "one", *args, "update.micro_batch_size=8")
    eight = train(tmp_path, monkeypatch, "eight", *args, "update.micro_batch_size=1")
    assert all(0 < m["frac_no_eos"] < 1 for m in read_jsonl(one / "metrics.jsonl")), "every batch needs replies of several lengths"
    a = load_file(one / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    b = load_file(eight / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
