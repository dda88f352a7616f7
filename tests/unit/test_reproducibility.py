"""The same config gives the same numbers whatever else the machine is doing."""

import os
import shutil
import subprocess
import sys

import pytest

from rebelrl.cli import main
from tests.tiny_run import TINY_ARGS, read_jsonl, setup_task, strip_timings

# getloadavg() reporting a loaded machine. libgomp sizes each OpenMP team from the 15-minute load
# average when dynamic adjustment is on, and a test cannot raise that average in seconds.
LOAD_SHIM = """
#include <stdlib.h>
int getloadavg(double loadavg[], int nelem) {
    for (int i = 0; i < nelem; i++) loadavg[i] = 64.0;
    return nelem;
}
"""

BUSY = "import torch, time\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"

REPORT_THEN_TRAIN = """
import os, sys
from rebelrl.train.threads import openmp_runtimes
print("load", os.getloadavg()[2], "dynamic", [r.omp_get_dynamic() for r in openmp_runtimes()], flush=True)
from rebelrl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("cc") is None, reason="the load shim needs Linux and a C compiler")
def test_metrics_do_not_depend_on_machine_load(tmp_path, monkeypatch):
    """One run alone; the same run beside a process doing matmuls on every core, with OMP_DYNAMIC=true
    (as some clusters set it) and a machine that reports a high load. Before the thread count was
    pinned, the loaded run's reductions ran on a team of 1 instead of 2 and its losses differed from
    iteration 2 on."""
    prompts = setup_task(tmp_path, monkeypatch)
    shim = tmp_path / "load_shim.so"
    (tmp_path / "load_shim.c").write_text(LOAD_SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "load_shim.c")], check=True)
    args = ["train", *TINY_ARGS, f"task.prompts={prompts}", "iterations=2"]

    assert main([*args, f"run_dir={tmp_path / 'alone'}"]) == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "OMP_DYNAMIC": "true", "LD_PRELOAD": str(shim)}
    busy = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        loaded = subprocess.run(
            [sys.executable, "-c", REPORT_THEN_TRAIN, *args, f"run_dir={tmp_path / 'loaded'}"],
            env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        busy.kill()
        busy.wait()
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.startswith("load 64.0 dynamic [1]"), loaded.stdout  # the conditions the run met

    for name in ("metrics.jsonl", "eval.jsonl"):
        assert strip_timings(read_jsonl(tmp_path / "loaded" / name)) == strip_timings(read_jsonl(tmp_path / "alone" / name)), name
