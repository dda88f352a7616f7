"""The lean gated MLP and RMSNorm: the same function and gradients, fewer saved activations."""

import pytest
import torch
from torch import nn

from rebelrl.fused import _RMSNorm, _SwiGLUDown, fuse_gated_mlps, fuse_layers, fuse_rms_norms, rms_norm, swiglu_down
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
    """Bytes the backward pass keeps: each distinct storage once, however many ops save it."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        graph = model(input_ids=ids).logits.sum()  # holds every saved tensor, so no storage is freed and reused
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(n for ptr, n in storages.items() if ptr not in weights)
    del graph
    return total


def _assert_train_the_same(plain, fused, ids) -> None:
    """The same logits bit for bit, and the same gradients of every weight."""
    for model in (plain, fused):
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_a_fused_llama_keeps_two_intermediate_tensors_fewer_and_trains_the_same():
    tokenizer = tiny_tokenizer()
    plain, fused = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=0)
    layers = plain.config.num_hidden_layers
    assert fuse_gated_mlps(fused) == layers
    ids = torch.randint(4, 60, (2, 7))
    saved_plain, saved_fused = _saved_bytes(plain, ids), _saved_bytes(fused, ids)
    intermediate = 2 * 7 * plain.config.intermediate_size * 4  # one (B, T, I) float32 tensor
    assert saved_plain - saved_fused == 2 * intermediate * layers  # silu(gate) and the product, in every layer
    _assert_train_the_same(plain, fused, ids)


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


# --- RMSNorm ---------------------------------------------------------------------------------------


def _llama_norm(x, weight, eps):
    """Llama's RMSNorm as Transformers writes it."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def test_norm_gradients_equal_autograds_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNorm.apply(a, w, 1e-5), (x, weight))
    grad_out = torch.randn(2, 3, 6, dtype=torch.float64)
    fused = torch.autograd.grad(_RMSNorm.apply(x, weight, 1e-5), (x, weight), grad_out)
    by_hand = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight  # float64 throughout
    plain = torch.autograd.grad(by_hand, (x, weight), grad_out)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_norm_hand_derived():
    """x = (3, 4), eps = 0: mean(x^2) = 12.5, r = 1/sqrt(12.5), x-hat = x r, y = w x-hat. With w = 1 and
    upstream gradient (1, 0): g = (1, 0), mean(g x-hat) = 3r/2, dx = r ((1, 0) - x-hat 3r/2)
    = r (1 - 9r^2/2, -12r^2/2) = r (0.64, -0.48); dw = x-hat g = (3r, 0)."""
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.ones(2, dtype=torch.float64, requires_grad=True)
    y = rms_norm(x, weight, 0.0)
    r = 12.5 ** -0.5
    torch.testing.assert_close(y, torch.tensor([[3 * r, 4 * r]], dtype=torch.float64))
    y[0, 0].backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.64 * r, -0.48 * r]], dtype=torch.float64))
    torch.testing.assert_close(weight.grad, torch.tensor([3 * r, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_forward_is_llamas_bit_for_bit_and_its_gradients_close(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 5, 64) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    fused, plain = rms_norm(x, weight, 1e-5), _llama_norm(x, weight, 1e-5)
    assert torch.equal(fused, plain)
    grad_out = torch.randn_like(plain)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(torch.autograd.grad(fused, (x, weight), grad_out), torch.autograd.grad(plain, (x, weight), grad_out)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_norm_keeps_its_input_and_one_number_a_row():
    x = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.ones(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, weight, 1e-6)
    assert sorted(tuple(t.shape) for t in saved) == [(2, 7, 1), (2, 7, 16), (16,)]


def test_fused_norms_keep_one_hidden_tensor_fewer_each_and_train_the_same():
    tokenizer = tiny_tokenizer()
    plain, fused = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=0)
    layers = plain.config.num_hidden_layers
    assert fuse_layers(fused) == {"gated_mlp": layers, "rms_norm": 2 * layers + 1}  # two a layer and the final norm
    ids = torch.randint(4, 60, (2, 7))
    hidden = 2 * 7 * plain.config.hidden_size * 4  # one (B, T, H) float32 tensor
    intermediate = 2 * 7 * plain.config.intermediate_size * 4
    # Each norm drops x-hat (B, T, H) and keeps the inverse RMS (B, T, 1) where autograd kept the same
    # (B, T, 1) from rsqrt; each gated MLP drops two (B, T, I) tensors.
    assert _saved_bytes(plain, ids) - _saved_bytes(fused, ids) == (2 * layers + 1) * hidden + layers * 2 * intermediate
    _assert_train_the_same(plain, fused, ids)


def test_norms_of_another_formula_are_left_alone():
    gemma = families._model("gemma", families._tokenizer("gemma"), 0)  # (1 + weight), scaled in float32
    assert fuse_rms_norms(gemma) == 0
    assert fuse_rms_norms(nn.Sequential(nn.LayerNorm(4))) == 0


def test_each_norm_class_is_checked_on_its_own():
    """A model whose final norm is of another formula (and class) keeps that one as it is, and still
    gets the lean layer norms."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0)
    norm_class = type(model.model.norm)

    class DoubledRMSNorm(norm_class):  # same attributes, another function
        def forward(self, x):
            return 2 * super().forward(x)

    model.model.norm.__class__ = DoubledRMSNorm
    assert fuse_rms_norms(model) == 2 * model.config.num_hidden_layers
    assert "forward" not in vars(model.model.norm)
    x = torch.randn(1, 2, model.config.hidden_size)
    torch.testing.assert_close(model.model.norm(x), 2 * rms_norm(x, model.model.norm.weight, model.model.norm.variance_epsilon))
