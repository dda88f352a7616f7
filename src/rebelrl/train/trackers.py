"""Experiment trackers (``log.report_to``) and the sample table written at every evaluation.

Each tracker gets exactly the rows ``metrics.jsonl`` (as ``train/<key>``) and ``eval.jsonl`` (as
``eval/<key>``) get, at step = the iteration, from the main process only, plus a table of held-out
samples and histograms of their scores and lengths at every evaluation. Each is an optional extra,
imported only when named.

A resumed run continues the same tracked run: ``trackers.json`` in the run directory keeps each
tracker's run id and the last iteration sent of each kind, and a row at or below it is not sent
again. The iterations a resume replays (those after its checkpoint) reach the tracker once, as they
were first logged; nothing is missing, nothing doubled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rebelrl.config import ConfigError
from rebelrl.errors import UserError
from rebelrl.train.checkpoint import write_atomic

TRACKERS = ("trackio", "tensorboard", "wandb", "mlflow")
STATE = "trackers.json"
SAMPLES_DIR = "samples"


class TrackerError(UserError, RuntimeError):
    pass


def check_trackers(names: list[str]) -> None:
    """Refuse unknown or uninstalled trackers before any model loads (``log.report_to``)."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"log.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:  # each tracker's module has the tracker's name
            raise ConfigError(f"log.report_to: {name} is not installed: pip install 'rebelrl[{name}]'")
    if len(set(names)) != len(names):
        raise ConfigError(f"log.report_to: {names} names a tracker twice")


def numeric(record: dict, prefix: str) -> dict[str, float]:
    """The record's finite numbers under ``prefix/`` (the iteration is the step, not a metric)."""
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """Every tracker ``log.report_to`` names, fed from the main process; a no-op for none."""

    def __init__(self, names: list[str], run_dir: Path, project: str, name: str, group: str | None, config: dict):
        self.run_dir = Path(run_dir)
        path = self.run_dir / STATE
        self.state: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
        self.trackers = {}
        for tracker in names:
            state = self.state.setdefault(tracker, {})
            try:
                self.trackers[tracker] = _OPEN[tracker](self.run_dir, project, name, group, config, state)
            except Exception as e:  # the tracker's own refusal (a store it cannot use, no login): one line, before training
                self.close()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TrackerError(f"log.report_to: {tracker} could not start a run: {first}") from None
        self._save()

    def log(self, kind: str, record: dict) -> None:
        """A row of metrics.jsonl (``kind`` "train") or eval.jsonl ("eval")."""
        step = int(record["iteration"])
        values = numeric(record, kind)
        for tracker, backend in self.trackers.items():
            if step <= self.state[tracker].get(kind, -1):
                continue  # sent before a kill; the resumed run replays it
            backend.log(values, step)
            self.state[tracker][kind] = step
        self._save()

    def samples(self, step: int, columns: list[str], rows: list[list], histograms: dict[str, list[float]]) -> None:
        """The held-out sample table of the evaluation at ``step``, and histograms of its columns."""
        for tracker, backend in self.trackers.items():
            if step <= self.state[tracker].get("samples", -1):
                continue
            backend.table("eval/samples", columns, rows, step)
            for key, values in histograms.items():
                backend.histogram(f"eval/{key}", values, step)
            self.state[tracker]["samples"] = step
        self._save()

    def close(self) -> None:
        for backend in self.trackers.values():
            backend.close()
        self.trackers = {}

    def _save(self) -> None:
        if self.trackers:
            write_atomic(self.run_dir / STATE, json.dumps(self.state, indent=1) + "\n")


class _RunLogger:
    """A tracker whose run object logs a dict at a step, tables and histograms included (trackio, W&B)."""

    run: Any
    Table: Any
    Histogram: Any

    def log(self, values, step):
        self.run.log(values, step=step)

    def table(self, key, columns, rows, step):
        self.run.log({key: self.Table(columns=columns, data=rows)}, step=step)

    def histogram(self, key, values, step):
        self.run.log({key: self.Histogram(values)}, step=step)

    def close(self):
        self.run.finish()


class _Trackio(_RunLogger):
    def __init__(self, run_dir, project, name, group, config, state):
        import trackio

        if "name" not in state:  # a new run directory: a new tracked run, under a name no other run of the project has
            from trackio.sqlite_storage import SQLiteStorage

            taken = set(SQLiteStorage.get_runs(project))
            state["name"] = name if name not in taken else next(f"{name}-{i}" for i in range(2, len(taken) + 3) if f"{name}-{i}" not in taken)
        # a resumed run directory continues its own tracked run
        self.run = trackio.init(project=project, name=state["name"], group=group, config=config, resume="must" if state.get("started") else "never")
        state["started"] = True
        self.Table, self.Histogram = trackio.Table, trackio.Histogram


class _TensorBoard:
    def __init__(self, run_dir, project, name, group, config, state):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not state.get("config_sent"):
            self.writer.add_text("config", "```yaml\n" + json.dumps(config, indent=1) + "\n```", 0)
            state["config_sent"] = True

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def table(self, key, columns, rows, step):
        head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(_cell(v) for v in row) + " |\n" for row in rows)
        self.writer.add_text(key, head + body, step)
        self.writer.flush()

    def histogram(self, key, values, step):
        import numpy as np

        self.writer.add_histogram(key, np.asarray(values, dtype=np.float64), step)

    def close(self):
        self.writer.close()


class _Wandb(_RunLogger):
    def __init__(self, run_dir, project, name, group, config, state):
        import wandb

        if "id" not in state:  # W&B run ids: 8 characters of [a-z0-9]
            import secrets
            import string

            state["id"] = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.run = wandb.init(project=project, name=name, group=group, config=config, id=state["id"], resume="allow", dir=str(run_dir),
                              settings=wandb.Settings(console="off", silent=True))
        self.Table, self.Histogram = wandb.Table, wandb.Histogram


class _Mlflow:
    def __init__(self, run_dir, project, name, group, config, state):
        import mlflow

        self.mlflow = mlflow
        active = mlflow.active_run()
        if active is not None and active.info.run_id == state.get("id"):  # this run, left open by an interruption in this process
            mlflow.end_run()
        mlflow.set_experiment(project)
        tags = {"rebelrl.run_dir": str(run_dir), **({"rebelrl.group": group} if group else {})}
        self.run = mlflow.start_run(run_id=state.get("id"), run_name=None if "id" in state else name, tags=tags)
        if "id" not in state:
            state["id"] = self.run.info.run_id
            mlflow.log_params({k: _cell(v)[:6000] for k, v in _flat(config).items()})

    def log(self, values, step):
        self.mlflow.log_metrics(values, step=step)

    def table(self, key, columns, rows, step):
        self.mlflow.log_dict({"columns": columns, "data": rows}, f"{SAMPLES_DIR}/iter-{step:06d}.json")

    def histogram(self, key, values, step):
        pass  # MLflow has no histogram; the sample table holds every value

    def close(self):
        self.mlflow.end_run()


_OPEN = {"trackio": _Trackio, "tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def sample_table(initial: list[dict], latest: list[dict]) -> tuple[list[str], list[list], dict[str, list[float]]]:
    """Columns and rows of a held-out sample table, initial and current reply side by side, and the
    values to histogram. ``initial`` / ``latest``: the records of ``eval_initial.jsonl`` and
    ``eval_samples_latest.jsonl`` (single-turn: prompt, completion, score; dialogues: messages, turn_scores)."""
    if latest and "messages" in latest[0]:
        columns = ["opening", "initial dialogue", "initial turn scores", "dialogue", "turn scores", "reward"]
        rows = [[_opening(now["messages"]), _transcript(first["messages"]), first["turn_scores"], _transcript(now["messages"]),
                 now["turn_scores"], now["turn_scores"][-1] if now["turn_scores"] else 0.0] for first, now in zip(initial, latest)]
        return columns, rows, {"reward": [r[-1] for r in rows]}
    columns = ["prompt", "initial reply", "initial score", "reply", "score", "reply characters", "finished"]
    rows = [[now["prompt"], first["completion"], first["score"], now["completion"], now["score"], len(now["completion"]), now.get("finished", True)]
            for first, now in zip(initial, latest)]
    return columns, rows, {"reward": [r[4] for r in rows], "reply_characters": [float(r[5]) for r in rows]}


def write_sample_table(path: Path, columns: list[str], rows: list[list], iteration: int) -> None:
    """The table as Parquet (one file an evaluation), written whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = {"iteration": [iteration] * len(rows), **{c: [row[i] for row in rows] for i, c in enumerate(columns)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(data), tmp)
    tmp.replace(path)


def _opening(messages: list[dict]) -> str:
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def _transcript(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")
