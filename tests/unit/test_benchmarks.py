"""The benchmarks' own plumbing, which no other test reaches: they would fail only when run."""

import importlib.util
import sys
from pathlib import Path

from rebelrl.algos.run import Run
from rebelrl.envs import build_task
from rebelrl.train.distributed import ONE_PROCESS

ROOT = Path(__file__).resolve().parents[2]


def _vs_trl():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_is_fed_the_prompts_rebelrl_trains_on(monkeypatch):
    """vs_trl gives TRL each iteration's prompts in rebelrl's data order, read off ``Run`` itself."""
    vs_trl = _vs_trl()
    monkeypatch.setattr(sys, "argv", ["vs_trl.py", "--iterations", "3", "--prompts", "4"])
    cfg = vs_trl.train_config(vs_trl.parse_args(), "unused", seed=0)
    batches = vs_trl.iteration_prompts(cfg)
    run = Run.__new__(Run)
    run.cfg, run.task, run.processes = cfg, build_task(cfg.task), ONE_PROCESS
    assert batches == [run.prompts_for(i) for i in (1, 2, 3)]
    assert [len(b) for b in batches] == [4, 4, 4] and batches[0] != batches[1]


def test_the_vllm_and_lora_rows_configure_what_they_name(monkeypatch):
    vs_trl = _vs_trl()
    monkeypatch.setattr(sys, "argv", ["vs_trl.py"])
    args = vs_trl.parse_args()
    bf16 = vs_trl.train_config(args, "unused", 0, vllm=vs_trl.VLLM_METHODS["rebelrl-vllm-bf16"])
    assert (bf16.rollout.backend, bf16.rollout.vllm_dtype, bf16.model.dtype, bf16.model.lora_r) == ("vllm", "bfloat16", "float32", 0)
    adapter = vs_trl.train_config(args, "unused", 0, vllm="float32", lora=vs_trl.LORA_METHODS["rebelrl-vllm-lora-adapter"])
    assert (adapter.model.lora_r, adapter.rollout.vllm_lora) == (16, "adapter")
    eager = vs_trl.train_config(args, "unused", 0, vllm=vs_trl.VLLM_METHODS["rebelrl-vllm-eager"], eager=True)
    assert (eager.rollout.vllm_dtype, eager.rollout.vllm_eager, bf16.rollout.vllm_eager) == ("float32", True, False)
    assert args.methods == ["rebelrl", "rebelrl-lean", "trl-grpo", "trl-rloo"]  # as the docstring says
    plain_lora = vs_trl.train_config(args, "unused", 0, lora=vs_trl.LORA_METHODS["rebelrl-lora"])
    assert (plain_lora.model.lora_r, plain_lora.rollout.backend) == (16, "hf")
