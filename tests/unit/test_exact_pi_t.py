"""log pi_t in the regression is the training forward's: the sampler's record is reused only while
a check proves it, evaluation scores what training optimises, and GPU runs resume exactly."""

import pytest
import torch
from safetensors.torch import load_file

from rebelrl.cli import main
from rebelrl.config import ConfigError, load_config
from rebelrl.eval.dialogue import turn_scores
from rebelrl.rollout import hf
from rebelrl.train.config import TrainConfig
from rebelrl.types import Conversation, Message
from tests.tiny_run import TINY_ARGS, die_after_logging, read_jsonl, setup_task, strip_timings


def _train(tmp_path, monkeypatch, name, *extra, exit_code=0):
    prompts = setup_task(tmp_path, monkeypatch)
    run_dir = tmp_path / name
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", *extra]) == exit_code
    return run_dir


def test_a_sampler_record_that_drifts_is_replaced_before_the_first_step(tmp_path, monkeypatch, capsys):
    """A sampler whose log-probs are 0.01 nats a token off (as a bf16 kernel or another engine would
    be): the first-minibatch check catches it, log pi_t is recomputed for that iteration and the
    next, and the run's updates are exactly those of a run that recomputed from the start."""
    exact = _train(tmp_path, monkeypatch, "recompute", "iterations=2", "rollout.old_logprobs=recompute")
    real_decode = hf.decode

    def drifting(*args, **kwargs):
        tokens, logps, dropped = real_decode(*args, **kwargs)
        return tokens, logps + 0.01, dropped

    monkeypatch.setattr(hf, "decode", drifting)
    caught = _train(tmp_path, monkeypatch, "auto", "iterations=2")
    assert "log pi_t is recomputed from now on" in capsys.readouterr().out
    a, b = read_jsonl(exact / "metrics.jsonl"), read_jsonl(caught / "metrics.jsonl")
    assert [m["old_logps_recomputed"] for m in b] == [1.0, 1.0]
    assert all("time/rollout" in m and "score_mean" in m for m in b)
    assert all(m["logp_mismatch_max"] < 1e-4 for m in b)
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    wa = load_file(exact / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    wb = load_file(caught / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_sampler_record_that_matches_is_reused(tmp_path, monkeypatch):
    run = _train(tmp_path, monkeypatch, "run", "iterations=2")
    assert [m["old_logps_recomputed"] for m in read_jsonl(run / "metrics.jsonl")] == [0.0, 0.0]


def test_dialogue_evaluation_applies_the_no_eos_penalty_of_training():
    """Turn 2's reply was cut at the budget: its column scores the penalty, as the turn-h reply does
    in training; the reward sees the other turns as they are."""
    dialogue = Conversation((Message("user", "hi"), Message("assistant", "a"), Message("user", "go"),
                             Message("assistant", "bb", finished=False), Message("user", "go"), Message("assistant", "ccc")))
    length = lambda convs: [float(len(c.last_assistant)) for c in convs]  # noqa: E731
    assert turn_scores(length, [dialogue], 3, no_eos_penalty=-1.0).tolist() == [[1.0, -1.0, 3.0]]
    assert turn_scores(length, [dialogue], 3, no_eos_penalty=None).tolist() == [[1.0, 2.0, 3.0]]


def test_greedy_evaluation_is_refused_for_training():
    with pytest.raises(ConfigError, match="eval.temperature=0"):
        load_config(TrainConfig, None, ["eval.temperature=0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_gpu_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    """On CUDA the sampler draws from the device's generator: evaluation forks it and checkpoints
    store it, so a killed and resumed run repeats the uninterrupted one."""
    full = _train(tmp_path, monkeypatch, "full", "iterations=4")
    state = torch.load(full / "checkpoints" / "iter-000004" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    with monkeypatch.context() as patch:
        die_after_logging(patch, 3)
        _train(tmp_path, monkeypatch, "killed", "iterations=4", exit_code=130)
    _train(tmp_path, monkeypatch, "killed", "iterations=4", "--resume")
    assert strip_timings(read_jsonl(full / "metrics.jsonl")) == strip_timings(read_jsonl(tmp_path / "killed" / "metrics.jsonl"))
