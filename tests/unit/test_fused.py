"""The lean gated MLP: the same function and gradients, half the saved activations."""

import pytest
import torch
from torch import nn

from rebelrl.fused import _SwiGLUDown, fuse_gated_mlps, swiglu_down
from rebelrl.models import tiny_model, tiny_tokenizer
from tests import families


def test_gradients_equal_autograds_in_float64():
    torch.manual_seed(0)
    gate, up = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUDown.apply, (gate, up, weight, bias))
    grad_out = torch.randn(2, 3, 4, dtype=torch.float64)
    fused = torch.autograd.grad(_SwiGLUDown.apply(gate, up, weight, bias), (gate, up, weight, bias), grad_out)
    plain = torch.autograd.grad(nn.functional.linear(nn.functional.silu(gate) * up, weight, bias), (gate, up, weight, bias), grad_out)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_silu_derivative_hand_derived():
    """silu(g) = g sigmoid(g): at g = 0 the slope is 1/2; silu(0) * u = 0, so with weight 1, bias 0
    and up 2, d out / d gate = 2 * 1/2 = 1 and d out / d up = 0."""
    gate, up = torch.zeros(1, 1, requires_grad=True), torch.full((1, 1), 2.0, requires_grad=True)
    down = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        down.weight.fill_(1.0)
    swiglu_down(gate, up, down).sum().backward()
    assert gate.grad.item() == pytest.approx(1.0) and up.grad.item() == 0.0


def _saved_bytes(model, ids) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return total


def test_a_fused_llama_keeps_two_intermediate_tensors_fewer_and_trains_the_same():
    tokenizer = tiny_tokenizer()
    plain, fused = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=0)
    layers = plain.config.num_hidden_layers
    assert fuse_gated_mlps(fused) == layers
    ids = torch.randint(4, 60, (2, 7))
    saved_plain, saved_fused = _saved_bytes(plain, ids), _saved_bytes(fused, ids)
    intermediate = 2 * 7 * plain.config.intermediate_size * 4  # one (B, T, I) float32 tensor
    assert saved_plain - saved_fused == 2 * intermediate * layers  # silu(gate) and the product, in every layer
    for model in (plain, fused):
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_other_shapes_are_left_alone(tmp_path):
    neox = families._model("neox", families._tokenizer("neox"), 0)  # GELU MLP without a gate
    assert fuse_gated_mlps(neox) == 0

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0)
    mlp_class = type(model.model.layers[0].mlp)

    class Scaled(mlp_class):  # the same projections, another function
        def forward(self, x):
            return 2 * super().forward(x)

    for layer in model.model.layers:
        layer.mlp.__class__ = Scaled
    assert fuse_gated_mlps(model) == 0
