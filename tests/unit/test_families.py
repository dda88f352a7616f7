"""Any causal LM, any chat format: REBEL and REFUEL through the CLI on a tiny model of each family,
with log pi_t equal to the training forward in float32 and bfloat16, and turn spans that select
exactly each reply's tokens whatever token the template ends a turn with."""

import pytest
import torch
from transformers import AutoTokenizer

from rebelrl.cli import main
from rebelrl.models import load_tokenizer
from rebelrl.rollout.chat import render
from rebelrl.rollout.dialogue import encode_dialogue
from rebelrl.types import Conversation, Message
from tests.families import FAMILIES, TERMINATORS, build_family
from tests.tiny_run import REFUEL_ARGS, TINY_ARGS, read_jsonl, setup_task

TOL = 1e-3  # nats a reply


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(family, root / family) for family in FAMILIES}


def _run(tmp_path, monkeypatch, args, model_dir, dtype, name):
    prompts = setup_task(tmp_path, monkeypatch)
    run_dir = tmp_path / name
    extra = [f"task.prompts={prompts}"] if "algo=refuel" not in args else []
    assert main(["train", *args, *extra, f"model.name={model_dir}", f"model.dtype={dtype}", "iterations=1", f"run_dir={run_dir}"]) == 0
    return read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algo", ["rebel", "refuel"])
def test_one_iteration_with_exact_pi_t(tmp_path, monkeypatch, family_dirs, family, dtype, algo):
    args = TINY_ARGS if algo == "rebel" else REFUEL_ARGS
    metrics, evals = _run(tmp_path, monkeypatch, args, family_dirs[family], dtype, f"{algo}-{family}-{dtype}")
    first = metrics[0]
    assert first["logp_mismatch_max"] < TOL, first["logp_mismatch_max"]
    # the sampler's record is reused only in float32; in bfloat16 it is off by far more than TOL
    assert first["old_logps_recomputed"] == (0.0 if dtype == "float32" else 1.0)
    assert abs(evals[0]["kl_to_ref"]) < TOL  # iteration 0: pi = pi_ref
    assert torch.isfinite(torch.tensor(first["loss"]))
    assert first["response_length"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_turn_spans_select_exactly_each_reply(family_dirs, family):
    tokenizer = load_tokenizer(str(family_dirs[family]))
    terminator = tokenizer.convert_tokens_to_ids(TERMINATORS[family])
    dialogue = Conversation((
        Message("user", "hello there"),
        Message("assistant", "abc d"),  # ended by the policy: its terminator belongs to the turn
        Message("user", "more"),
        Message("assistant", "xy z", finished=False),  # cut at the budget: the template's terminator does not
        Message("user", "ok"),
        Message("assistant", "last"),
    ))
    ids, spans = encode_dialogue(tokenizer, dialogue)
    replies = [m for m in dialogue.messages if m.role == "assistant"]
    assert len(spans) == 3
    for k, ((start, end), reply) in enumerate(zip(spans, replies)):
        expected = tokenizer(reply.content, add_special_tokens=False).input_ids + ([terminator] if reply.finished else [])
        assert ids[start:end] == expected, (family, k, tokenizer.decode(ids[start:end]))
        # everything before the span is the prompt the policy saw for that turn
        turn_index = [i for i, m in enumerate(dialogue.messages) if m.role == "assistant"][k]
        prompt = render(tokenizer, dialogue.to_chat()[:turn_index], add_generation_prompt=True)
        assert ids[:start] == tokenizer(prompt, add_special_tokens=False).input_ids


def test_a_model_without_chat_template_reads_plain_text(family_dirs):
    """The NeoX checkpoint ships no chat template: prompts are the user's text itself."""
    folder = family_dirs["neox"]
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    tokenizer = load_tokenizer(str(folder))
    chat = [{"role": "user", "content": "Summarize: cats sleep a lot. TL;DR:"}]
    assert render(tokenizer, chat, add_generation_prompt=True) == "Summarize: cats sleep a lot. TL;DR:"
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(str(folder), "chat")
