"""Layers that keep less for the backward pass: the gated MLP and RMSNorm of Llama-style models.

Gated MLP. Llama-style decoder layers end in ``down(silu(gate(x)) * up(x))``. Run as written,
autograd keeps four tensors of the intermediate width for each token and layer: the gate output
(for silu's backward), silu's output and the up output (for the product's), and the product (for
``down``'s weight gradient). ``swiglu_down`` keeps only the gate and up outputs and recomputes silu
and the product in the backward pass: element-wise work, next to nothing beside the matrix
products, for about a quarter of the training step's activations on SmolLM2 (intermediate width
1536 against a hidden width of 576).

RMSNorm. ``weight * (x * rsqrt(mean(x^2) + eps))`` as written keeps the input (as a float32 copy
in half precision) and the normalised input (for the weight's gradient). ``rms_norm`` keeps the
input in its own dtype and one number a token (the inverse root mean square) and recomputes the
normalised input: 4 bytes fewer per element of the hidden width and norm, in float32 (half of what
the norm kept) and bfloat16 (two thirds) alike; two norms a decoder layer.

In both, the forward is the same computation, op for op, and the gradients are the same formulas
(tested against autograd in float64; the norm computes in float32 as Llama's does, in float64 for a
float64 input). ``fuse_gated_mlps`` and ``fuse_rms_norms`` swap them into
every module that has exactly that shape, and check on the first one of each class that the
swapped forward returns what the module's own did, bit for bit, before keeping the swap; modules
of any other shape (Gemma's ``1 + weight`` norm, a GELU MLP) are left alone.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


# --- the gated MLP ---------------------------------------------------------------------------


class _SwiGLUDown(torch.autograd.Function):
    """``F.linear(silu(gate) * up, weight, bias)`` keeping gate and up, not the product."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_product = grad_out @ weight  # (..., I)
        grad_gate = grad_up = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            product = silu * up
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ product.reshape(-1, product.shape[-1])  # (O, I)
            del product
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        if ctx.needs_input_grad[1]:
            grad_up = grad_product * silu
        del silu
        if ctx.needs_input_grad[0]:
            # d silu(g) / dg = sig(g) (1 + g (1 - sig(g))), built in place in the buffers of sig and grad_product
            slope = torch.rsub(sig, 1).mul_(gate).add_(1).mul_(sig)
            grad_gate = grad_product.mul_(up).mul_(slope)
        return grad_gate, grad_up, grad_weight, grad_bias


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, down: nn.Linear) -> torch.Tensor:
    """``down(silu(gate) * up)``; under autograd it keeps gate and up only. A weight that is not all
    there outside ``down``'s own forward (DeepSpeed ZeRO-3 or FSDP sharding gathers it in ``down``'s
    hooks) takes the plain path."""
    whole = down.weight.shape == (down.out_features, down.in_features) and not hasattr(down.weight, "ds_id")
    if torch.is_grad_enabled() and whole and (gate.requires_grad or up.requires_grad or down.weight.requires_grad):
        return _SwiGLUDown.apply(gate, up, down.weight, down.bias)
    return down(F.silu(gate) * up)


def _fused_forward(self, x):
    return swiglu_down(self.gate_proj(x), self.up_proj(x), self.down_proj)


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return silu and all(type(p) is nn.Linear for p in projections)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every ``down(silu(gate(x)) * up(x))`` module of ``model`` the lean forward; returns how
    many. A module class whose first instance's output differs from its own forward's keeps its own."""
    mlps = [m for m in model.modules() if _is_gated_silu_mlp(m) and "forward" not in vars(m)]
    return _swap_checked(mlps, _fused_forward, lambda m: m.gate_proj.weight)


# --- RMSNorm -----------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, computed in float32 (or float64) as
    Llama's norm is, keeping ``x`` and the (..., 1) inverse root mean square only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = _inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return _scaled(x, weight, rstd)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd  # x-hat, recomputed
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # y = w x-hat, x-hat = x r, r = (mean(x^2) + eps)^(-1/2): dx = r (g - x-hat mean(g x-hat)), g = w dy
            g = (grad_out * weight).to(rstd.dtype)
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., 1) ``rsqrt(mean(x^2) + eps)`` in float32, or float64 for a float64 ``x``."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _scaled(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The norm's output from its input and inverse RMS, in Llama's order of operations and casts."""
    return weight * (x.to(rstd.dtype) * rstd).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of ``x`` (..., H) with ``weight`` (H,); under autograd it keeps ``x`` and one
    number a row. A weight that is not all there (ZeRO-3 or FSDP sharding) takes the plain path."""
    whole = weight.shape == x.shape[-1:] and not hasattr(weight, "ds_id")
    if torch.is_grad_enabled() and whole and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _scaled(x, weight, _inverse_rms(x, eps))


def _norm_forward(self, x):
    return rms_norm(x, self.weight, self.variance_epsilon)


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every Llama-style RMSNorm of ``model`` the lean forward; returns how many. A norm class
    whose first instance's output differs, in any bit, from its own forward's keeps its own."""
    norms = [m for m in model.modules() if _is_rms_norm(m) and "forward" not in vars(m)]
    return _swap_checked(norms, _norm_forward, lambda m: m.weight)


# --- swapping them in --------------------------------------------------------------------------


def _swap_checked(modules: list[nn.Module], forward, weight) -> int:
    """Give ``modules`` the method ``forward``, per class, where the class's first instance returns
    what its own forward did, bit for bit, on random input shaped for ``weight(module)`` (its last
    dimension: the input features), in that weight's dtype and device; returns how many were swapped."""
    swapped = 0
    for cls in dict.fromkeys(type(m) for m in modules):
        same = [m for m in modules if type(m) is cls]
        w = weight(same[0])
        with torch.no_grad():
            x = torch.randn(2, 3, w.shape[-1], dtype=w.dtype, device=w.device)
            if not torch.equal(forward(same[0], x), same[0](x)):
                continue
        for m in same:
            m.forward = types.MethodType(forward, m)
        swapped += len(same)
    return swapped


def fuse_layers(model: nn.Module) -> dict[str, int]:
    """Both swaps above; how many modules each changed."""
    return {"gated_mlp": fuse_gated_mlps(model), "rms_norm": fuse_rms_norms(model)}
