"""The over-optimisation testbed, in the style of Gao et al. (2023): a gold reward the methods never
see labels pairs, and each method's gold reward is followed as its KL to the reference grows.

One command builds it all from a fresh checkout, in ``--out`` (default ``runs/overopt``):

1. pairs: ``rebelrl pairs`` samples ``--k`` replies of SmolLM2-135M-Instruct to each chitchat opening,
   scores them with the gold reward (VADER) and labels best against worst with Bradley-Terry noise
   (``--bt-beta``): a noisy rater, as human labels are. Training and held-out prompts get their own files.
2. proxy: ``rebelrl train algo=reward_model`` on those labels (the proxy reward model).
3. offline: DPO, IPO and chi-PO (``dpo.loss``) and HyPO on the same pairs for ``--epochs`` epochs,
   every held-out evaluation judged by the gold reward (``reward.fn=vader``: the methods never read it).
4. online (with ``--online``): REBEL, PPO and RLOO optimise the proxy reward model; ``eval.gold_fn=vader``
   judges the same held-out samples with the gold reward, so gold and proxy reward are read side by side.

It writes ``overoptimization.md``: for each method and seed the gold reward and KL at every
evaluation, the final and the best gold reward (mean ± sd over seeds), and plots of gold reward
against KL (and, for the online methods, proxy reward against KL). A finished run is read back, not
retrained; an unfinished one resumes. The report covers every method whose runs have finished for
all the seeds asked, so methods can be added one command at a time.

    python benchmarks/overoptimization.py                       # 2 seeds, offline methods
    python benchmarks/overoptimization.py --seeds 0 1 2 --online
    python benchmarks/overoptimization.py --prompts 64 --epochs 4 --evals 5 --methods DPO chi-PO IPO HyPO   # what the README reports
    python benchmarks/overoptimization.py --prompts 64 --epochs 4 --evals 3 --online-iterations 6 --online --methods REBEL PPO RLOO
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _runs
from _runs import ROOT, WALL, jsonl, mean_curve, mean_sd, rebelrl

MODEL = "smollm2-135m-instruct"
COMMON = [  # what every run shares: the model, sampling, evaluation
    f"model.name={MODEL}", "rollout.temperature=0.7", "rollout.max_new_tokens=32", "rollout.batch_size=32", "reward.no_eos_penalty=-1",
    "optim.schedule=constant", "optim.max_grad_norm=1.0", "checkpoint.every=0", "checkpoint.keep_last=1",
]
OFFLINE = {  # name: overrides
    "DPO": ["algo=dpo", "dpo.beta=0.1"],
    "IPO": ["algo=dpo", "dpo.loss=ipo", "dpo.beta=0.1"],
    "chi-PO": ["algo=dpo", "dpo.loss=chipo", "dpo.beta=0.1"],
    "HyPO": ["algo=hypo", "dpo.beta=0.1", "hypo.kl_coef=0.1", "rollout.samples_per_prompt=2"],
}
ONLINE = {  # 16 prompts an iteration; every optimizer step sees 16 completions (REBEL: 8 pairs)
    "REBEL": ["algo=rebel", "rebel.eta=3.0", "rebel.kl_coef=0.0", "update.minibatch_size=8", "update.micro_batch_size=8"],
    "PPO": ["algo=ppo", "rollout.samples_per_prompt=2", "ppo.kl_coef=0.0", "update.minibatch_size=16", "update.micro_batch_size=16"],
    "RLOO": ["algo=rloo", "rollout.samples_per_prompt=4", "rloo.kl_coef=0.0", "update.epochs=1", "update.minibatch_size=16",
             "update.micro_batch_size=16"],
}


def train(run_dir: Path, args: list[str], log: Path) -> float | None:
    return _runs.train(run_dir, [*COMMON, *args], log)


def curve(run_dir: Path, key: str) -> list[tuple[float, float]]:
    """(KL to the reference, ``key``) at each evaluation."""
    return [(r["kl_to_ref"], r[key]) for r in jsonl(run_dir / "eval.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/overopt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompts", type=int, default=128, help="training prompts with a pair each")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts (pairs for accuracy, prompts for the gold reward)")
    parser.add_argument("--k", type=int, default=4, help="replies sampled a prompt to make its pair")
    parser.add_argument("--bt-beta", type=float, default=4.0, help="Bradley-Terry label noise: P(best chosen) = sigmoid(bt_beta * gap)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the pairs of each offline run")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--online", action="store_true", help="also REBEL and RLOO on the proxy reward model")
    parser.add_argument("--online-iterations", type=int, default=12)
    parser.add_argument("--methods", nargs="+", default=None, help=f"a subset of {list(OFFLINE) + list(ONLINE)}")
    parser.add_argument("--evals", type=int, default=8, help="held-out evaluations a run, besides the initial one")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every training run (e.g. threads=1)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "testbed.log"
    walls = {}

    pairs, held_out = out / "pairs.jsonl", out / "pairs_eval.jsonl"
    task = ["task.name=chitchat-warm", f"task.n_train={args.prompts}", f"task.n_eval={args.eval_prompts}"]
    for path, split in ((pairs, "train"), (held_out, "eval")):
        if not path.exists():
            print(f"== pairs ({split}): {args.k} replies a prompt, gold reward vader, Bradley-Terry beta {args.bt_beta}", flush=True)
            walls[f"pairs ({split})"] = rebelrl("pairs", f"model={MODEL}", *task, "reward.fn=vader", f"split={split}", f"samples_per_prompt={args.k}",
                                                "max_new_tokens=32", f"bt_beta={args.bt_beta}", f"output={path}", log=log)
    n_pairs = sum(1 for line in pairs.read_text().splitlines() if line.strip())
    data = ["task.name=preferences", f"task.data={pairs}", f"task.eval_data={held_out}", f"task.n_eval={args.eval_prompts}"]
    minibatch = 8
    iterations = max(1, args.epochs * n_pairs // minibatch)
    every = max(1, iterations // args.evals)
    print(f"{n_pairs} training pairs; offline runs: {iterations} steps of {minibatch} pairs ({args.epochs} epochs), evaluated every {every}",
          flush=True)

    proxy = out / "proxy-rm"
    print("== proxy reward model", flush=True)
    walls["proxy reward model"] = train(proxy, [*data, "algo=reward_model", f"iterations={iterations // 2}", f"eval.every={every}",
                                                f"update.minibatch_size={minibatch}", f"update.micro_batch_size={minibatch}",
                                                f"optim.lr={args.lr}"], log)
    methods = dict(OFFLINE)
    if args.online:
        methods.update(ONLINE)
    if args.methods:
        unknown = set(args.methods) - set(OFFLINE) - set(ONLINE)
        if unknown:
            parser.error(f"--methods: unknown {sorted(unknown)}")
        methods = {name: overrides for name, overrides in {**OFFLINE, **ONLINE}.items() if name in args.methods}
    for name, overrides in methods.items():
        for seed in args.seeds:
            run_dir = out / f"{name}-seed{seed}"
            print(f"== {name}, seed {seed}", flush=True)
            if name in OFFLINE:
                run = [*data, *overrides, "reward.fn=vader", f"iterations={iterations}", f"eval.every={every}",
                       f"update.minibatch_size={minibatch}", f"update.micro_batch_size={minibatch}", f"optim.lr={args.lr}"]
            else:
                scorer = "reward.fn=rebelrl.rewards.reward_model:RewardModelScorer.from_pretrained"
                run = [*task, *overrides, scorer, f"reward.kwargs.name_or_path={proxy / 'reward_model'}", "eval.gold_fn=vader",
                       f"iterations={args.online_iterations}", f"eval.every={max(1, args.online_iterations // args.evals)}",
                       "rollout.prompts_per_iter=16", f"optim.lr={args.lr}"]
            walls[f"{name}, seed {seed}"] = train(run_dir, [*run, f"seed={seed}", *args.overrides], log)
    finished = [name for name in {**OFFLINE, **ONLINE} if all((out / f"{name}-seed{seed}" / "report.md").exists() for seed in args.seeds)]
    for name in finished:
        for seed in args.seeds:
            wall = out / f"{name}-seed{seed}" / WALL
            walls.setdefault(f"{name}, seed {seed}", json.loads(wall.read_text()) if wall.exists() else None)
    report(out, finished, args, n_pairs, walls)


def report(out: Path, methods: list[str], args, n_pairs: int, walls: dict) -> None:
    from matplotlib.figure import Figure

    proxy_eval = jsonl(out / "proxy-rm" / "eval.jsonl")
    lines = ["# Over-optimisation testbed", "",
             f"SmolLM2-135M-Instruct; {n_pairs} training pairs ({args.k} samples a prompt, best vs worst by VADER, Bradley-Terry labels "
             f"with beta {args.bt_beta}); seeds {args.seeds}; last command: `python benchmarks/overoptimization.py "
             f"{' '.join(sys.argv[1:])}`.", "",
             f"Proxy reward model, held-out pair accuracy (against the noisy labels): {proxy_eval[0]['rewards/accuracies']:.3f} -> "
             f"{proxy_eval[-1]['rewards/accuracies']:.3f}.", "",
             "Gold reward (VADER, never seen by any method) on the held-out prompts; mean ± sd over seeds:", "",
             "| method | gold reward, initial | gold reward, best evaluation | gold reward, final | KL at the best | KL, final |",
             "|---|---|---|---|---|---|"]
    online = [name for name in methods if name in ONLINE]
    fig = Figure(figsize=(12 if online else 7, 4.5))
    ax = fig.add_subplot(1, 2 if online else 1, 1)
    for name in methods:
        gold = "reward_mean" if name in OFFLINE else "gold_reward_mean"
        curves = [curve(out / f"{name}-seed{seed}", gold) for seed in args.seeds]
        best = [max(c, key=lambda p: p[1]) for c in curves]
        lines.append(f"| {name} | {mean_sd([c[0][1] for c in curves])} | {mean_sd([b[1] for b in best])} | {mean_sd([c[-1][1] for c in curves])} "
                     f"| {mean_sd([b[0] for b in best])} | {mean_sd([c[-1][0] for c in curves])} |")
        ax.plot(*zip(*mean_curve(curves)), "o-", label=name)
    ax.set_xlabel("KL to the reference (nats a reply)")
    ax.set_ylabel("gold reward (VADER) on held-out prompts")
    ax.set_title("Gold reward against KL (mean over seeds)")
    ax.legend(fontsize=8)
    if online:
        lines += ["", "The online methods' proxy reward (the reward model they optimise) beside their gold reward, same evaluations:", "",
                  "| method | proxy reward, initial | proxy reward, final | gold reward, initial | gold reward, final | KL, final |",
                  "|---|---|---|---|---|---|"]
        ax2 = fig.add_subplot(1, 2, 2)
        for name in online:
            proxy = [curve(out / f"{name}-seed{seed}", "reward_mean") for seed in args.seeds]
            gold = [curve(out / f"{name}-seed{seed}", "gold_reward_mean") for seed in args.seeds]
            lines.append(f"| {name} | {mean_sd([c[0][1] for c in proxy])} | {mean_sd([c[-1][1] for c in proxy])} | {mean_sd([c[0][1] for c in gold])} "
                         f"| {mean_sd([c[-1][1] for c in gold])} | {mean_sd([c[-1][0] for c in gold])} |")
            line, = ax2.plot(*zip(*mean_curve(proxy)), "s--", label=f"{name}, proxy")
            ax2.plot(*zip(*mean_curve(gold)), "o-", color=line.get_color(), label=f"{name}, gold")
        ax2.set_xlabel("KL to the reference (nats a reply)")
        ax2.set_ylabel("reward on held-out prompts")
        ax2.set_title("Online methods: proxy (optimised) and gold reward")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_kl.png", dpi=120)
    lines += ["", "![gold reward against KL](gold_vs_kl.png)", "", "Wall time of each run (seconds, every launch of it; '-' unknown):", ""]
    lines += [f"- {step}: {'-' if seconds is None else f'{seconds:.0f}'}" for step, seconds in walls.items()]
    (out / "overoptimization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))



if __name__ == "__main__":
    main()
