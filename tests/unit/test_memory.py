"""Freed memory goes back to the system: between phases always, at once when asked (glibc only)."""

import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from rebelrl.models import tiny_model, tiny_tokenizer
from rebelrl.train.memory import _glibc_call

glibc = pytest.mark.skipif(platform.system() != "Linux" or _glibc_call("malloc_trim") is None, reason="needs glibc's malloc")

# A child process, so that the allocator settings stay out of the test process. It fills the heap
# with 4 MB tensors, frees every other one (holes no 8 MB tensor fits in), keeps the rest alive,
# and reports the resident memory (MB) before and after the call under test.
CHILD = textwrap.dedent("""
    import sys, torch
    from rebelrl.train.memory import free_at_once, release_free_memory

    def rss():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

    mode = sys.argv[1]
    if mode == "at_once":
        assert free_at_once()
    big = torch.ones(16 * 2**20 // 4)  # freed first: glibc's own threshold then rises above 4 MB
    del big
    kept, holes = [], []
    for i in range(100):
        (kept if i % 2 else holes).append(torch.ones(2**20))  # 4 MB each, touched
    del holes
    before = rss()
    if mode == "trim":
        assert release_free_memory()
    print(before, rss(), sum(t.numel() for t in kept) * 4 / 2**20)
""")


def _child(mode: str) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    return tuple(float(x) for x in out.split())


@glibc
def test_freed_holes_stay_resident_until_released_between_phases():
    held_before, held_after, kept = _child("none")
    before, after, _ = _child("trim")
    assert held_after > held_before - 50  # 200 MB of freed 4 MB holes stay resident by default
    assert before - after > 150  # and release_free_memory gives them back
    assert kept == 200


@glibc
def test_at_once_returns_each_freed_tensor_immediately():
    before, _, _ = _child("at_once")
    by_default, _, _ = _child("none")
    assert by_default - before > 150  # the holes were never resident: 200 MB less than by default


def test_lean_mode_trains_the_same_weights(tmp_path, monkeypatch):
    """activation checkpointing and free_memory=at_once through the real CLI: the same updates as the
    default (plain SGD, so a changed gradient shows), and the allocator setting asked for once."""
    from safetensors.torch import load_file

    from rebelrl.algos import run as run_module
    from rebelrl.cli import main
    from tests.tiny_run import PLAIN_SGD_ARGS, TINY_ARGS, setup_task, use_plain_sgd

    use_plain_sgd(monkeypatch)
    asked = []
    monkeypatch.setattr(run_module, "free_at_once", lambda: asked.append(True) or True)  # the setting itself: the child tests above
    prompts = setup_task(tmp_path, monkeypatch)
    common = ["train", *TINY_ARGS, f"task.prompts={prompts}", "iterations=2", *PLAIN_SGD_ARGS]
    assert main([*common, f"run_dir={tmp_path / 'default'}"]) == 0
    assert asked == []
    assert main([*common, f"run_dir={tmp_path / 'lean'}", "model.activation_checkpointing=true", "free_memory=at_once"]) == 0
    assert asked == [True]
    weights = "checkpoints/iter-000002/model/model.safetensors"
    a, b = load_file(tmp_path / "default" / weights), load_file(tmp_path / "lean" / weights)
    initial = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # training moved the weights
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
