"""``rebelrl compare``: several methods on one model and task, at an equal budget of generated
completions, over several seeds, side by side.

Every run is an ordinary ``rebelrl train`` run (its own run directory, resumable), started in its own
process so that its wall time and peak memory are its own. The budget is counted the same way for
every method: completions generated per iteration (prompts x samples a prompt, plus A*-PO's reference
samples of the prompts it meets), so a method that samples 4 a prompt sees half the prompts of one
that samples 2. The initial policy is evaluated once per task; every other run reuses that
evaluation (``eval.initial_from``). A comparison that was interrupted picks up where it stopped:
finished runs are read back, a started one resumes from its last checkpoint.

Output, in ``run_dir`` (new, empty, or marked ``.rebelrl-compare`` by an earlier comparison: a folder
holding anything else is refused): one folder per task with a run per method and seed, ``runs.jsonl`` (wall
time, peak memory and final metrics of each run) and ``comparison.md`` with its plots. Each launch of
a run appends its wall time and peak memory to the run's ``compare_launches.jsonl``; a run resumed
after an interruption is reported with the sum of its launches' wall times and the largest peak.
A run that fails stops the comparison with one line naming it and its log (``<run folder>.log``
beside the run folder, the run's stderr over every launch).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from rebelrl.config import ConfigError, field, from_dict, set_dotted, to_dict
from rebelrl.errors import UserError
from rebelrl.eval import read_jsonl
from rebelrl.train.config import OFFLINE_ALGOS, TrainConfig
from rebelrl.train.validate import validate
from rebelrl.train.run_dir import check_writable, is_run_dir

MARKER = ".rebelrl-compare"
LAUNCHES = "compare_launches.jsonl"


class CompareError(UserError, RuntimeError):
    """A run of the comparison that failed: the message names it, its run folder and its log."""


@dataclass
class CompareConfig:
    run_dir: str = field("runs/compare", "output folder: a folder per task with one run per method and seed, runs.jsonl, comparison.md, plots/")
    base: dict = field({}, "the train config every run starts from (any `rebelrl train` keys)")
    tasks: list[dict] = field([{"name": "task", "overrides": {}}], "tasks to compare on: {name, overrides} (dotted train keys)")
    methods: list[dict] = field([], "methods: {name, overrides} (dotted train keys, e.g. algo: grpo, rollout.samples_per_prompt: 4)")
    budget: int = field(640, "completions generated per run (rollouts plus A*-PO's reference samples)")
    rows_budget: int | None = field(
        None, "offline methods (dpo, hypo, sft, reward_model, alol): rows of the data (pairs or demonstrations) each run trains on, "
        "as iterations of update.minibatch_size rows; the online methods spend `budget` completions"
    )
    seeds: list[int] = field([0, 1], "training seeds per method (evaluation samples are the same for all)")
    threads: int | None = field(None, "CPU threads of each run; null = the runs' own default")
    keep_checkpoints: bool = field(False, "keep each finished run's checkpoints (weights and optimizer state, about 3x the model a run); the report needs none")

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: list at least one {name, overrides}")
        for kind, items in (("tasks", self.tasks), ("methods", self.methods)):
            names = [item.get("name") for item in items]
            if any(not isinstance(n, str) or not n or "/" in n for n in names) or len(set(names)) != len(names):
                raise ValueError(f"{kind}: every entry needs a unique name without '/', got {names}")
            for item in items:
                if set(item) - {"name", "overrides"} or not isinstance(item.get("overrides", {}), dict):
                    raise ValueError(f"{kind}: {item.get('name')!r} takes only name and overrides (a mapping)")
        if self.budget < 1 or not self.seeds:
            raise ValueError("budget must be >= 1 and seeds non-empty")
        validate(self)
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"seeds: {', '.join(map(str, repeated))} listed more than once ({self.seeds}); each seed of a "
                             "method is one run in its own folder, so a repeated seed would resume and replace the first run")


@dataclass
class Plan:
    """One run of the comparison."""

    task: str
    method: str
    seed: int
    cfg: TrainConfig
    run_dir: Path


def plan(cfg: CompareConfig, quick: bool = False) -> list[Plan]:
    """Every run's resolved train config, validated before anything starts; the iteration count of
    each method is the budget divided by the completions one of its iterations generates."""
    runs = []
    seeds = cfg.seeds[:1] if quick else cfg.seeds
    for task in cfg.tasks:
        first = None
        for method in cfg.methods:
            for seed in seeds:
                data = _with(cfg.base, task.get("overrides", {}), method.get("overrides", {}))
                run_dir = Path(cfg.run_dir) / task["name"] / f"{method['name']}-seed{seed}"
                data.update(seed=seed, run_dir=str(run_dir))
                # A comparison keeps no weights unless asked (keep_checkpoints); its tracked runs are one group per task.
                data.setdefault("export", {}).setdefault("at_end", cfg.keep_checkpoints)
                if data.get("log", {}).get("report_to"):
                    data["log"].setdefault("group", f"{Path(cfg.run_dir).name}/{task['name']}")
                    data["log"].setdefault("name", f"{task['name']}/{method['name']}-seed{seed}")
                if cfg.threads is not None:
                    data["threads"] = cfg.threads
                try:
                    probe = from_dict(TrainConfig, data)
                    budget, per_iteration, unit, lower = _budget(cfg, probe)
                    if budget < per_iteration:  # one iteration would already spend more than the budget
                        key = "rows_budget" if unit == "rows" else "budget"
                        raise ConfigError(f"{key}={budget} is less than one iteration's {per_iteration} {unit}: raise the {key} or lower {lower}")
                    data["iterations"] = budget // per_iteration
                    # The runs that sample the held-out prompts share the first one's evaluation of the initial policy.
                    generates = probe.algo != "reward_model" and (probe.algo not in OFFLINE_ALGOS or probe.reward.fn is not None)
                    if first is not None and generates:
                        data.setdefault("eval", {})["initial_from"] = str(first)
                    train_cfg = from_dict(TrainConfig, data)
                except ConfigError as e:
                    raise ConfigError(f"task {task['name']}, method {method['name']}: {e}") from None
                first = first or (run_dir if generates else None)
                runs.append(Plan(task["name"], method["name"], seed, train_cfg, run_dir))
    if cfg.rows_budget is not None and not any(r.cfg.algo in OFFLINE_ALGOS for r in runs):
        raise ConfigError(f"rows_budget={cfg.rows_budget} is the budget of the offline methods (algo {', '.join(OFFLINE_ALGOS)}) "
                          "and no method here is one: it would be ignored; remove it")
    folders = {}
    for run in runs:  # two runs in one folder: the second would resume the first and replace its results
        other = folders.setdefault(run.run_dir, run)
        if other is not run:
            raise ConfigError(f"task {run.task}, method {run.method}, seed {run.seed} and task {other.task}, method "
                              f"{other.method}, seed {other.seed} would both run in {run.run_dir}: give them different names or seeds")
    return runs




def _budget(cfg: CompareConfig, run: TrainConfig) -> tuple[int, int, str, str]:
    """(budget, what one iteration spends of it, its unit, the setting that sets the spend): rows of the
    data for an offline method, generated completions for an online one."""
    if run.algo in OFFLINE_ALGOS:
        if cfg.rows_budget is None:
            raise ConfigError(f"algo={run.algo} trains on rows of a data file: set rows_budget (rows each run trains on)")
        return cfg.rows_budget, run.update.minibatch_size, "rows", "update.minibatch_size"
    return cfg.budget, completions_per_iteration(run), "completions", "rollout.prompts_per_iter"


def completions_per_iteration(cfg: TrainConfig) -> int:
    """Completions one iteration generates at most; A*-PO's count assumes prompts not seen before (its
    first pass over the data, which a comparison budget stays within). A guide's replies count: at
    most one a prompt rolling in, one a policy reply rolling out (a run may spend less than its budget)."""
    prompts = cfg.rollout.prompts_per_iter
    if cfg.algo == "astar_po":
        return prompts * (1 + cfg.astar.ref_samples)
    guide = {"none": 0, "rollin": prompts}.get(cfg.guide.mode, prompts * cfg.rollout.samples_per_prompt)
    return prompts * cfg.rollout.samples_per_prompt + guide


def run_all(cfg: CompareConfig, quick: bool = False, launch=None) -> Path:
    """Train every planned run not finished yet, one after another, then write the report."""
    runs = plan(cfg, quick)
    root = Path(cfg.run_dir)
    claim(root)
    (root / "compare.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    ledger = root / "runs.jsonl"
    done = {(r["task"], r["method"], r["seed"]): r for r in read_jsonl(ledger)} if ledger.exists() else {}
    launch = launch or launch_run
    for i, run in enumerate(runs, 1):
        if (run.task, run.method, run.seed) in done and _finished(run):
            continue
        print(f"rebelrl compare: [{i}/{len(runs)}] {run.task} / {run.method} / seed {run.seed}: "
              f"{run.cfg.iterations} iterations ({run.run_dir})", file=sys.stderr, flush=True)
        seconds, peak_mb = launch(run)
        launches = read_jsonl(run.run_dir / LAUNCHES) if (run.run_dir / LAUNCHES).exists() else []
        if launches:  # every launch of the run, the ones an interruption cut short included
            seconds, peak_mb = sum(r["wall_s"] for r in launches), max(r["peak_rss_mb"] for r in launches)
        record = {"task": run.task, "method": run.method, "seed": run.seed, "wall_s": seconds, "peak_rss_mb": peak_mb,
                  "launches": max(1, len(launches)), "iterations": run.cfg.iterations, "completions": _completions(run.run_dir),
                  "rows": _spent(run.run_dir, "rows")}
        with open(ledger, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not cfg.keep_checkpoints:  # 28 runs of a 135M model would otherwise hold 45 GB
            shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
    return write_comparison(root, runs)


def claim(root: Path) -> None:
    """Mark ``root`` as a comparison's, as a run marks its folder: a folder that is new, empty or
    already marked; one holding anything else (a user's own comparison.md, plots/) is refused."""
    check_writable(root)
    contents = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if contents and not (root / MARKER).is_file():
        listed = ", ".join(contents[:8]) + (f" and {len(contents) - 8} more" if len(contents) > 8 else "")
        raise CompareError(f"run_dir {root} holds files that are not a rebelrl comparison's ({listed}) and no {MARKER} marker; "
                           "a comparison would write compare.yaml, runs.jsonl, comparison.md and plots/ into it: choose a new or empty run_dir")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()


def launch_run(run: Plan) -> tuple[float, float]:
    """Train one run in a child process (resuming it if it was started); its wall time and peak RSS.

    The child's stderr goes to the terminal and to the run's log; the launch, finished or not, is
    appended to the run's ``compare_launches.jsonl``."""
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = run.run_dir.parent / f".{run.run_dir.name}.yaml"
    config.write_text(yaml.safe_dump(to_dict(run.cfg), sort_keys=False))
    log = run_log(run)
    cmd = [sys.executable, "-m", "rebelrl.cli", "train", str(config)] + (["--resume"] if run.run_dir.exists() else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    t0 = time.perf_counter()
    with open(log, "ab") as log_file:
        child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        tee = threading.Thread(target=_tee, args=(child.stderr, log_file), daemon=True)
        tee.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except KeyboardInterrupt:  # the child got the same Ctrl-C: wait for it to save what it can
            _, status, usage = os.wait4(child.pid, 0)
            _record_launch(run, time.perf_counter() - t0, usage, os.waitstatus_to_exitcode(status))
            raise
        seconds = time.perf_counter() - t0
        tee.join()
    tail = _log_tail(log)
    if tail and not tail.endswith("\n"):
        print(file=sys.stderr)  # a progress bar the child left mid-line
    code = os.waitstatus_to_exitcode(status)
    _record_launch(run, seconds, usage, code)
    if code != 0:
        last = _last_line(log)  # the child's own one-line error, or the last line of its traceback
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}{': ' + last if last else ''}"
        raise CompareError(f"{run.task} / {run.method} / seed {run.seed} failed ({how}); run folder {run.run_dir}, log {log}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def run_log(run: Plan) -> Path:
    """The run's stderr over every launch, beside its folder (the folder itself is the run's own)."""
    return run.run_dir.parent / f"{run.run_dir.name}.log"


def _tee(source, log_file) -> None:
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    for chunk in iter(lambda: source.read1(65536), b""):
        log_file.write(chunk)
        log_file.flush()
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode(errors="replace"))


def _log_tail(log: Path) -> str:
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        return f.read().decode(errors="replace")


def _last_line(log: Path) -> str:
    """The last line the child wrote (its one-line error, when it failed on one), at most 300 characters."""
    lines = [line.strip() for line in _log_tail(log).replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _record_launch(run: Plan, seconds: float, usage, code: int) -> None:
    """Append the launch to the run's own folder, where the run marked it (a child that failed before
    marking its folder did no work worth counting, and an unmarked folder would be refused later)."""
    if not is_run_dir(run.run_dir):
        return
    record = {"wall_s": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "exit_code": code}
    with open(run.run_dir / LAUNCHES, "a") as f:
        f.write(json.dumps(record) + "\n")


def _finished(run: Plan) -> bool:
    evals = run.run_dir / "eval.jsonl"
    return evals.exists() and any(r["iteration"] == run.cfg.iterations for r in read_jsonl(evals))


def _completions(run_dir: Path) -> int:
    return _spent(run_dir, "completions")


def _spent(run_dir: Path, key: str) -> int:
    return int(sum(m.get(key, 0) for m in read_jsonl(run_dir / "metrics.jsonl")))


def _with(base: dict, *overrides: dict) -> dict:
    """``base`` with dotted-key overrides applied, as ``rebelrl train`` applies them."""
    data = copy.deepcopy(base)
    for mapping in overrides:
        for key, value in mapping.items():
            set_dotted(data, key, copy.deepcopy(value))
    return data


# --- the report -------------------------------------------------------------------------------------


def write_comparison(root: Path, runs: list[Plan]) -> Path:
    ledger = {(r["task"], r["method"], r["seed"]): r for r in read_jsonl(root / "runs.jsonl")}
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    lines = ["# Comparison", "", f"Runs: {len(runs)}; budget per run and evaluation settings in `compare.yaml`.", ""]
    for task in dict.fromkeys(r.task for r in runs):
        curves = {}  # method -> list over seeds of [(completions, reward, kl, win rate, held-out pair accuracy)]
        rows = []
        for method in dict.fromkeys(r.method for r in runs if r.task == task):
            mine = [r for r in runs if r.task == task and r.method == method]
            curves[method] = [_curve(r.run_dir) for r in mine]
            finals = [c[-1] for c in curves[method] if c]
            costs = [ledger.get((task, method, r.seed), {}) for r in mine]
            rows.append(_table_row(method, finals, costs, mine[0].cfg.algo in OFFLINE_ALGOS))
        lines += [f"## {task}", "", "| method | final held-out reward | KL to ref (nats) | win rate vs initial | held-out pair accuracy | "
                  "budget spent | wall time (min) | peak RSS (GB) | seeds |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]
        for name, fig in _figures(task, curves, ledger).items():
            fig.savefig(plots / f"{task}-{name}.png", dpi=110)
            lines += [f"![{name}](plots/{task}-{name}.png)", ""]
    lines += ["Budget spent: generated completions for the online methods (HyPO's own samples beside its rows), rows of the data "
              "(pairs or demonstrations, counted once a step) for the offline ones. Held-out pair accuracy: the share of held-out "
              "pairs whose chosen reply the policy (or reward model) ranks first; '-' where a method has none to rank. "
              "Mean ± standard deviation across seeds. Wall time is the sum over every launch of a run (one resumed after an "
              "interruption counts its earlier launches too, work repeated since its last checkpoint included); peak RSS is the "
              "largest of its launches. Each run's own `report.md` has its training curves.", ""]
    out = root / "comparison.md"
    out.write_text("\n".join(lines))
    print(f"rebelrl compare: {out}", file=sys.stderr)
    return out


def _curve(run_dir: Path) -> list[tuple[float, float, float, float]]:
    """(completions generated so far, reward, KL, win rate) at each evaluation of a run."""
    if not (run_dir / "eval.jsonl").exists():
        return []
    spent, total = {0: 0}, 0
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        total += m.get("completions", 0)
        spent[m["iteration"]] = total
    return [(spent.get(e["iteration"], total), e.get("reward_mean", math.nan), e.get("kl_to_ref", math.nan),
             e.get("win_rate_vs_initial", math.nan), e.get("rewards/accuracies", math.nan))
            for e in read_jsonl(run_dir / "eval.jsonl")]


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mean:.3f}"


def _table_row(method: str, finals: list[tuple], costs: list[dict], offline: bool) -> str:
    cells = [_mean_sd([f[i] for f in finals]) for i in (1, 2, 3, 4)]
    rows = [c.get("rows", 0) for c in costs if c]
    completions = f"{sum(f[0] for f in finals) / len(finals):.0f} completions" if finals else "-"
    if offline:
        completions = f"{sum(rows) / max(len(rows), 1):.0f} rows" + (f", {completions}" if finals and sum(f[0] for f in finals) else "")
    wall = _mean_sd([c["wall_s"] / 60 for c in costs if c])
    peak = _mean_sd([c["peak_rss_mb"] / 1024 for c in costs if c])
    return f"| {method} | {' | '.join(cells)} | {completions} | {wall} | {peak} | {len(finals)} |"


def _figures(task: str, curves: dict, ledger: dict) -> dict[str, Figure]:
    figs = {}
    for name, y, label in (("reward", 1, "held-out reward"), ("win_rate", 3, "win rate vs initial policy")):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for method, runs in curves.items():
            mean = _average_curve(runs, y)
            if mean:
                ax.plot(*zip(*mean), "o-", label=method)
        ax.set_xlabel("completions generated")
        ax.set_ylabel(label)
        ax.set_title(f"{task}: {label} (mean over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs[name] = fig
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method, runs in curves.items():
        points = [(p[2], p[1]) for run in runs for p in run]
        if points:
            ax.scatter(*zip(*points), label=method, s=14)
    ax.set_xlabel("KL to reference (nats per reply)")
    ax.set_ylabel("held-out reward")
    ax.set_title(f"{task}: reward against KL (every evaluation, every seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["reward_vs_kl"] = fig
    fig = Figure(figsize=(7, 3.5))
    axes = fig.subplots(1, 2)
    methods = list(curves)
    for ax, key, label in ((axes[0], "wall_s", "wall time (min)"), (axes[1], "peak_rss_mb", "peak RSS (GB)")):
        values = [[r[key] / (60 if key == "wall_s" else 1024) for (t, m, _), r in ledger.items() if t == task and m == method] for method in methods]
        ax.bar(range(len(methods)), [sum(v) / len(v) if v else 0 for v in values])
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(f"{task}: cost per run (mean over seeds)")
    fig.tight_layout()
    figs["cost"] = fig
    return figs


def _average_curve(runs: list[list[tuple]], y: int) -> list[tuple[float, float]]:
    """Mean over seeds at each evaluation index (the seeds of a method evaluate at the same points)."""
    runs = [r for r in runs if r]
    if not runs:
        return []
    n = min(len(r) for r in runs)
    return [(sum(r[i][0] for r in runs) / len(runs), sum(r[i][y] for r in runs) / len(runs)) for i in range(n)]
