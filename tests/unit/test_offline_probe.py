"""Hostile inputs and interruptions of the offline methods: a margin past float's range, a damaged or
edited reference cache under --resume, a reward-model path that is not a model folder, and message
text that spells a control token when a reward model's tokenizer has no chat template."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rebelrl.algos import offline
from rebelrl.data import load_preference_rows
from rebelrl.data.preferences import PreferenceDataError
from rebelrl.models import ModelNotFoundError, load_tokenizer
from rebelrl.rewards.reward_model import RewardModelScorer
from rebelrl.types import Conversation
from tests.tiny_run import die_after_logging, read_jsonl, strip_timings
from tests.unit.test_offline import train


def test_a_margin_past_floats_range_is_a_row_error(tmp_path):
    """JSON integers have no size limit: 10**400 cannot become a float and is refused like inf."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "y", "margin": ' + "9" * 400 + "}\n")
    with pytest.raises(PreferenceDataError, match=r"line 1, field 'margin': expected a finite number, got inf"):
        load_preference_rows(str(path))


def _rewrite(path, change):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: change(v) for k, v in load_file(path).items()}, str(path), metadata=metadata)


TAMPER = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "edited values, key kept": lambda p: _rewrite(p, lambda v: v + 1.0),
    "fewer rows, key kept": lambda p: _rewrite(p, lambda v: v[:3]),
    "float64, key kept": lambda p: _rewrite(p, lambda v: v.double()),
}


@pytest.mark.parametrize("tamper", list(TAMPER))
def test_a_damaged_reference_cache_is_recomputed_on_resume(tmp_path, monkeypatch, tamper):
    """A killed run whose ref_logps.safetensors was then damaged or edited resumes to the uninterrupted
    run's metrics: the cache is read only when whole and unchanged, else computed again."""
    full = train(tmp_path, "dpo", "iterations=4", "task.n_train=16", name="full")
    with monkeypatch.context() as patch:
        die_after_logging(patch, 3)
        train(tmp_path, "dpo", "iterations=4", "task.n_train=16", name="killed", exit_code=130)
    TAMPER[tamper](tmp_path / "killed" / offline.REF_CACHE)
    killed = train(tmp_path, "dpo", "iterations=4", "task.n_train=16", "--resume", name="killed")
    assert strip_timings(read_jsonl(killed / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))
    assert strip_timings(read_jsonl(killed / "eval.jsonl")) == strip_timings(read_jsonl(full / "eval.jsonl"))
    cached, fresh = load_file(killed / offline.REF_CACHE), load_file(full / offline.REF_CACHE)
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)


def test_a_kill_while_the_reference_cache_is_written_leaves_a_run_resume_continues(tmp_path, monkeypatch):
    full = train(tmp_path, "dpo", "iterations=2", name="full")
    real = offline.save_file

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(offline, "save_file", save_then_die)
        train(tmp_path, "dpo", "iterations=2", name="killed", exit_code=130)
    killed = train(tmp_path, "dpo", "iterations=2", "--resume", name="killed")
    assert not list(killed.glob("*.rebelrl-tmp"))
    assert strip_timings(read_jsonl(killed / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))


def test_a_reward_model_path_that_is_not_a_model_folder_is_one_line(tmp_path):
    """The run folder of algo=reward_model given instead of its reward_model/ folder: the error points to it."""
    (tmp_path / "rm" / "reward_model").mkdir(parents=True)
    (tmp_path / "rm" / "reward_model" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"holds no config.json\); its trained model is in .*rm/reward_model"):
        RewardModelScorer.from_pretrained(str(tmp_path / "rm"))
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        RewardModelScorer.from_pretrained(str(tmp_path / "missing"))


def test_message_text_never_becomes_a_control_token_without_a_chat_template():
    tokenizer = load_tokenizer("tiny-random", "chat")
    tokenizer.chat_template = None
    scorer = RewardModelScorer(torch.nn.Linear(1, 1), tokenizer)
    text = " ".join(tokenizer.all_special_tokens)
    (ids,) = scorer.encode([Conversation.from_prompt(f"hi {text}").with_reply(f"ok {text}")])
    added = set(tokenizer("x")["input_ids"]) - set(tokenizer("x", add_special_tokens=False)["input_ids"])
    assert not [i for i in ids if i in tokenizer.all_special_ids and i not in added], tokenizer.convert_ids_to_tokens(ids)
