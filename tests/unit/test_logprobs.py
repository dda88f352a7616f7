import math

import pytest
import torch

from rebelrl.logprobs import completion_logprobs, masked_mean, masked_sum, position_ids_from_mask, token_logprobs
from rebelrl.rollout import HFGenerator, SamplingParams, encode_prompts
from rebelrl.types import Conversation


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
