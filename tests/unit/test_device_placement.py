"""Tensors are made where the tensors they meet live: every training loop runs, from the rollout through
scoring, advantages, the loss and the step to evaluation, with the rollout and the model's log-probs
on a stand-in accelerator (``tests/fake_device.py``) that refuses CPU tensors as a GPU does. On a CPU
machine a score made with ``torch.tensor(scores)`` and a log-prob from the model are both CPU tensors,
so only such a stand-in (or a GPU) shows the mismatch."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from rebelrl import logprobs
from rebelrl.algos import pg, rebel
from rebelrl.cli import main
from rebelrl.models import Critic
from rebelrl.rollout import HFGenerator
from rebelrl.types import Rollout
from tests.fake_device import DEVICE, FakeDeviceTensor, fake_accelerator, on_device, to_device
from tests.tiny_run import PROMPTS, REFUEL_ARGS, TINY_ARGS, read_jsonl, setup_task

ALGOS = {
    "rebel": [],
    "online_dpo": ["algo=online_dpo", "rollout.samples_per_prompt=4"],
    "rloo": ["algo=rloo", "rollout.samples_per_prompt=4"],
    "dapo": ["algo=grpo", "rollout.samples_per_prompt=4", "grpo.aggregation=token_mean", "grpo.beta=0.04"],
    "ppo": ["algo=ppo"],
    "ppo_separate_critic": ["algo=ppo", "ppo.critic=separate"],
    "astar_po": ["algo=astar_po", "astar.ref_samples=2"],
    "rebel_guide_rollin": ["guide.mode=rollin", "guide.prob=1.0"],
    "ppo_guide_rollout": ["algo=ppo", "guide.mode=rollout", "guide.prob=1.0"],
}


@pytest.fixture
def on_accelerator(monkeypatch):
    """Samples and the model's log-probs and values live on the stand-in device; the model runs on the CPU."""
    generate = HFGenerator.generate

    def generate_on_device(self, *args, **kwargs):
        rollout = generate(self, *args, **kwargs)
        return dataclasses.replace(rollout, **{f.name: to_device(getattr(rollout, f.name)) for f in dataclasses.fields(Rollout)
                                               if isinstance(getattr(rollout, f.name), torch.Tensor)})

    monkeypatch.setattr(HFGenerator, "generate", generate_on_device)
    model_logprobs = on_device(logprobs.completion_logprobs)
    for module in (logprobs, pg, rebel):
        monkeypatch.setattr(module, "completion_logprobs", model_logprobs)
    monkeypatch.setattr(Critic, "forward", on_device(Critic.forward))
    with fake_accelerator():
        yield


def test_the_stand_in_refuses_a_cpu_tensor_beside_a_device_tensor():
    """What every GPU run did at its first iteration: CPU scores minus a KL penalty on the device."""
    with fake_accelerator():
        kl = torch.ones(4, device=DEVICE)
        assert isinstance(kl, FakeDeviceTensor) and kl.device == DEVICE
        with pytest.raises(RuntimeError, match="same device"):
            torch.tensor([1.0, 2.0, 3.0, 4.0]) - 0.05 * kl
        assert (torch.tensor([1.0, 2.0, 3.0, 4.0], device=kl.device) - 0.05 * kl).tolist() == pytest.approx([0.95, 1.95, 2.95, 3.95])
        assert kl[torch.tensor([0, 2])].sum().item() == 2.0  # a CPU index may index a device tensor, as on a GPU
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(4)[torch.arange(2, device=DEVICE)]  # ... but not the other way round


@pytest.mark.parametrize("algo", list(ALGOS))
def test_each_loop_runs_with_its_tensors_on_an_accelerator(tmp_path, monkeypatch, on_accelerator, algo):
    prompts = setup_task(tmp_path, monkeypatch)
    run_dir = tmp_path / algo
    args = [*TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", "iterations=2", "update.epochs=1", "eval.every=1", *ALGOS[algo]]
    assert main(["train", *args]) == 0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert len(read_jsonl(run_dir / "eval.jsonl")) == 3


def test_refuel_runs_with_its_tensors_on_an_accelerator(tmp_path, monkeypatch, on_accelerator):
    setup_task(tmp_path, monkeypatch)
    run_dir = tmp_path / "refuel"
    assert main(["train", *REFUEL_ARGS, f"run_dir={run_dir}", "iterations=2", "update.epochs=1", "eval.every=1"]) == 0
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2


@pytest.mark.parametrize("algo", ["rebel", "ppo", "rloo"])
def test_dataset_reset_runs_with_its_tensors_on_an_accelerator(tmp_path, monkeypatch, on_accelerator, algo):
    prompts = setup_task(tmp_path, monkeypatch)
    data = tmp_path / "replies.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": "all good here", "rejected": "no"}) + "\n" for p in dict.fromkeys(PROMPTS)))
    run_dir = tmp_path / algo
    args = [*TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", "iterations=2", "update.epochs=1", "eval.every=1", f"algo={algo}",
            f"reset.data={data}"]
    assert main(["train", *args]) == 0
    assert all(m["reset/frac"] == 1.0 for m in read_jsonl(run_dir / "metrics.jsonl"))
