import pytest
import torch

from transformers import GenerationConfig

from rebelrl.models import load_causal_lm, load_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams, encode_prompts
from rebelrl.rollout.hf import decode, draw, truncate_at_eos
from rebelrl.types import Conversation
from tests.families import build_family

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


def test_draw_inverts_the_cumulative_distribution_and_never_picks_a_removed_token():
    """p = (0.5, 0, 0.25, 0.25): the cumulative distribution is (0.5, 0.5, 0.75, 1), so u in [0, 0.5)
    draws token 0, [0.5, 0.75) token 2 and [0.75, 1) token 3; token 1 (logit -inf) has no interval."""
    scores = torch.tensor([[0.5, 0.0, 0.25, 0.25]]).log().expand(7, 4)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.7499, 0.75, 1 - 2**-53], dtype=torch.float64)
    assert draw(scores, u).tolist() == [0, 0, 0, 2, 2, 3, 3]


def test_draw_matches_the_distribution_over_many_draws():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50), dim=0)
    tokens = draw(p.log().expand(40_000, 50), torch.rand(40_000, dtype=torch.float64))
    empirical = torch.bincount(tokens, minlength=50).float() / 40_000
    assert (empirical - p).abs().max() < 0.01


def _generate_reference(model, prompt_ids, prompt_mask, n, max_new, stop, pad):
    """``generate``'s greedy tokens and their log-probs, the oracle the decoding loop must match."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=[stop], pad_token_id=pad, output_scores=True,
                              return_dict_in_generate=True)
    out = model.generate(input_ids=prompt_ids.repeat_interleave(n, 0), attention_mask=prompt_mask.repeat_interleave(n, 0), generation_config=config)
    tokens = out.sequences[:, prompt_ids.shape[1]:]
    logps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1).gather(2, tokens[:, :, None]).squeeze(2)
    return tokens, logps


@pytest.mark.parametrize("family", ["chatml", "neox", "gemma"])
def test_greedy_decoding_gives_generates_tokens_and_log_probs(family, tmp_path):
    """Prompts of different lengths (left padding), two rows a prompt from one prefill, and a stop
    token that ends some rows early, so rows leave the batch while others go on."""
    folder = build_family(family, tmp_path / family)
    model, tokenizer = load_causal_lm(str(folder)), load_tokenizer(str(folder))
    with torch.no_grad():  # larger weights than the initialiser's, so greedy replies differ between prompts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    prompts = [Conversation.from_prompt(t) for t in ["hi", "a longer opening line", "mid length", "q"]]
    ids, mask = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    free, _ = _generate_reference(model, ids, mask, 2, 12, stop=len(tokenizer) + 5, pad=pad)  # a stop that never comes
    # a token that some rows produce after their first step and others never: those rows stop there
    stop = next(int(t) for t in free[:, 1:].flatten() if not (free == t).any(dim=1).all())
    expected, expected_logps = _generate_reference(model, ids, mask, 2, 12, stop, pad)
    tokens, logps, _ = decode(model, ids, mask, 2, SamplingParams(temperature=0, max_new_tokens=12), [stop], pad)
    assert tokens.tolist() == expected.tolist()
    finished = tokens == stop
    assert finished.any(dim=1).any() and not finished.any(dim=1).all()
    kept = torch.ones_like(tokens, dtype=torch.bool)
    kept[:, 1:] = ~(finished.cumsum(1)[:, :-1] > 0)  # up to and including the stop token
    torch.testing.assert_close(logps[kept], expected_logps[kept], atol=1e-5, rtol=0)


def test_a_prompts_own_seed_gives_it_the_same_samples_whatever_is_beside_it(model, tokenizer):
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    gen = HFGenerator(model, tokenizer)
    alone = gen.generate([Conversation.from_prompt("abc")], 3, params, seeds=[7])
    torch.manual_seed(123)  # the global stream plays no part
    together = gen.generate([Conversation.from_prompt("xyz"), Conversation.from_prompt("abc")], 3, params, seeds=[8, 7])
    T = alone.completion_ids.shape[1]
    assert together.completion_ids[3:, :T].tolist() == alone.completion_ids.tolist()
    other = gen.generate([Conversation.from_prompt("abc")], 3, params, seeds=[9])
    assert other.completion_ids.tolist() != alone.completion_ids.tolist()
    with pytest.raises(ValueError, match="seeds"):
        gen.generate([Conversation.from_prompt("abc")], 3, params, seeds=[1, 2])


def test_greedy_decoding_leaves_the_random_stream_alone(model, tokenizer):
    torch.manual_seed(3)
    HFGenerator(model, tokenizer).generate([Conversation.from_prompt("abc")], 1, SamplingParams(0, max_new_tokens=5))
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))
