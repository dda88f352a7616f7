import math

import pytest
import torch

import rebelrl.logprobs as logprobs_module
from rebelrl.logprobs import completion_logprobs, linear_token_logprobs, masked_mean, masked_sum, position_ids_from_mask, token_logprobs
from rebelrl.rollout import HFGenerator, SamplingParams, encode_prompts
from rebelrl.types import Conversation
from tests import families


def test_token_logprobs_temperature_hand_derived():
    """Logits (0, ln 3) at T = 1: softmax (1/4, 3/4). At T = 0.5 the logits become (0, 2 ln 3),
    softmax (1/10, 9/10). Label 1 -> log(3/4) and log(9/10)."""
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    labels = torch.tensor([[1]])
    assert token_logprobs(logits, labels, 1.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert token_logprobs(logits, labels, 0.5).item() == pytest.approx(math.log(0.9), abs=1e-6)
    with pytest.raises(ValueError):
        token_logprobs(logits, labels, 0.0)


def test_token_logprobs_equals_log_softmax_and_keeps_bf16_input():
    logits = torch.randn(3, 5, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    out = token_logprobs(logits, labels, 0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_masked_sum_and_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(values, mask).tolist() == [3.0, 0.0]
    assert masked_mean(values, mask, dim=1).tolist() == [1.5, 0.0]
    assert masked_mean(values, mask).item() == 1.5


def test_position_ids_start_at_zero_after_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padding_does_not_change_completion_logprobs(model, tokenizer):
    prompts = [Conversation.from_prompt("hi"), Conversation.from_prompt("a much longer prompt here")]
    ids, mask = encode_prompts(tokenizer, prompts)
    completion = torch.tensor([[5, 6, 7], [5, 6, 7]])
    cmask = torch.ones_like(completion)
    batched = completion_logprobs(model, ids, mask, completion, cmask, 0.8)
    alone = completion_logprobs(model, ids[:1, mask[0].bool()], mask[:1, mask[0].bool()], completion[:1], cmask[:1], 0.8)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_forward_reproduces_sampling_time_logprobs(model, tokenizer, temperature):
    """The log-probs that the training forward pass recomputes equal those recorded while sampling."""
    prompts = [Conversation.from_prompt(t) for t in ["hello", "how are you today?", "x"]]
    rollout = HFGenerator(model, tokenizer, batch_size=2).generate(prompts, 2, SamplingParams(temperature, max_new_tokens=12))
    recomputed = completion_logprobs(
        model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, temperature
    )
    diff = (recomputed - rollout.sample_logps).abs().max().item()
    print(f"max |log pi_train - log pi_sample| = {diff:.2e} (T={temperature})")
    assert diff < 1e-4
    assert (rollout.sample_logps[rollout.completion_mask == 0] == 0).all()


# ---- the chunked output head --------------------------------------------------------------------


def _plain_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """The textbook recipe: full logits of every position, log-softmax, gather."""
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False).logits
    T = completion_ids.shape[1]
    return token_logprobs(logits[:, -T - 1 : -1], completion_ids, temperature) * completion_mask


def _batch(vocab: int, B: int = 4, P: int = 6, T: int = 7, seed: int = 0):
    """Left-padded prompts and right-padded completions of mixed lengths, with a column that is padding in every row on each side."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (B, P + 1), generator=g)
    completion_ids = torch.randint(3, vocab, (B, T + 1), generator=g)
    prompt_mask = torch.ones(B, P + 1, dtype=torch.long)
    completion_mask = torch.ones(B, T + 1, dtype=torch.long)
    for b in range(B):
        prompt_mask[b, : 1 + b % 3] = 0
        completion_mask[b, T - b % 4 :] = 0
    return prompt_ids, prompt_mask, completion_ids * completion_mask, completion_mask


def test_linear_token_logprobs_hand_derived():
    """h = ln 3, W = [[1], [0]]: logits (ln 3, 0), softmax (3/4, 1/4).
    log p(0) = ln(3/4); d/dh = sum_v (onehot - p)_v W_v = (1 - 3/4) * 1 + (0 - 1/4) * 0 = 1/4;
    d/dW = (onehot - p) h = (ln3 / 4, -ln3 / 4)."""
    h = torch.tensor([[math.log(3.0)]], requires_grad=True)
    W = torch.tensor([[1.0], [0.0]], requires_grad=True)
    out = linear_token_logprobs(h, W, torch.tensor([0]))
    assert out.item() == pytest.approx(math.log(0.75), abs=1e-6)
    out.sum().backward()
    assert h.grad.item() == pytest.approx(0.25, abs=1e-6)
    torch.testing.assert_close(W.grad, torch.tensor([[math.log(3) / 4], [-math.log(3) / 4]]))


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_linear_token_logprobs_and_gradients_equal_the_full_softmax(chunk):
    """Against log_softmax of the whole float64 logits, with a weighted sum so each row's gradient differs."""
    torch.manual_seed(0)
    h = torch.randn(13, 8, requires_grad=True)
    W = torch.randn(50, 8, requires_grad=True)
    y, g = torch.randint(0, 50, (13,)), torch.randn(13)
    ours = linear_token_logprobs(h, W, y, temperature=0.7, chunk=chunk)
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    full = torch.log_softmax(h64 @ W64.T / 0.7, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(ours.double(), full, atol=1e-5, rtol=0)
    (ours * g).sum().backward()
    (full * g.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(W.grad.double(), W64.grad, atol=1e-5, rtol=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["chatml", "neox", "gemma"])
def test_completion_logprobs_and_gradients_equal_the_plain_recipe(family, monkeypatch):
    """Chunked head (tied and untied), in several chunks, with padding on both sides: the same
    log-probs and the same gradient on every parameter as full logits + log-softmax."""
    monkeypatch.setattr(logprobs_module, "CHUNK_ELEMENTS", 5 * 120)  # a few rows a chunk
    tok = families._tokenizer(family)
    model = families._model(family, tok, seed=0)
    batch = _batch(len(tok))
    weights = torch.tensor([1.0, -0.5, 0.25, 2.0])  # (B,) so that each row's gradient counts differently
    model.zero_grad()
    plain = _plain_logprobs(model, *batch, 0.7)
    (plain.sum(1) * weights).sum().backward()
    expected = _grads(model)
    model.zero_grad()
    ours = completion_logprobs(model, *batch, 0.7)
    (ours.sum(1) * weights).sum().backward()
    assert ours.shape == plain.shape
    torch.testing.assert_close(ours, plain, atol=2e-6, rtol=0)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4, msg=name)


def test_soft_capped_logits_take_the_plain_path():
    """A head followed by soft-capping is not a plain linear map: found on the first call, the model is
    then scored with its own logits, and the result still equals the plain recipe."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = families._tokenizer("gemma")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, pad_token_id=tok.pad_token_id)).eval()
    batch = _batch(len(tok))
    with torch.no_grad():
        first, again, plain = (completion_logprobs(model, *batch, 0.7), completion_logprobs(model, *batch, 0.7), _plain_logprobs(model, *batch, 0.7))
    assert logprobs_module._HEAD_IS_PLAIN[model] is False
    torch.testing.assert_close(first, plain, atol=2e-6, rtol=0)
    torch.testing.assert_close(again, plain, atol=2e-6, rtol=0)


def test_lora_policy_and_its_reference_view_take_the_chunked_path():
    from rebelrl.models import AdapterDisabled, apply_lora

    tok = families._tokenizer("chatml")
    policy = apply_lora(families._model("chatml", tok, seed=0), 4, 16.0, 0.0, "all-linear")
    for p in policy.parameters():  # a non-zero adapter, so "adapter on" and "off" differ
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = _batch(len(tok))
    with torch.no_grad():
        on, off = completion_logprobs(policy, *batch, 1.0), completion_logprobs(AdapterDisabled(policy), *batch, 1.0)
        torch.testing.assert_close(on, _plain_logprobs(policy, *batch, 1.0), atol=2e-6, rtol=0)
        torch.testing.assert_close(off, _plain_logprobs(AdapterDisabled(policy), *batch, 1.0), atol=2e-6, rtol=0)
    assert (on - off).abs().max() > 1e-3
    assert logprobs_module._HEAD_IS_PLAIN[policy.get_base_model()] is True


def test_activation_checkpointing_recomputes_layers_and_keeps_gradients():
    """With checkpointing each decoder layer runs again in the backward pass, dropout stays off (the
    model stays in eval mode), and the gradients are those of the plain pass."""
    tok = families._tokenizer("chatml")
    model = families._model("chatml", tok, seed=0)
    model.config.attention_dropout = 0.5  # would show if the layers were put in training mode
    batch = _batch(len(tok))
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # a pre-hook: the recompute stops early
    completion_logprobs(model, *batch, 0.7).sum().backward()
    expected, plain_calls = _grads(model), len(calls)
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    calls.clear()
    completion_logprobs(model, *batch, 0.7).sum().backward()
    assert (plain_calls, len(calls)) == (1, 2)
    assert not any(m.training for m in model.modules())
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def _padded(ids, mask, left: int, right: int, pad: int = 0):
    """Extra padding columns: ``left`` before the prompts or ``right`` after the completions."""
    pad_ids = torch.nn.functional.pad(ids, (left, right), value=pad)
    return pad_ids, torch.nn.functional.pad(mask, (left, right), value=0)


def test_float32_batches_cost_their_own_longest_row(model, tokenizer, monkeypatch):
    """Padding columns no row uses are cut before the forward (the network sees 9 prompt + 4
    completion columns, not 14 + 10); values and gradients equal the uncut computation."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [Conversation.from_prompt("hello"), Conversation.from_prompt("hi")])
    completion_ids = torch.randint(5, 60, (2, 4))
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    wide_p, wide_pm = _padded(prompt_ids, prompt_mask, 5, 0)
    wide_c, wide_cm = _padded(completion_ids, completion_mask, 0, 6)
    seen = []
    real_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, **kw: seen.append(kw["input_ids"].shape[1]) or real_forward(self, **kw))

    def value_and_grads(*batch):
        model.zero_grad()
        out = completion_logprobs(model, *batch, temperature=0.7)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    narrow, narrow_grads = value_and_grads(prompt_ids, prompt_mask, completion_ids, completion_mask)
    wide, wide_grads = value_and_grads(wide_p, wide_pm, wide_c, wide_cm)
    assert seen == [prompt_ids.shape[1] + 4] * 2
    assert wide.shape == (2, 10) and (wide[:, 4:] == 0).all()
    torch.testing.assert_close(wide[:, :4], narrow, atol=1e-6, rtol=0)
    for a, b in zip(wide_grads, narrow_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rollout_logprobs_keep_the_rollouts_row_order(model, tokenizer):
    """Rows are computed in batches of similar length and come back where they were."""
    prompts = [Conversation.from_prompt(t) for t in ["a much longer prompt than the others", "hi", "mid size one", "x"]]
    rollout = HFGenerator(model, tokenizer).generate(prompts, 2, SamplingParams(1.0, max_new_tokens=6))
    together = logprobs_module.rollout_logprobs(model, rollout, 1.0, batch_size=3)
    for row in range(len(rollout)):
        s = slice(row, row + 1)
        alone = completion_logprobs(model, rollout.prompt_ids[s], rollout.prompt_mask[s], rollout.completion_ids[s], rollout.completion_mask[s])
        torch.testing.assert_close(together[s], alone.detach(), atol=1e-6, rtol=0)
