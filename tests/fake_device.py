"""A stand-in accelerator for machines without one: tensors that say they live on another device than
the CPU, hold their values on the CPU, and refuse, as PyTorch on a GPU does, to meet a CPU tensor in
an operation. The device they name is PyTorch's ``meta`` (whose device guard needs no driver, where
naming ``cuda`` on a CPU build fails inside indexing); ``DEVICE`` below.

The class of bug it catches: a tensor made on the CPU (``torch.tensor(scores)``, ``torch.arange(n)``)
meeting one that lives where the model does (log-probs, masks). On a CPU machine both are CPU tensors
and nothing fails; on a GPU PyTorch refuses to add them. Under ``fake_accelerator()``:

- a tensor made with ``device=DEVICE`` or ``device=x.device`` of such a tensor (or moved there with
  ``.to``) is a ``FakeDeviceTensor``;
- an operation on one whose other tensor arguments are CPU tensors with a dimension raises
  ``RuntimeError`` naming the operation, as CUDA would (0-dim CPU tensors are scalars there, and a CPU
  index tensor may index a device tensor: both allowed, as on a GPU; ``copy_`` crosses devices);
- ``.cpu()``, ``.item()`` and ``.tolist()`` bring values back as usual; ``.numpy()`` refuses, as on a GPU.

The model itself still runs on the CPU: ``on_device(fn)`` wraps a function that calls it so that it
takes device tensors and returns device tensors, gradients flowing through.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
              torch.ops.aten._index_put_impl_.default}
_CROSS_DEVICE_OPS = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}


class FakeDeviceTensor(torch.Tensor):
    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype, device=DEVICE,
                                                  requires_grad=inner.requires_grad)
        out.inner = inner
        return out

    def __repr__(self):
        return f"FakeDeviceTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEX_OPS:  # indices may sit on the CPU; the tensor indexed and the values may not
            _refuse_cpu(func, (args[0], *args[2:]), kwargs)
        elif func not in _CROSS_DEVICE_OPS:
            _refuse_cpu(func, args, kwargs)
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))  # .cpu(), .to("cpu"): a plain tensor
        if func is torch.ops.aten.copy_.default and not isinstance(args[0], FakeDeviceTensor):
            return func(args[0], _unwrap(args[1]))  # a CPU tensor filled from a device tensor
        kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in kwargs.items()}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(_wrap, out)


def _unwrap(x):
    if isinstance(x, FakeDeviceTensor):
        return x.inner
    if isinstance(x, torch.Tensor) and x.device == DEVICE:
        # A tensor PyTorch made on the device itself (autograd's zeros in a backward formula): a meta
        # tensor holds no values, so it is taken as zeros. The gradients' numbers may then be off; where
        # each tensor lives, what this stand-in checks, is not.
        return torch.zeros(x.shape, dtype=x.dtype)
    return x


def _wrap(x):
    return FakeDeviceTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeDeviceTensor) else x


def _refuse_cpu(func, args, kwargs) -> None:
    def check(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeDeviceTensor) and x.dim() > 0:
            raise RuntimeError(f"{func}: expected all tensors to be on the same device, but found at least two devices, {DEVICE} and cpu")
        return x

    tree_map(check, (args, kwargs))


def _is_fake(device) -> bool:
    return device is not None and not isinstance(device, int) and torch.device(device).type == DEVICE.type


class _ToDevice(torch.autograd.Function):
    """A CPU tensor as a device tensor, gradients flowing back to the CPU one."""

    @staticmethod
    def forward(ctx, x):
        return FakeDeviceTensor(x.detach())

    @staticmethod
    def backward(ctx, grad):
        return _unwrap(grad)


def to_device(x):
    """A CPU tensor (or a structure of them) as device tensors; gradients reach the CPU tensors."""
    def move(t):
        if not isinstance(t, torch.Tensor) or isinstance(t, FakeDeviceTensor):
            return t
        return _ToDevice.apply(t) if t.requires_grad else FakeDeviceTensor(t)

    return tree_map(move, x)


def from_device(x):
    """Device tensors (in any structure) as CPU tensors, for the model that runs on the CPU."""
    def move(t):
        if isinstance(t, FakeDeviceTensor):
            return _FromDevice.apply(t) if t.requires_grad else t.inner
        return t

    return tree_map(move, x)


class _FromDevice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.inner.detach()

    @staticmethod
    def backward(ctx, grad):
        return FakeDeviceTensor(grad)


def on_device(fn):
    """``fn`` (which runs the CPU model) taking and returning device tensors."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return to_device(fn(*from_device(args), **from_device(kwargs)))

    return wrapped


class _Factories(TorchFunctionMode):
    """Tensors made (or moved) with ``device=DEVICE`` become device tensors held on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.tolist and isinstance(args[0], FakeDeviceTensor):
            return args[0].inner.tolist()
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and isinstance(args[0], FakeDeviceTensor):
            raise TypeError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")
        if func is torch.Tensor.to and args:
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if _is_fake(target):
                rest = [a for a in args[1:] if not isinstance(a, (str, torch.device))]
                kwargs.pop("device", None)
                kwargs.pop("non_blocking", None)
                moved = _unwrap(args[0]).to(*rest, **kwargs)
                return to_device(moved)
        if _is_fake(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return tree_map(_wrap, func(*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_accelerator():
    """Within this context ``device=DEVICE`` makes device tensors (see the module docstring)."""
    with _Factories():
        yield DEVICE
