"""Give the memory that one phase of an iteration freed back to the system before the next phase.

On Linux, glibc's malloc serves most tensors of a few MB from its heap, and keeps what they leave
when freed for later reuse. A rollout grows its KV cache one step at a time and an update frees its
activations layer by layer: both leave free holes of many sizes, resident all the while, and the
next phase, allocating other sizes, grows the heap beside them. The process's resident memory then
climbs to the high-water mark of every phase plus the holes between. ``release_free_memory`` asks
malloc to hand every whole free page back (``malloc_trim(0)``, which releases free pages anywhere
in the heap, not just at its top); the training loops call it where one phase ends and another
begins, where little is live. It changes no value, takes milliseconds, and does nothing where the
C library has no such call (macOS, musl).

Within a phase the holes remain: an update's forward pass places each layer's short-lived tensors
in fresh pages while the ones just freed stay resident (on SmolLM2-135M with 32 rows of about 100
tokens, resident memory ends the forward 1.6 GB above what is live).
``free_at_once`` (``free_memory: at_once``) gives every allocation of 1 MB or more pages of its own
(glibc's ``M_MMAP_THRESHOLD``), returned the moment the tensor is freed: resident memory then
follows what is live, at the price of faulting those pages in anew each time (about a third more
time an iteration on 2 CPU cores, measured). With activation checkpointing it is the lean mode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
AT_ONCE_BYTES = 2**20


@functools.cache
def _glibc_call(name: str):
    """The C library's function ``name`` (taking and returning ints), or None where it has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    fn = getattr(libc, name, None)
    if fn is not None:
        fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return malloc's free pages to the system; whether any were returned (False where unsupported)."""
    trim = _glibc_call("malloc_trim")
    return bool(trim(ctypes.c_size_t(0))) if trim is not None else False


def free_at_once(threshold: int = AT_ONCE_BYTES) -> bool:
    """From now on, allocations of ``threshold`` bytes or more get pages of their own, returned to the
    system when freed; whether the C library took the setting (False where unsupported)."""
    mallopt = _glibc_call("mallopt")
    return mallopt is not None and mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)) == 1
