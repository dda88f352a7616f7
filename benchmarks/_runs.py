"""What the benchmarks that train several runs share: launching ``rebelrl``, resuming an unfinished run
and reading a finished one back, and the mean ± sd over seeds they report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WALL = "testbed_wall_seconds.json"  # written next to each run's own files: its wall time, kept for later reports


def rebelrl(*args: str, log: Path) -> float:
    """Run ``rebelrl`` with ``args``, its output appended to ``log``; returns the wall time in seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "rebelrl.cli", *args], check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - t0


def train(run_dir: Path, args: list[str], log: Path) -> float | None:
    """Train (or resume) the run unless it finished; returns its wall time over every launch, None if unknown."""
    wall = run_dir / WALL
    if not (run_dir / "report.md").exists():
        before = json.loads(wall.read_text()) if wall.exists() else 0.0
        seconds = rebelrl("train", *args, f"run_dir={run_dir}", *(["--resume"] if run_dir.exists() else []), log=log)
        wall.write_text(json.dumps(before + seconds))
    return json.loads(wall.read_text()) if wall.exists() else None


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_sd(values: list[float]) -> str:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return f"{mean:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mean:.3f}"


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Point-wise mean over seeds of (x, y) curves, cut to the shortest."""
    n = min(len(c) for c in curves)
    return [(sum(c[i][0] for c in curves) / len(curves), sum(c[i][1] for c in curves) / len(curves)) for i in range(n)]
