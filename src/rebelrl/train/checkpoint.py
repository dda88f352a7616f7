"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

Layout: ``run_dir/checkpoints/iter-000010/{model/, trainer_state.pt}`` plus ``checkpoints/latest``
naming the newest complete one. ``model/`` is a Hugging Face folder (safetensors) that
``from_pretrained`` loads directly; ``trainer_state.pt`` holds the optimizer, the schedule, every RNG
and the loop position, which is what makes a resumed run repeat the uninterrupted one.

A resume reads only checkpoints inside its own run: ``latest`` must name an ``iter-N`` folder of the
same ``checkpoints/``, and none of them may lead elsewhere through a symbolic link.

Every temporary name rebelrl writes ends in ``.rebelrl-tmp`` (``TEMP_SUFFIX``), so that the temporary
files a kill leaves behind can be told from anything else in the folder and deleted on resume.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_model

from rebelrl.errors import UserError
from rebelrl.seeding import rng_state

LATEST = "latest"
TEMP_SUFFIX = ".rebelrl-tmp"
# ".config.yaml.4242.rebelrl-tmp", ".iter-000010.rebelrl-tmp", ".report.md.k2x9ab_q.rebelrl-tmp"
TEMP_NAME = re.compile(r"^\..+\.rebelrl-tmp$")
_ITERATION = re.compile(r"^iter-\d{6}$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or read: the message names the file and what is wrong."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def temp_path(path: Path, tag: str | int | None = None) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid() if tag is None else tag}{TEMP_SUFFIX}")


def save_checkpoint(run_dir, iteration: int, model, tokenizer, trainer_state: dict, keep_last: int = 2, extra: dict | None = None,
                    state_dict: dict | None = None) -> Path:
    """``extra`` maps file names to modules saved beside the model as safetensors (a critic);
    ``state_dict``, the model's full weights where ``model`` holds only a shard of them (FSDP, ZeRO-3).

    One process writes; with several, the others wait at a barrier until the checkpoint is whole.
    A write that fails (a full disk) leaves the previous checkpoint and ``latest`` as they were."""
    root = checkpoint_root(run_dir)
    final = root / f"iter-{iteration:06d}"
    tmp = root.joinpath(f".{final.name}{TEMP_SUFFIX}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".*{TEMP_SUFFIX}"):  # half-written by a killed run
            _remove(stale)
        model.save_pretrained(tmp / "model", safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp / "model")
        for name, module in (extra or {}).items():
            save_model(module, str(tmp / name))  # handles tied weights, which save_file refuses
        torch.save({**trainer_state, "iteration": iteration, "rng": rng_state()}, tmp / "trainer_state.pt")
        if final.exists():  # the same iteration saved before a kill: replace it only once the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST, final.name + "\n")
    except OSError as e:
        _remove(tmp)
        raise _write_error(root, iteration, e) from None
    for old in sorted(root.glob("iter-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_error(root: Path, iteration: int, e: OSError) -> CheckpointError:
    """One line: what failed, and which checkpoint a resume would start from."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"the disk is full (errno {errno.errorcode[e.errno]})"
    else:
        what = f"{e.strerror or e} (errno {errno.errorcode.get(e.errno, e.errno)})"
    previous = latest_checkpoint(root.parent) if root.is_dir() else None
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was saved"
    return CheckpointError(f"{root}: could not write the checkpoint of iteration {iteration}: {what}; {kept}; "
                           "make room, then continue with --resume")


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint (temporary folders from a killed save are ignored).

    Refuses (``CheckpointError``) a ``latest`` pointer or a checkpoint folder that leads outside
    ``run_dir``: resuming from it would load another run's weights and cut this run's logs back."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    _check_inside(root, run_dir, "checkpoints")
    pointer = root / LATEST
    if pointer.is_symlink() or pointer.exists():
        _check_inside(pointer, run_dir, f"checkpoints/{LATEST}")
        name = pointer.read_text(errors="replace").strip()
        if not _ITERATION.match(name):
            raise CheckpointError(f"{pointer}: names {name[:80]!r}, not a checkpoint of this run (iter-NNNNNN in {root}); "
                                  "resume reads only checkpoints inside its own run")
        path = root / name
        if path.is_symlink() or path.exists():
            _check_inside(path, run_dir, f"checkpoints/{name}")
        if (path / "trainer_state.pt").exists():
            return path
    complete = []
    for path in sorted(root.glob("iter-*")):
        if _ITERATION.match(path.name):
            _check_inside(path, run_dir, f"checkpoints/{path.name}")
            if (path / "trainer_state.pt").exists():
                complete.append(path)
    return complete[-1] if complete else None


def _check_inside(path: Path, run_dir, what: str) -> None:
    run = Path(run_dir).resolve()
    target = path.resolve()
    if target != run and run not in target.parents:
        raise CheckpointError(f"{path}: {what} leads to {target}, outside the run {run}; resume reads only checkpoints "
                              "inside its own run")


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse, with the file named, a checkpoint a resume could not load whole: its trainer state
    and the header of every safetensors file are read (the weights themselves are not)."""
    load_trainer_state(checkpoint)
    model = checkpoint / "model"
    configs = [model / name for name in ("config.json", "adapter_config.json") if (model / name).exists()]  # a LoRA run saves the adapter's
    if not configs:
        raise CheckpointError(f"{model}: holds no config.json (nor a LoRA adapter_config.json); the checkpoint cannot be resumed from")
    for path in configs:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(e)}); the checkpoint cannot be resumed from") from None
    weights = sorted(checkpoint.rglob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{checkpoint / 'model'}: holds no weights (*.safetensors); the checkpoint cannot be resumed from")
    for path in weights:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:  # safetensors raises its own error type, with what is wrong in the header
            raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(e)}); the checkpoint cannot be resumed from") from None


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state, unpickled with ``weights_only=True``: tensors and plain values only, so a
    file planted in a run folder cannot run code when the run is resumed."""
    path = checkpoint / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:  # torch names the offending global ("GLOBAL posix.system")
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else _first_line(e)
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain values ({what})") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint cannot be resumed from") from None
    except Exception as e:  # a cut zip archive (RuntimeError), an empty file (EOFError)
        raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(e)}); the checkpoint cannot be resumed from") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(e).__name__


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
