"""The sampler is the one configured: nothing from a checkpoint's generation config, top-k 0 means
the full distribution, truncation is measured, and evaluation and checkpoints keep RNG streams."""

import math
import os

import pytest
import torch

from rebelrl.eval import evaluate
from rebelrl.logprobs import completion_logprobs
from rebelrl.models import load_causal_lm, load_tokenizer, tiny_model, tiny_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams, encode_prompts
from rebelrl.seeding import rng_state, seeded, set_rng_state
from rebelrl.train.checkpoint import CheckpointError, load_trainer_state
from rebelrl.types import Conversation
from tests.families import build_family

PROMPT = [Conversation.from_prompt("tell me something")]


def first_token_probs(model, tokenizer, temperature=1.0):
    ids, mask = encode_prompts(tokenizer, PROMPT)
    logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    return torch.softmax(logits / temperature, dim=-1)


def first_tokens(model, tokenizer, params, n=3000):
    torch.manual_seed(0)
    rollout = HFGenerator(model, tokenizer, batch_size=1).generate(PROMPT, n, SamplingParams(**{**params.__dict__, "max_new_tokens": 1}))
    return rollout.completion_ids[:, 0], rollout


def test_top_k_zero_samples_from_the_full_vocabulary():
    """Uniform logits over ~100 tokens: 3000 draws hit nearly all of them. Transformers' global
    default top-k of 50 would leave at most 50."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # hidden state 0 -> all logits 0 -> uniform
    tokens, _ = first_tokens(model, tokenizer, SamplingParams(temperature=1.0, top_k=0))
    assert len(set(tokens.tolist())) > 90


@pytest.fixture(scope="module")
def opinionated(tmp_path_factory):
    """A checkpoint whose generation config asks for temperature 0.3, top-p 0.5, top-k 5 and a
    repetition penalty of 1.5, with logits spread enough that any of them would show."""
    folder = build_family("sampling-defaults", tmp_path_factory.mktemp("defaults") / "model")
    model, tokenizer = load_causal_lm(str(folder)), load_tokenizer(str(folder))
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    return model, tokenizer


def test_a_checkpoints_generation_config_does_not_reach_the_sampler(opinionated):
    model, tokenizer = opinionated
    p = first_token_probs(model, tokenizer)  # the configured distribution: temperature 1, nothing truncated
    tokens, rollout = first_tokens(model, tokenizer, SamplingParams(temperature=1.0), n=4000)
    empirical = torch.bincount(tokens, minlength=p.numel()).float() / len(tokens)
    assert len(set(tokens.tolist())) > 5  # top-k 5 / top-p 0.5 would leave at most 5
    assert 0.5 * (empirical - p).abs().sum() < 0.25  # sampling noise ~0.12; temperature 0.3 alone would give 0.85
    assert rollout.dropped_mass.abs().max() == 0
    assert model.generation_config.top_k == 5 and model.generation_config.repetition_penalty == 1.5  # left as it was


def test_recorded_log_probs_are_the_training_forwards_despite_a_repetition_penalty_in_the_checkpoint(opinionated):
    model, tokenizer = opinionated
    torch.manual_seed(0)
    prompts = PROMPT + [Conversation.from_prompt("abab abab")]
    rollout = HFGenerator(model, tokenizer).generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=12))
    forward = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    assert (rollout.sample_logps - forward).abs().sum(1).max() < 1e-4


def test_top_k_truncation_is_applied_and_its_dropped_mass_recorded(opinionated):
    """top-k 3 at temperature 0.8: only the 3 most likely first tokens are drawn, and the mass
    recorded for the first step is 1 - (their probability under softmax(logits / 0.8))."""
    model, tokenizer = opinionated
    p = first_token_probs(model, tokenizer, temperature=0.8)
    top3 = p.topk(3)
    tokens, rollout = first_tokens(model, tokenizer, SamplingParams(temperature=0.8, top_k=3), n=500)
    assert set(tokens.tolist()) <= set(top3.indices.tolist())
    torch.testing.assert_close(rollout.dropped_mass[:, 0], torch.full((500,), 1 - top3.values.sum().item()), atol=1e-5, rtol=0)
    # the log-probs stay those of pi_t, the full softmax, not of the truncated sampler
    torch.testing.assert_close(rollout.sample_logps[:, 0], p.log()[tokens], atol=1e-5, rtol=0)


def test_min_new_tokens_masks_the_stop_tokens_and_counts_their_mass(opinionated):
    model, tokenizer = opinionated
    torch.manual_seed(0)
    rollout = HFGenerator(model, tokenizer).generate(PROMPT, 8, SamplingParams(temperature=1.0, max_new_tokens=6, min_new_tokens=6))
    assert (rollout.completion_lengths == 6).all()
    p = first_token_probs(model, tokenizer)
    torch.testing.assert_close(rollout.dropped_mass[:, 0], p[tokenizer.eos_token_id].expand(8), atol=1e-6, rtol=0)


def test_greedy_evaluation_reports_a_log_ratio_not_a_kl(model, tokenizer):
    generator = HFGenerator(model, tokenizer)
    reward = lambda convs: [0.0] * len(convs)  # noqa: E731
    sampled, _, _ = evaluate(generator, model, PROMPT * 2, reward, SamplingParams(temperature=0.7, max_new_tokens=4), 0, None)
    greedy, _, _ = evaluate(generator, model, PROMPT * 2, reward, SamplingParams(temperature=0, max_new_tokens=4), 0, None)
    assert "kl_to_ref" in sampled and "kl_to_ref" not in greedy and "greedy_logratio_to_ref" in greedy


def test_seeded_blocks_leave_the_cpu_stream_where_it_was():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with seeded(99):
        torch.rand(5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_blocks_leave_the_cuda_stream_where_it_was():
    torch.manual_seed(3)
    expected = torch.rand(3, device="cuda")
    torch.manual_seed(3)
    with seeded(99):
        torch.rand(5, device="cuda")
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "trainer_state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_trainer_state(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert rng_state()["cuda"] == [] or torch.cuda.is_available()


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-file-was-executed",))


def test_a_trainer_state_holding_a_pickled_callable_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"iteration": 1, "x": _Planted()}, tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_trainer_state(tmp_path)
    assert not (tmp_path / "planted-file-was-executed").exists()




def test_bfloat16_logits_are_cast_before_the_temperature_divides_them():
    """The scores a token is drawn from are float32(logits) / T, the distribution log pi_t describes.
    bfloat16 logits of about 10 are spaced 1/16 apart; dividing them by 0.7 in bfloat16 first rounds
    each quotient to that spacing again (14.2857 -> 14.25), so the draw would follow another softmax."""
    from rebelrl.rollout.hf import _Distribution

    logits = (torch.arange(64, dtype=torch.float32) / 8 + 7).to(torch.bfloat16)[None]  # (1, 64) values in [7, 15)
    dist = _Distribution(SamplingParams(temperature=0.7, max_new_tokens=4), prompt_length=1, stop_ids=[0], pad_lengths=torch.zeros(1, dtype=torch.long))
    logp, scores, dropped = dist(torch.zeros(1, 1, dtype=torch.long), logits, torch.arange(1))
    assert scores.dtype == torch.float32
    assert torch.equal(scores, logits.float() / 0.7)
    assert torch.allclose(torch.log_softmax(scores, dim=-1), logp, atol=1e-6)
    assert dropped is None
