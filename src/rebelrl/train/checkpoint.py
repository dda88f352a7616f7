"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

Layout: ``run_dir/checkpoints/iter-000010/{model/, trainer_state.pt}`` plus ``checkpoints/latest``
naming the newest complete one. ``model/`` is a Hugging Face folder (safetensors) that
``from_pretrained`` loads directly; ``trainer_state.pt`` holds the optimizer, the schedule, every RNG
and the loop position, which is what makes a resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model

from rebelrl.seeding import rng_state

LATEST = "latest"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir, iteration: int, model, tokenizer, trainer_state: dict, keep_last: int = 2, extra: dict | None = None,
                    state_dict: dict | None = None) -> Path:
    """``extra`` maps file names to modules saved beside the model as safetensors (a critic);
    ``state_dict``, the model's full weights where ``model`` holds only a shard of them (FSDP, ZeRO-3).

    One process writes; with several, the others wait at a barrier until the checkpoint is whole."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{iteration:06d}"
    tmp = root / f".tmp-iter-{iteration:06d}"
    for stale in root.glob(".tmp-iter-*"):  # half-written by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp / "model", safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp / "model")
    for name, module in (extra or {}).items():
        save_model(module, str(tmp / name))  # handles tied weights, which save_file refuses
    torch.save({**trainer_state, "iteration": iteration, "rng": rng_state()}, tmp / "trainer_state.pt")
    if final.exists():  # the same iteration saved before a kill: replace it only once the new one is whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / LATEST, final.name + "\n")
    for old in sorted(root.glob("iter-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint (temporary folders from a killed save are ignored)."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / "trainer_state.pt").exists():
            return path
    complete = [p for p in sorted(root.glob("iter-*")) if (p / "trainer_state.pt").exists()]
    return complete[-1] if complete else None


class CheckpointError(RuntimeError):
    pass


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state, unpickled with ``weights_only=True``: tensors and plain values only, so a
    file planted in a run folder cannot run code when the run is resumed."""
    path = checkpoint / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError with the offending global named
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain values ({str(e).splitlines()[0]})") from None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
