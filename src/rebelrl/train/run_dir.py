"""The run directory: whose it is, what may be written into it, and what a resume may change.

A run marks its directory with ``.rebelrl-run`` before writing anything else, so that a later start
can tell its own files from the user's: rebelrl writes only into a folder that is empty, new, or
marked, and never over a folder holding anything else (a user's own ``config.yaml`` or ``report.md``),
whatever their names.

Resuming (``--resume``):
- from the newest complete checkpoint inside the run, after deleting the temporary files that a kill
  left behind (names ending in ``.rebelrl-tmp``, which rebelrl alone writes);
- with no complete checkpoint yet, the run starts again from the beginning: its partial logs are
  replaced, not appended to. A run whose checkpoints are gone although its logs show one was written
  (a finished run of ``rebelrl compare``, whose checkpoints it deletes) is refused instead;
- with a config that differs from the run's (``config.yaml`` plus the recorded changes), only with
  ``allow_config_change``: each change is appended to ``config_changes.jsonl`` with the first
  iteration it applies to, and ``config.yaml`` keeps describing how the run started. Keys the
  checkpoint or the held-out baseline were built from (``FROZEN_ON_RESUME``) never change.

A folder that holds the marker and nothing else of a run's (a kill landed between marking it and the
first write) counts as empty: a new run may start there, with or without ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from rebelrl.config import to_dict
from rebelrl.errors import UserError
from rebelrl.train.checkpoint import TEMP_NAME, check_checkpoint, latest_checkpoint, write_atomic

MARKER = ".rebelrl-run"
CONFIG = "config.yaml"
CONFIG_CHANGES = "config_changes.jsonl"
# The logs a run that starts again replaces (report.md and plots/ are written only when a run ends).
LOGS = (CONFIG, CONFIG_CHANGES, "metrics.jsonl", "eval.jsonl", "eval_initial.jsonl", "eval_samples_latest.jsonl")
# Keys that describe the run rather than how it trains; they may differ on every resume.
IGNORED_ON_RESUME = ("run_dir", "resume", "allow_config_change")
# Keys a resumed run cannot honour: the checkpoint's weights, the data order, and the held-out
# baseline every later evaluation is compared with were all made with the old values.
FROZEN_ON_RESUME = ("algo", "seed", "model.", "task.", "reward.", "eval.seed", "eval.temperature", "eval.max_new_tokens")


class RunDirError(UserError, RuntimeError):
    pass


def prepare(cfg) -> Path | None:
    """The checkpoint to resume from, or None to start from the beginning in an empty run directory.

    Refuses a folder that is not marked as a run's and holds anything, a run without ``resume``, a
    checkpoint that is not whole or not inside the run, and a changed config without
    ``allow_config_change``; records an allowed change.
    """
    run_dir = Path(cfg.run_dir)
    check_writable(run_dir)
    contents = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if contents and not is_run_dir(run_dir):
        listed = ", ".join(contents[:8]) + (f" and {len(contents) - 8} more" if len(contents) > 8 else "")
        raise RunDirError(
            f"run_dir {run_dir} holds files that are not a rebelrl run's ({listed}) and no {MARKER} marker; a run would "
            "write config.yaml, report.md and more into it: choose a new or empty run_dir"
        )
    if not has_outputs(run_dir):  # new, empty, or marked by a run killed before its first write
        if cfg.resume:
            print(f"rebelrl: nothing to resume in {run_dir}: starting a new run", file=sys.stderr)
        clean_interrupted_writes(run_dir)
        return None
    if not cfg.resume:
        raise RunDirError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another run_dir")
    clean_interrupted_writes(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        refuse_lost_checkpoints(run_dir)
        print(f"rebelrl: {run_dir} has no complete checkpoint yet: starting the run again from iteration 0", file=sys.stderr)
        clear(run_dir)
        return None
    check_checkpoint(checkpoint)
    record_config_changes(run_dir, cfg, checkpoint_iteration(checkpoint))
    return checkpoint


def check_writable(run_dir: Path) -> None:
    """A folder a run can be written into, or one it can create: one line otherwise."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunDirError(f"run_dir {run_dir} is a symbolic link to {os.readlink(run_dir)}, which does not exist")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} is a file, not a folder")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise RunDirError(f"run_dir {run_dir}: {existing} is a symbolic link to {os.readlink(existing)}, which does not exist")
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"run_dir {run_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"run_dir {run_dir}: {existing} is not writable")


def is_run_dir(run_dir: Path) -> bool:
    """Marked by a run: the only kind of folder rebelrl ever writes into or clears once it holds anything."""
    return (run_dir / MARKER).is_file()


def has_outputs(run_dir: Path) -> bool:
    """Anything besides the marker and the temporary files of interrupted writes."""
    return run_dir.is_dir() and any(p.name != MARKER and not TEMP_NAME.match(p.name) for p in run_dir.iterdir())


def mark(run_dir: Path) -> None:
    """Claim ``run_dir`` for a run before anything else is written into it.

    The marker is created in place rather than renamed into place: only its existence counts, so
    a kill at any point leaves either no marker (an empty folder) or a marker."""
    marker = run_dir / MARKER
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            with open(marker, "w") as f:
                f.write("rebelrl run directory: rebelrl may write and replace its own files here\n")
    except OSError as e:
        raise RunDirError(f"run_dir {run_dir}: cannot write {marker.name} there ({e.strerror or e})") from None


def clean_interrupted_writes(run_dir: Path) -> None:
    """Delete the temporary files and folders of writes a kill cut short (they are never read).

    Only names ending in ``.rebelrl-tmp`` (``checkpoint.TEMP_NAME``), which rebelrl alone writes, in
    folders that are the run's own (not symbolic links out of it)."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "plots"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in folder.iterdir():
            if not TEMP_NAME.match(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def refuse_lost_checkpoints(run_dir: Path) -> None:
    """Refuse to start again a run that had saved a checkpoint: its results would be replaced.

    The checkpoint of iteration c is written before iteration c + 1 is logged, and a finished run
    writes report.md after its last checkpoint; either shows that the checkpoints were deleted."""
    config = run_config(run_dir)
    every, iterations = config.get("checkpoint.every") or 0, config.get("iterations") or 0
    first = min(every, iterations) if every > 0 else iterations
    logged = max((row.get("iteration", 0) for row in _rows(run_dir / "metrics.jsonl")), default=0)
    if (run_dir / "report.md").exists() or (first and logged > first):
        raise RunDirError(
            f"{run_dir}: its checkpoints are gone, but its logs show it saved one (iteration {logged} logged"
            f"{', report.md written' if (run_dir / 'report.md').exists() else ''}); resuming would start it again and "
            "replace its results: choose another run_dir"
        )


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
    return rows


def clear(run_dir: Path) -> None:
    """Remove a marked run's logs so that it starts afresh: only the files a run writes before its
    first checkpoint (``LOGS``), and never anything else in the folder."""
    for name in LOGS:
        path = run_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()


def checkpoint_iteration(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


# --- config changes on resume ----------------------------------------------------------------------


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; dict-valued fields (``reward.kwargs``) stay whole
    only when empty, so that a change inside one is named by its own key."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config as it stands: ``config.yaml`` plus every change recorded since, flattened."""
    path = run_dir / CONFIG
    config = flatten(yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    for change in read_changes(run_dir):
        config.update({key: value["new"] for key, value in change["changes"].items()})
    return config


def read_changes(run_dir: Path) -> list[dict]:
    path = run_dir / CONFIG_CHANGES
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def config_diff(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key whose value differs; a key the old config lacks (a field
    added since) counts as its default."""
    diff = {}
    for key, value in new.items():
        if key.startswith(IGNORED_ON_RESUME):
            continue
        before = old.get(key, defaults.get(key))
        if before != value:
            diff[key] = (before, value)
    return diff


def eval_sampling(config: dict[str, Any]) -> tuple:
    """How held-out evaluations sample (temperature, top_p, top_k, budget); flattened config in."""
    temperature = config["eval.temperature"] if config["eval.temperature"] is not None else config["rollout.temperature"]
    return temperature, config["rollout.top_p"], config["rollout.top_k"], config["eval.max_new_tokens"] or config["rollout.max_new_tokens"]


def record_config_changes(run_dir: Path, cfg, iteration: int) -> None:
    """Compare ``cfg`` with the run's config at checkpoint ``iteration``; refuse or record the change.

    Changes recorded for iterations after the checkpoint are dropped first: those iterations are
    trained again, with whatever config this resume brings.
    """
    kept = [c for c in read_changes(run_dir) if c["from_iteration"] <= iteration]
    if (run_dir / CONFIG_CHANGES).exists():
        write_atomic(run_dir / CONFIG_CHANGES, "".join(json.dumps(c) + "\n" for c in kept))
    defaults = flatten(to_dict(type(cfg)()))
    old, new = run_config(run_dir), flatten(to_dict(cfg))
    diff = config_diff(old, new, defaults)
    if not diff:
        return
    listed = "; ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in diff.items())
    frozen = [key for key in diff if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FROZEN_ON_RESUME)]
    if eval_sampling({**defaults, **old}) != eval_sampling(new):
        frozen.append("held-out sampling (eval.* left null take rollout.*)")
    if frozen:
        raise RunDirError(
            f"{run_dir}: cannot resume with a different {', '.join(frozen)} ({listed}): the checkpoint and the "
            "held-out baseline were made with the old values; start a new run_dir instead"
        )
    if not cfg.allow_config_change:
        raise RunDirError(
            f"{run_dir}: the config differs from the run's ({listed}); resume with the run's own config "
            f"({run_dir / CONFIG}), or pass --allow-config-change to apply the new values from iteration {iteration + 1}"
        )
    change = {"from_iteration": iteration + 1, "changes": {key: {"old": old, "new": new} for key, (old, new) in diff.items()}}
    write_atomic(run_dir / CONFIG_CHANGES, "".join(json.dumps(c) + "\n" for c in [*kept, change]))
    print(f"rebelrl: config changed from iteration {iteration + 1} ({listed}); recorded in {run_dir / CONFIG_CHANGES}", file=sys.stderr)
