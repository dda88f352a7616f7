"""Offline data inside RL, at small scale: dataset reset (DR-PO), a guide rolling in and out (RLGF) and
A-LoL, each against its no-data twin, on a reasoning-gym task whose reference answers the data holds.

One command builds it all from a fresh checkout, in ``--out`` (default ``runs/data-in-rl``):

1. data: the task's training prompts with their reference replies (``<answer>X</answer>``, a
   demonstration file with the reasoning-gym entry in an ``entry`` column, so the task's checker scores
   the rows), and a noisy offline set: each prompt with its reference reply and a wrong one (the answer
   off by 1 to 3) as two demonstration rows, and the same as a (chosen, rejected) pair file.
2. ``reset``: PPO and REBEL with and without ``reset.data`` (the reference replies), reward on the
   held-out prompts against the tokens the policy generated.
3. ``guide``: SFT on the reference replies (``rebelrl train algo=sft``) makes a guide better than the
   initial policy; PPO with it rolling in (PPO++) and rolling out (AggreVaTeD), against PPO
   alone, reward against completions (the guide's count).
4. ``alol``: A-LoL, SFT on every row and DPO on the pairs of the noisy set, reward against steps.

Every run starts from SmolLM2-135M-Instruct, is judged on the same held-out prompts by the task's
checker (the share answered right: no penalty for unfinished replies) and shares the initial
evaluation. A finished run is read back; an unfinished one resumes. It writes ``report.md`` (tables:
initial, final and best held-out reward, mean ± sd over seeds, and each run's wall time) and
``reset.png``, ``guide.png``, ``alol.png``.

    python benchmarks/offline_data_in_rl.py --seeds 0 1 2                 # what the README reports
    python benchmarks/offline_data_in_rl.py --claims alol --seeds 0       # one claim
    python benchmarks/offline_data_in_rl.py --seeds 0 1 2 --report-only  # the report of the runs that finished
    python benchmarks/offline_data_in_rl.py --seeds 0 model.name=PATH threads=1   # overrides go to every run
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from _runs import ROOT, jsonl, mean_curve, mean_sd, train

sys.path.insert(0, str(ROOT / "src"))

INSTRUCTION = "Give only the final answer inside <answer></answer> tags."
ONLINE = [  # what every online run shares: 16 prompts an iteration, two replies each, 8 an optimizer step, one pass
    "rollout.prompts_per_iter=16", "rollout.samples_per_prompt=2", "rollout.temperature=0.7", "rollout.max_new_tokens=16",
    "rollout.batch_size=32", "update.epochs=1", "update.minibatch_size=8", "update.micro_batch_size=8",
]
PPO = ["algo=ppo", "ppo.kl_coef=0.02"]
REBEL = ["algo=rebel", "rebel.eta=3.0", "rebel.kl_coef=0.02"]
CLAIMS = ("reset", "guide", "alol")


def task_args(args) -> list[str]:
    kwargs = json.dumps({"min_terms": 2, "max_terms": 2, "min_digits": args.digits, "max_digits": args.digits}).replace(" ", "")
    return ["reward.no_eos_penalty=null", "task.name=reasoning-gym", "task.dataset=chain_sum", f"task.dataset_kwargs={kwargs}", f"task.instruction={INSTRUCTION}",
            f"task.n_train={args.prompts}", f"task.n_eval={args.eval_prompts}"]


def write_data(out: Path, args) -> dict[str, Path]:
    """The reference replies and the noisy set, for the task's own training and held-out prompts."""
    from rebelrl.config import load_config
    from rebelrl.envs.tasks import build_task
    from rebelrl.train.checkpoint import write_atomic
    from rebelrl.train.config import TrainConfig

    files = {name: out / f"{name}.jsonl" for name in ("reference", "reference_eval", "noisy", "noisy_pairs", "noisy_pairs_eval")}
    if all(p.exists() for p in files.values()):
        return files
    task = build_task(load_config(TrainConfig, None, task_args(args)).task)
    rng = random.Random(0)

    def wrong(answer: str) -> str:
        return str(int(answer) + rng.choice([-3, -2, -1, 1, 2, 3]))

    def rows(prompts, noisy: bool, pairs: bool) -> list[dict]:
        result = []
        for conversation in prompts:
            entry = conversation.meta["entry"]
            chat, right, bad = conversation.to_chat(), f"<answer>{entry['answer']}</answer>", f"<answer>{wrong(entry['answer'])}</answer>"
            if pairs:
                result.append({"prompt": chat, "chosen": right, "rejected": bad, "entry": entry})
            else:
                result += [{"messages": [*chat, {"role": "assistant", "content": reply}], "entry": entry} for reply in ([right, bad] if noisy else [right])]
        return result

    content = {"reference": rows(task.train, False, False), "reference_eval": rows(task.eval, False, False), "noisy": rows(task.train, True, False),
               "noisy_pairs": rows(task.train, True, True), "noisy_pairs_eval": rows(task.eval, True, True)}
    for name, path in files.items():  # whole files or none: a second job started beside this one reads them back or writes the same
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in content[name]))
    return files


def runs_of(args, files: dict[str, Path], guide_model: Path | None) -> dict[str, dict[str, list[str]]]:
    """claim -> method -> overrides (besides the seed and the run directory)."""
    online = [*task_args(args), *ONLINE, "reward.fn=reasoning_gym", f"iterations={args.iterations}", f"eval.every={args.iterations // args.evals}"]
    reset = [f"reset.data={files['reference']}", "reset.field=completion"]
    guide = [f"guide.model={guide_model}"]
    steps = args.epochs * args.prompts * 2 // 8  # A-LoL and SFT: two rows a prompt; DPO: one pair a prompt, as many steps of 4
    demos = ["task.name=demonstrations", f"task.data={files['noisy']}", f"task.eval_data={files['reference_eval']}"]
    pairs = ["task.name=preferences", f"task.data={files['noisy_pairs']}", f"task.eval_data={files['noisy_pairs_eval']}"]
    offline = ["reward.fn=reasoning_gym", "reward.no_eos_penalty=null", f"iterations={steps}", f"eval.every={steps // args.evals}", f"task.n_eval={args.eval_prompts}",
               "rollout.temperature=0.7", "rollout.max_new_tokens=16", "rollout.batch_size=32", f"optim.lr={args.offline_lr}"]
    return {
        "reset": {"PPO": [*online, *PPO], "PPO + reset": [*online, *PPO, *reset],
                  "REBEL": [*online, *REBEL], "REBEL + reset": [*online, *REBEL, *reset]},
        "guide": {"PPO": [*online, *PPO], "PPO++ (roll-in)": [*online, *PPO, *guide, "guide.mode=rollin"],
                  "AggreVaTeD (roll-out)": [*online, *PPO, *guide, "guide.mode=rollout"]},
        "alol": {"A-LoL": [*demos, *offline, "algo=alol", "update.minibatch_size=8", "update.micro_batch_size=8"],
                 "SFT (all rows)": [*demos, *offline, "algo=sft", "update.minibatch_size=8", "update.micro_batch_size=8"],
                 "DPO": [*pairs, *offline, "algo=dpo", "dpo.beta=0.1", "update.minibatch_size=4", "update.micro_batch_size=4"]},
    }


def sft_guide(out: Path, files: dict[str, Path], args, log: Path) -> tuple[Path, float | None]:
    """SFT on the reference replies: the guide's model folder (its last checkpoint's) and the run's wall time."""
    run_dir = out / "sft-guide"
    steps = args.guide_epochs * args.prompts // 8
    seconds = train(run_dir, ["algo=sft", "reward.no_eos_penalty=null", "task.name=demonstrations", f"task.data={files['reference']}", f"task.eval_data={files['reference_eval']}",
                              f"task.n_eval={args.eval_prompts}", "reward.fn=reasoning_gym", f"iterations={steps}", f"eval.every={steps}",
                              "rollout.temperature=0.7", "rollout.max_new_tokens=16", "rollout.batch_size=32", f"optim.lr={args.offline_lr}",
                              "update.minibatch_size=8", "update.micro_batch_size=8", "checkpoint.every=0", "checkpoint.keep_last=1",
                              "seed=0", *args.overrides], log)
    return max((run_dir / "checkpoints").glob("iter-*")) / "model", seconds


def generated_tokens(run_dir: Path) -> list[tuple[float, float]]:
    """(tokens the policy and the guide generated so far, held-out reward) at each evaluation; forced dataset tokens are not generated."""
    spent, at = 0.0, {0: 0.0}
    for row in jsonl(run_dir / "metrics.jsonl"):
        policy = row["completions"] - row.get("guide/completions", 0)
        spent += policy * (row["response_length"] - row.get("reset/forced_tokens", 0.0)) + row.get("guide/tokens", 0.0)
        at[row["iteration"]] = spent
    return [(at[r["iteration"]], r["reward_mean"]) for r in jsonl(run_dir / "eval.jsonl")]


def completions(run_dir: Path) -> list[tuple[float, float]]:
    """(completions so far, the guide's included, held-out reward) at each evaluation."""
    spent, at = 0.0, {0: 0.0}
    for row in jsonl(run_dir / "metrics.jsonl"):
        spent += row["completions"]
        at[row["iteration"]] = spent
    return [(at[r["iteration"]], r["reward_mean"]) for r in jsonl(run_dir / "eval.jsonl")]


def steps(run_dir: Path) -> list[tuple[float, float]]:
    return [(r["iteration"], r["reward_mean"]) for r in jsonl(run_dir / "eval.jsonl")]


AXES = {"reset": (generated_tokens, "tokens generated"), "guide": (completions, "completions (the guide's included)"), "alol": (steps, "optimizer steps")}
TITLES = {"reset": "Dataset reset (DR-PO) on chain sums", "guide": "A guide rolling in / out (RLGF)", "alol": "A-LoL on a noisy offline set"}


def report(out: Path, claims: dict[str, dict], args, walls: dict, guide_eval: list[dict] | None) -> None:
    from matplotlib.figure import Figure

    lines = ["# Offline data inside RL", "", f"SmolLM2-135M-Instruct on reasoning-gym chain_sum (two terms of {args.digits} digits, "
             f"answer only); {args.prompts} training prompts, {args.eval_prompts} held-out; seeds {args.seeds}; last command: "
             f"`python benchmarks/offline_data_in_rl.py {' '.join(sys.argv[1:])}`.", "",
             "Held-out reward: the share of held-out prompts answered right (one sample each, temperature 0.7). Mean ± sd over seeds.", ""]
    if guide_eval:
        lines += [f"The guide (SFT on the reference replies): held-out reward {guide_eval[0]['reward_mean']:.3f} -> {guide_eval[-1]['reward_mean']:.3f}.", ""]
    for claim, methods in claims.items():
        axis, label = AXES[claim]
        lines += [f"## {TITLES[claim]}", "", f"| method | seeds | initial | best evaluation | final | KL, final | {label}, total | wall time a run (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        fig = Figure(figsize=(6.5, 4.2))
        ax = fig.add_subplot()
        for name in methods:
            dirs = [out / run_name(claim, name, seed) for seed in args.seeds if (out / run_name(claim, name, seed) / "report.md").exists()]
            if not dirs:
                continue
            curves = [axis(d) for d in dirs]
            kls = [jsonl(d / "eval.jsonl")[-1]["kl_to_ref"] for d in dirs]
            wall = [walls.get(str(d)) for d in dirs]
            wall_text = mean_sd([w for w in wall if w is not None]) if all(w is not None for w in wall) else "-"
            lines.append(f"| {name} | {len(dirs)} | {mean_sd([c[0][1] for c in curves])} | {mean_sd([max(y for _, y in c) for c in curves])} | "
                         f"{mean_sd([c[-1][1] for c in curves])} | {mean_sd(kls)} | {mean_sd([c[-1][0] for c in curves])} | {wall_text} |")
            ax.plot(*zip(*mean_curve(curves)), "o-", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out reward (share right)")
        seeds = f"mean over {len(args.seeds)} seeds" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
        ax.set_title(f"{TITLES[claim]} ({seeds})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{claim}.png", dpi=120)
        lines += ["", f"![{claim}]({claim}.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


def run_name(claim: str, method: str, seed: int) -> str:
    slug = method.lower().replace(" + ", "-").replace(" ", "-").replace("(", "").replace(")", "").replace("+", "p")
    return f"{'online' if claim != 'alol' else 'offline'}/{slug}-seed{seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/data-in-rl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--claims", nargs="+", choices=CLAIMS, default=list(CLAIMS))
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of each claim's methods")
    parser.add_argument("--digits", type=int, default=2, help="chain sums of two terms of N digits each")
    parser.add_argument("--prompts", type=int, default=256, help="training prompts")
    parser.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts")
    parser.add_argument("--iterations", type=int, default=8, help="iterations of each online run")
    parser.add_argument("--evals", type=int, default=2, help="held-out evaluations a run besides the initial one")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the noisy set (A-LoL, SFT, DPO)")
    parser.add_argument("--guide-epochs", type=int, default=2, help="passes of the guide's SFT over the reference replies")
    parser.add_argument("--offline-lr", type=float, default=1e-5)
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the runs that finished")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every training run (e.g. threads=1)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.log"
    files = write_data(out, args)
    walls: dict[str, float | None] = {}
    guide_model, guide_eval = None, None
    if "guide" in args.claims and not (args.report_only and not (out / "sft-guide" / "report.md").exists()):
        print("== the guide: SFT on the reference replies", flush=True)
        guide_model, walls["guide"] = sft_guide(out, files, args, log)
        guide_eval = jsonl(out / "sft-guide" / "eval.jsonl")
    plan = runs_of(args, files, guide_model)
    claims = {c: {m: o for m, o in plan[c].items() if args.methods is None or m in args.methods} for c in args.claims}
    initial: dict[str, Path] = {}  # online / offline-demonstrations / offline-pairs: the first run's initial evaluation serves the rest
    for seed in args.seeds:  # seed by seed: an interrupted benchmark has every method at the seeds it finished
        for claim, methods in claims.items():
            for name, overrides in methods.items():
                run_dir = out / run_name(claim, name, seed)
                if str(run_dir) in walls or (args.report_only and not (run_dir / "report.md").exists()):
                    continue
                kind = next(o for o in overrides if o.startswith("task.name="))
                shared = [f"eval.initial_from={initial[kind]}"] if kind in initial and (initial[kind] / "eval.jsonl").exists() else []
                print(f"== {claim}: {name}, seed {seed}", flush=True)
                walls[str(run_dir)] = train(run_dir, [*overrides, f"seed={seed}", "checkpoint.every=0", "checkpoint.keep_last=1", *shared,
                                                      *args.overrides], log)
                print(f"   {walls[str(run_dir)]:.0f} s; held-out reward {[round(y, 3) for _, y in steps(run_dir)]}", flush=True)
                initial.setdefault(kind, run_dir)
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights and optimizer state: the report needs none
    report(out, claims, args, walls, guide_eval)


if __name__ == "__main__":
    main()
