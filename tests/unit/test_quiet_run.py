"""A run prints no warnings of rebelrl's making: no deprecated library call, no FutureWarning. Run in a
fresh process, because libraries print each deprecation once per process (a test before this one
would have used it up)."""

import subprocess
import sys

from tests.tiny_run import TINY_ARGS, setup_task


def test_a_run_prints_no_warnings(tmp_path, monkeypatch):
    prompts = setup_task(tmp_path, monkeypatch)
    args = [*TINY_ARGS, f"task.prompts={prompts}", f"run_dir={tmp_path / 'run'}", "iterations=2", "model.lora_r=4"]
    done = subprocess.run([sys.executable, "-W", "default", "-m", "rebelrl.cli", "train", *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    noisy = [line for line in lines if any(word in line for word in ("Warning", "deprecated", "will be removed"))]
    assert not noisy, noisy
