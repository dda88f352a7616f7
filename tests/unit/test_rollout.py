import pytest
import torch

from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.rollout.hf import truncate_at_eos
from rebelrl.types import Conversation

EOS, PAD = 9, 0


def test_truncate_keeps_first_eos_and_drops_the_rest():
    raw = torch.tensor(
        [
            [4, 5, EOS, 6, EOS],  # ends at 3 tokens, text after EOS dropped
            [EOS, 4, 4, 4, 4],  # empty reply: only EOS
            [4, 4, 4, 4, 4],  # never ended
        ]
    )
    ids, mask, finished = truncate_at_eos(raw, [EOS], PAD)
    assert finished.tolist() == [True, True, False]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ids.tolist() == [[4, 5, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [4, 4, 4, 4, 4]]


def test_truncate_trims_to_the_longest_kept_length_and_knows_several_eos_ids():
    raw = torch.tensor([[4, 7, 4, 4], [4, EOS, 4, 4]])
    ids, mask, finished = truncate_at_eos(raw, [7, EOS], PAD)
    assert ids.tolist() == [[4, 7], [4, EOS]]
    assert mask.tolist() == [[1, 1], [1, 1]]
    assert finished.tolist() == [True, True]


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    assert SamplingParams(temperature=0).logprob_temperature == 1.0


def test_generator_shapes_order_and_flags(model, tokenizer):
    prompts = [Conversation.from_prompt(t) for t in ["one", "two two", "three three three"]]
    rollout = HFGenerator(model, tokenizer, batch_size=2).generate(prompts, 3, SamplingParams(0.9, max_new_tokens=10))
    N = 9
    assert len(rollout) == N and rollout.group_size == 3
    assert rollout.prompt_ids.shape[0] == N and rollout.completion_ids.shape[0] == N
    # prompt-major: rows 3i..3i+2 belong to prompt i
    assert [c.first_user for c in rollout.conversations] == [p.first_user for p in prompts for _ in range(3)]
    # left-padded prompts: the last prompt column is always a real token
    assert rollout.prompt_mask[:, -1].all()
    eos = tokenizer.eos_token_id
    for row in range(N):
        length = int(rollout.completion_mask[row].sum())
        ids = rollout.completion_ids[row, :length].tolist()
        if rollout.finished[row]:
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert eos not in ids and length == 10
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert rollout.conversations[row].last_assistant == text


def test_greedy_is_deterministic(model, tokenizer):
    gen = HFGenerator(model, tokenizer)
    prompts = [Conversation.from_prompt("same")]
    a = gen.generate(prompts, 1, SamplingParams(0, max_new_tokens=6))
    b = gen.generate(prompts, 1, SamplingParams(0, max_new_tokens=6))
    assert a.completion_ids.tolist() == b.completion_ids.tolist()
