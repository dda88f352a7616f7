"""Random-number state: seeded blocks that leave the caller's streams where they were, and the
state a checkpoint stores so that a resumed run repeats the uninterrupted one.

Sampling draws from torch's CPU generator and, on a GPU, from the CUDA generator of the device:
both are forked and restored together, or a seeded evaluation on a GPU would leave the training
stream re-seeded behind it.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` (CPU and every CUDA device); restore all after."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(seed)
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def rng_state() -> dict:
    """Every generator's state as plain values and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(d) for d in _cuda_devices()],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])
    devices = _cuda_devices()
    if cuda and len(cuda) != len(devices):
        warnings.warn(f"the checkpoint holds the RNG of {len(cuda)} CUDA devices and {len(devices)} are visible: "
                      "CUDA sampling will not repeat the uninterrupted run exactly", stacklevel=2)
    for device, cuda_state in zip(devices, cuda):
        torch.cuda.set_rng_state(cuda_state, device)
