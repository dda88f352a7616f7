"""REFUEL against the single-turn baselines on the same multi-turn task, budget and seeds.

Runs each config with ``rebelrl train`` (one after the other: they share the CPU) and prints the
per-turn win rate against the initial policy of each method's final evaluation, the REFUEL paper's
table. Every run starts from the same model and evaluates the same held-out games with the same
sampling seed, so all win rates are against the same initial dialogues.

    python benchmarks/refuel_vs_baselines.py                  # guess-my-number, configs/number_*.yaml
    python benchmarks/refuel_vs_baselines.py --task secret    # the secret-animal game, configs/secret_*.yaml
    python benchmarks/refuel_vs_baselines.py iterations=4     # overrides go to every run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"REFUEL": "refuel", "single-turn REBEL": "rebel_turn", "single-turn DPO": "dpo_turn"}  # configs/{task}_{name}.yaml


def last_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    return rows[-1]


def table(results: dict[str, dict], horizon: int) -> str:
    head = "| method | " + " | ".join(f"h={h}" for h in range(1, horizon + 1)) + " | reward at H | KL to ref |"
    lines = [head, "|---" * (horizon + 3) + "|"]
    for name, e in results.items():
        cells = [f"{e[f'win_rate_turn_{h}']:.3f}" for h in range(1, horizon + 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['reward_mean']:.3f} | {e['kl_to_ref']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["number", "secret"], default="number", help="configs/{task}_*.yaml")
    parser.add_argument("--out", default=None, help="parent folder of the runs (default runs/compare-{task})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    results, horizon = {}, None
    out = Path(args.out or f"runs/compare-{args.task}")
    for name, suffix in METHODS.items():
        config = f"configs/{args.task}_{suffix}.yaml"
        run_dir = out / suffix
        if not (run_dir / "report.md").exists():
            cmd = [sys.executable, "-m", "rebelrl.cli", "train", str(ROOT / config), f"run_dir={run_dir}", *args.overrides]
            if (run_dir / "checkpoints").exists():
                cmd.append("--resume")
            print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, check=True)
        results[name] = last_eval(run_dir)
        horizon = sum(key.startswith("win_rate_turn_") for key in results[name])
    print("\nwin rate against the initial policy at each turn h (final evaluation):\n")
    print(table(results, horizon))


if __name__ == "__main__":
    main()
