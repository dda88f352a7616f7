"""Turn a run directory's logs into PNG plots and a Markdown report.

A run directory holds ``metrics.jsonl`` (one row per training iteration), ``eval.jsonl`` (one row
per held-out evaluation, iteration 0 is the initial policy) and the resolved ``config.yaml``.
``write_report`` reads whatever of these exists and writes ``plots/*.png`` and ``report.md``; a plot
whose data is missing is skipped and not referenced.

Figures are built on ``matplotlib.figure.Figure`` rather than pyplot: no global figure registry, no
backend switch in the caller's process, safe to call from a background thread of a training run.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

PLOTS_DIR = "plots"
# Phases drawn in this order (bottom to top); any other ``time/*`` key is stacked after them.
PHASE_ORDER = ("time/rollout", "time/score", "time/logprobs", "time/train")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; ``[]`` when the file does not exist.

    A run killed mid-write leaves a partial last line, which is dropped. An unparsable line anywhere
    else means the file is corrupt, and raises ``ValueError``.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return rows


def _by_iteration(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A resumed run may log an iteration twice; the later row is the one the run continued from.
    last = {r["iteration"]: r for r in rows if _num(r.get("iteration")) is not None}
    return [last[k] for k in sorted(last)]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _series(rows: list[dict[str, Any]], *keys: str) -> list[tuple[float, ...]]:
    """``(iteration, rows[k0], rows[k1], ...)`` for the rows where every key is a finite number."""
    out = []
    for r in rows:
        vals = [_num(r.get(k)) for k in ("iteration", *keys)]
        if all(v is not None for v in vals):
            out.append(tuple(vals))
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    # Readers (a dashboard, a second report call) never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".rebelrl-tmp")  # cleaned on resume
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_reward(train, evals):
    mean, band = _series(train, "reward_mean"), _series(train, "reward_mean", "reward_std")
    ev = _series(evals, "reward_mean")
    if not mean and not ev:
        return None
    fig, ax = _new_axes("Reward", "iteration", "reward")
    if mean:
        ax.plot(*zip(*mean), label="train reward_mean")
    if band:
        it, m, s = zip(*band)
        lo, hi = [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)]
        ax.fill_between(it, lo, hi, alpha=0.2, label="train ±1 std")
    if ev:
        ax.plot(*zip(*ev), "o--", label="eval reward_mean")
    ax.legend()
    return fig


def _plot_kl(train, evals):
    tr, ev = _series(train, "kl_to_ref"), _series(evals, "kl_to_ref")
    if not tr and not ev:
        return None
    fig, ax = _new_axes("KL to reference", "iteration", "KL(policy || ref) [nats / sequence]")
    if tr:
        ax.plot(*zip(*tr), label="train")
    if ev:
        ax.plot(*zip(*ev), "o--", label="eval")
    ax.legend()
    return fig


def _plot_win_rate(evals):
    ev = _series(evals, "win_rate_vs_initial")
    if not ev:
        return None
    fig, ax = _new_axes("Eval win rate vs initial policy", "iteration", "win rate (ties count 1/2)")
    ax.plot(*zip(*ev), "o-", label="eval")
    ax.axhline(0.5, linestyle="--", color="gray", label="no change (0.5)")
    ax.set_ylim(0.0, 1.0)
    ax.legend()
    return fig


def _plot_reward_vs_kl(evals):
    pts = _series(evals, "kl_to_ref", "reward_mean")
    if not pts:
        return None
    fig, ax = _new_axes("Eval reward vs KL to reference", "KL(policy || ref) [nats / sequence]", "eval reward_mean")
    _, kl, rew = zip(*pts)
    ax.plot(kl, rew, "o-", alpha=0.7)
    ax.margins(0.08)  # room for the labels of the outermost points
    for i, x, y in pts:
        ax.annotate(f"{i:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    return fig


def _phases(train) -> list[str]:
    seen = {k for r in train for k in r if k.startswith("time/") and k != "time/total"}
    return [p for p in PHASE_ORDER if p in seen] + sorted(seen - set(PHASE_ORDER))


def _plot_timing(train):
    phases = _phases(train)
    rows = [r for r in train if any(_num(r.get(p)) is not None for p in phases)]
    if not rows:
        return None
    fig, ax = _new_axes("Time per iteration", "iteration", "seconds")
    its = [r["iteration"] for r in rows]
    bottom = [0.0] * len(rows)
    for p in phases:
        vals = [_num(r.get(p)) or 0.0 for r in rows]
        ax.bar(its, vals, bottom=bottom, label=p.removeprefix("time/"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    # Outside the axes so it never hides bars; reversed so it reads in the stacking order.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right upper")
    return fig


def _mean(rows, key) -> float | None:
    vals = [v for r in rows if (v := _num(r.get(key))) is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: Any, spec: str = ".3f") -> str:
    v = _num(v)
    return "-" if v is None else format(v, spec)


def _summary(train, evals) -> list[str]:
    rows = []
    if evals:
        first, last = evals[0], evals[-1]
        rows += [
            (f"Initial eval reward (iteration {first['iteration']})", _fmt(first.get("reward_mean"))),
            (f"Final eval reward (iteration {last['iteration']})", _fmt(last.get("reward_mean"))),
            ("Final win rate vs initial", _fmt(last.get("win_rate_vs_initial"))),
        ]
    kl_eval, kl_train = _series(evals, "kl_to_ref"), _series(train, "kl_to_ref")
    if kl_eval or kl_train:
        source, (it, kl) = ("eval", kl_eval[-1]) if kl_eval else ("train", kl_train[-1])
        rows.append((f"Final KL to reference ({source}, iteration {it:g}, nats)", _fmt(kl)))
    phases = _phases(train)
    means = {p: _mean(train, p) for p in phases}
    total = _mean(train, "time/total")
    if total is None and any(m is not None for m in means.values()):
        total = sum(m for m in means.values() if m is not None)
    rows.append(("Training iterations logged", str(len(train))))
    rows.append(("Mean seconds per iteration", _fmt(total, ".2f")))
    for p in phases:
        if means[p] is not None and total:
            share = f"{_fmt(means[p], '.2f')} s ({100 * means[p] / total:.1f}%)"
            rows.append((f"Mean {p.removeprefix('time/')} time (share)", share))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


EVAL_COLUMNS = ("iteration", "reward_mean", "reward_std", "win_rate_vs_initial", "kl_to_ref",
                "response_length", "frac_no_eos", "n_prompts")


def _eval_table(evals) -> list[str]:
    fmt = {"iteration": "g", "n_prompts": "g", "response_length": ".1f"}
    lines = ["| " + " | ".join(EVAL_COLUMNS) + " |", "|" + "---|" * len(EVAL_COLUMNS)]
    for r in evals:
        lines.append("| " + " | ".join(_fmt(r.get(c), fmt.get(c, ".3f")) for c in EVAL_COLUMNS) + " |")
    return lines


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write ``run_dir/plots/*.png`` and ``run_dir/report.md`` from the run's logs; returns the report path."""
    run_dir = Path(run_dir)
    train = _by_iteration(read_jsonl(run_dir / "metrics.jsonl"))
    evals = _by_iteration(read_jsonl(run_dir / "eval.jsonl"))
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)

    figures = {
        "reward.png": ("Reward", _plot_reward(train, evals)),
        "kl.png": ("KL to reference", _plot_kl(train, evals)),
        "win_rate.png": ("Win rate vs initial policy", _plot_win_rate(evals)),
        "reward_vs_kl.png": ("Reward vs KL (eval)", _plot_reward_vs_kl(evals)),
        "timing.png": ("Time per iteration", _plot_timing(train)),
    }
    md = [f"# {title or f'Training report: {run_dir.resolve().name}'}", "", "## Summary", ""]
    md += _summary(train, evals) + ["", "## Plots", ""]
    for name, (caption, fig) in figures.items():
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        _atomic_write(plots_dir / name, buf.getvalue())
        md += [f"### {caption}", "", f"![{caption}]({PLOTS_DIR}/{name})", ""]
    md += ["## Evaluations", ""]
    md += _eval_table(evals) if evals else ["No evaluations were logged (`eval.jsonl` is missing or empty)."]
    md += ["", "## Config", ""]
    has_config = (run_dir / "config.yaml").exists()
    md.append("Resolved config: [config.yaml](config.yaml)" if has_config else "No `config.yaml` in this run directory.")
    changes = run_dir / "config_changes.jsonl"
    if changes.exists():  # a resume changed values: config.yaml alone would not describe the whole run
        md += ["", "Changed on resume ([config_changes.jsonl](config_changes.jsonl)):", ""]
        for row in (json.loads(line) for line in changes.read_text().splitlines() if line.strip()):
            listed = "; ".join(f"`{key}`: {c['old']!r} -> {c['new']!r}" for key, c in row["changes"].items())
            md.append(f"- from iteration {row['from_iteration']}: {listed}")
    report = run_dir / "report.md"
    _atomic_write(report, ("\n".join(md) + "\n").encode())
    return report
