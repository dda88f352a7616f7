"""REFUEL against the single-turn baselines on the same multi-turn task, budget and seeds.

Trains each method with ``rebelrl train`` on ``configs/{task}.yaml`` (one after the other: they share
the CPU); the baselines are that config with the overrides in ``METHODS``. It prints, for
each method's final evaluation, the win rate against the initial policy at every turn h (the REFUEL
paper's table) and the reward of the dialogue cut after turn h, each with its standard error over the
held-out games (and seeds). Every run starts from the same model and plays the same held-out games
with the same sampling seed, so all win rates are against the same initial dialogues. The per-turn
curves are saved as ``per_turn.png`` next to the runs.

    python benchmarks/refuel_vs_baselines.py                   # guess-my-number with hints, configs/hint.yaml
    python benchmarks/refuel_vs_baselines.py --task number     # plain guess-my-number, configs/number.yaml
    python benchmarks/refuel_vs_baselines.py --seeds 0 1 2     # three training seeds per method
    python benchmarks/refuel_vs_baselines.py iterations=4      # overrides go to every run
    python benchmarks/refuel_vs_baselines.py --methods REFUEL "single-turn REBEL"

A run whose report exists is read, not retrained; one started but unfinished is resumed (from scratch if it has no checkpoint).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rebelrl.eval import read_jsonl, win_outcomes  # noqa: E402
from rebelrl.eval.dialogue import load_turn_scores  # noqa: E402

SINGLE_TURN = ["refuel.rollin=reference", "refuel.target=turn"]  # earlier turns fixed, each reply judged at its turn
METHODS = {  # name: (run folder, overrides of configs/{task}.yaml)
    "REFUEL": ("refuel", []),
    "single-turn REBEL": ("rebel_turn", SINGLE_TURN),
    "single-turn DPO": ("dpo_turn", [*SINGLE_TURN, "refuel.loss=dpo"]),
}


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean over the first dimension."""
    n = x.shape[0]
    return x.mean().item(), (x.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan")


def summarize(run_dirs: list[Path]) -> dict:
    """Per-turn win rate against the initial policy and reward of the runs' last evaluations, each
    game (and seed) one sample; the initial evaluation's per-turn reward; the mean KL to the reference."""
    initial = torch.cat([load_turn_scores(d / "eval_initial.jsonl") for d in run_dirs])  # (N * seeds, H)
    final = torch.cat([load_turn_scores(d / "eval_samples_latest.jsonl") for d in run_dirs])
    wins = win_outcomes(final, initial)
    kls = [read_jsonl(d / "eval.jsonl")[-1]["kl_to_ref"] for d in run_dirs]
    horizon = wins.shape[1]
    return {
        "win": [mean_se(wins[:, h]) for h in range(horizon)],
        "reward": [mean_se(final[:, h]) for h in range(horizon)],
        "initial_reward": initial.mean(0).tolist(),
        "kl": sum(kls) / len(kls),
        "games": wins.shape[0],
    }


def table(results: dict[str, dict]) -> str:
    initial_reward = next(iter(results.values()))["initial_reward"]  # every run starts from the same policy
    horizon = len(initial_reward)
    head = "| method | " + " | ".join(f"win rate h={h}" for h in range(1, horizon + 1))
    head += " | " + " | ".join(f"reward at h={h}" for h in range(1, horizon + 1)) + " | KL to ref |"
    lines = [head, "|---" * (2 * horizon + 2) + "|"]
    cells = ["0.500"] * horizon + [f"{v:.3f}" for v in initial_reward]
    lines.append("| initial policy | " + " | ".join(cells) + " | 0 |")
    for name, r in results.items():
        cells = [f"{m:.3f} ± {se:.3f}" for m, se in r["win"]] + [f"{m:.3f} ± {se:.3f}" for m, se in r["reward"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['kl']:.2f} |")
    return "\n".join(lines)


def seed_table(per_seed: dict[str, list[dict]]) -> str:
    """Each seed's win rate and reward at every turn, and their mean ± sd over seeds: the spread a new seed would show."""
    horizon = len(next(iter(per_seed.values()))[0]["win"])
    head = "| method | seeds | " + " | ".join(f"win rate h={h}" for h in range(1, horizon + 1)) + f" | reward at h={horizon} | KL to ref |"
    lines = [head, "|---" * (horizon + 4) + "|"]
    for name, results in per_seed.items():
        def cell(values):
            t = torch.tensor(values)
            return f"{t.mean():.3f} ± {t.std(unbiased=True):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
        wins = [cell([r["win"][h][0] for r in results]) for h in range(horizon)]
        lines.append(f"| {name} | {len(results)} | " + " | ".join(wins) + f" | {cell([r['reward'][-1][0] for r in results])} | "
                     f"{cell([r['kl'] for r in results])} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, r in results.items():
        turns = list(range(1, len(r["win"]) + 1))
        ax.errorbar(turns, [m for m, _ in r["win"]], yerr=[se for _, se in r["win"]], marker="o", capsize=3, label=name)
        ax.set_xticks(turns)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("turn h")
    ax.set_ylabel("win rate vs initial policy")
    ax.set_ylim(0, 1)
    ax.set_title("Per-turn win rate (± standard error)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["hint", "number", "secret"], default="hint", help="configs/{task}.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds per method (default: 0)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="which methods (default: all)")
    parser.add_argument("--out", default=None, help="parent folder of the runs (default runs/compare-{task})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out or f"runs/compare-{args.task}")
    config = ROOT / f"configs/{args.task}.yaml"
    methods = {name: METHODS[name] for name in args.methods}
    runs: dict[str, list[Path]] = {name: [] for name in methods}
    initial_from = None  # the first finished run's initial evaluation serves every later one (same model, games, seed)
    for seed in args.seeds:  # seed by seed, so that an interrupted benchmark has every method at the seeds it finished
        for name, (suffix, method_overrides) in methods.items():
            run_dir = out / (suffix if args.seeds == [0] else f"{suffix}-seed{seed}")
            runs[name].append(run_dir)
            if not (run_dir / "report.md").exists():
                cmd = [sys.executable, "-m", "rebelrl.cli", "train", str(config), f"run_dir={run_dir}", f"seed={seed}", *method_overrides, *args.overrides]
                if initial_from is not None:
                    cmd.append(f"eval.initial_from={initial_from}")
                if run_dir.exists():
                    cmd.append("--resume")
                print(f"== {name}, seed {seed}: {' '.join(cmd[2:])}", flush=True)
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
                print(f"== {name}, seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            initial_from = initial_from or run_dir
    results = {name: summarize(run_dirs) for name, run_dirs in runs.items()}
    games = next(iter(results.values()))["games"]
    print(f"\nFinal evaluation against the initial policy, {games} held-out games (x seeds), mean ± standard error:\n")
    print(table(results))
    if len(args.seeds) > 1:
        print("\nAcross seeds (each seed's mean over the games; mean ± sd over seeds):\n")
        print(seed_table({name: [summarize([d]) for d in run_dirs] for name, run_dirs in runs.items()}))
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "per_turn.png")
    print(f"\nplot: {out / 'per_turn.png'}")


if __name__ == "__main__":
    main()
