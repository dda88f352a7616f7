"""The offline methods through the CLI on the tiny model, on data written by the test: each learns what
its data teaches, resumes to the uninterrupted run, accumulates gradients exactly, and the pair methods
compute the reference's log-probs once.

The data: every reply is a short phrase; the chosen reply is it in lowercase, the rejected one in
uppercase (a rule a character-level model can learn, and a reward model can tell apart)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from rebelrl.algos import offline
from rebelrl.cli import main
from rebelrl.rewards.reward_model import RewardModelScorer
from rebelrl.types import Conversation
from tests.tiny_run import PLAIN_SGD_ARGS, die_after_logging, read_jsonl, setup_task, strip_timings, use_plain_sgd

PHRASES = ["hello there", "good day", "nice to meet you", "thanks a lot", "see you soon", "have fun", "take care", "all good"]
COMMON = ["model.name=tiny-random", "task.n_eval=8", "update.minibatch_size=8", "update.micro_batch_size=4", "optim.lr=1e-3",
          "optim.schedule=constant", "eval.every=3", "checkpoint.every=3"]
METHODS = {
    "dpo": ["algo=dpo"],
    "ipo": ["algo=dpo", "dpo.loss=ipo", "dpo.beta=0.5"],
    "chipo": ["algo=dpo", "dpo.loss=chipo", "dpo.r_max=5"],
    "hypo": ["algo=hypo", "hypo.kl_coef=0.5", "rollout.max_new_tokens=6", "rollout.samples_per_prompt=2"],
    "reward_model": ["algo=reward_model"],
    "sft": ["algo=sft"],
}


def write_data(tmp_path, n=48):
    rng = random.Random(0)
    rows = [(f"prompt {i}: {rng.choice(['say', 'write', 'tell me', 'go on'])}", rng.choice(PHRASES)) for i in range(n)]
    pairs, demos = tmp_path / "pairs.jsonl", tmp_path / "demos.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": w, "rejected": w.upper()}) + "\n" for p, w in rows))
    demos.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": w}]}) + "\n"
                             if i % 2 else json.dumps({"prompt": p, "completion": w}) + "\n" for i, (p, w) in enumerate(rows)))
    return pairs, demos


def train(tmp_path, method, *extra, name=None, exit_code=0):
    pairs, demos = write_data(tmp_path)
    data = ["task.name=demonstrations", f"task.data={demos}"] if method == "sft" else ["task.name=preferences", f"task.data={pairs}"]
    run_dir = tmp_path / (name or method)
    assert main(["train", *COMMON, *data, *METHODS[method], f"run_dir={run_dir}", *extra]) == exit_code
    return run_dir


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_what_its_data_teaches(tmp_path, method):
    """Pair methods: on held-out pairs the chosen reply's log-ratio rises above the rejected one's
    (implicit reward margin from 0 to clearly positive, every pair ranked right); the reward model
    ranks > 90% of held-out pairs right; SFT's held-out loss on assistant tokens falls."""
    run = train(tmp_path, method, "iterations=6")
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["iteration"] for e in evals] == [0, 3, 6]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 6 and all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    first, last = evals[0], evals[-1]
    if method == "sft":
        assert last["loss"] < first["loss"] - 0.3, (first, last)
        assert last["mean_token_accuracy"] > first["mean_token_accuracy"]
    elif method == "reward_model":
        assert last["rewards/accuracies"] > 0.9
    else:
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
        assert last["rewards/margins"] > 0.2 and last["rewards/accuracies"] == 1.0, last
        assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(metrics[-1])
    if method == "hypo":
        assert all(m["completions"] == 16 for m in metrics) and "hypo/kl" in metrics[-1]


def test_a_trained_reward_model_scores_in_the_online_methods(tmp_path, monkeypatch):
    """The reward model's saved folder is a reward for REBEL through the existing scorer, unchanged:
    it prefers lowercase replies, as trained."""
    run = train(tmp_path, "reward_model", "iterations=6")
    folder = run / "reward_model"
    assert (folder / "config.json").exists()
    scorer = RewardModelScorer.from_pretrained(str(folder))
    prompt = Conversation.from_prompt("prompt 999: say")
    low, high = scorer([prompt.with_reply("see you soon"), prompt.with_reply("SEE YOU SOON")])
    assert low > high
    prompts = setup_task(tmp_path, monkeypatch)
    args = ["train", "model.name=tiny-random", "task.name=prompts", f"task.prompts={prompts}", "task.n_eval=4", "iterations=1",
            "rollout.prompts_per_iter=4", "rollout.max_new_tokens=6", "update.minibatch_size=4", "update.micro_batch_size=4",
            "reward.fn=rebelrl.rewards.reward_model:RewardModelScorer.from_pretrained", f"reward.kwargs.name_or_path={folder}",
            "reward.no_eos_penalty=null", f"run_dir={tmp_path / 'rebel'}"]
    assert main(args) == 0
    assert math.isfinite(read_jsonl(tmp_path / "rebel" / "eval.jsonl")[-1]["reward_mean"])


def test_dpo_with_a_reward_also_evaluates_generations(tmp_path, monkeypatch):
    """A preference task with a reward named: the held-out prompts are sampled and judged as in the
    online methods (reward, KL, win rate) beside the held-out pair metrics."""
    setup_task(tmp_path, monkeypatch)
    run = train(tmp_path, "dpo", "iterations=3", "reward.fn=tiny_rules:lowercase_fraction", "rollout.max_new_tokens=6")
    last = read_jsonl(run / "eval.jsonl")[-1]
    assert {"reward_mean", "kl_to_ref", "win_rate_vs_initial", "rewards/accuracies"} <= set(last)


def test_dpo_with_lora_uses_the_adapter_switched_off_as_reference(tmp_path):
    run = train(tmp_path, "dpo", "iterations=3", "model.lora_r=4", "optim.lr=1e-2")
    evals = read_jsonl(run / "eval.jsonl")
    assert evals[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and evals[-1]["rewards/margins"] > 0.05


@pytest.mark.parametrize("method", ["dpo", "hypo", "sft", "reward_model"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch, method):
    full = train(tmp_path, method, "iterations=5", name="full")
    with monkeypatch.context() as patch:
        die_after_logging(patch, 3)
        train(tmp_path, method, "iterations=5", name="killed", exit_code=130)
    killed = train(tmp_path, method, "iterations=5", "--resume", name="killed")
    assert strip_timings(read_jsonl(full / "metrics.jsonl")) == strip_timings(read_jsonl(killed / "metrics.jsonl"))
    assert strip_timings(read_jsonl(full / "eval.jsonl")) == strip_timings(read_jsonl(killed / "eval.jsonl"))
    a = load_file(full / "checkpoints" / "iter-000005" / "model" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "iter-000005" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["dpo", "ipo", "hypo", "sft", "reward_model"])
def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path, monkeypatch, method):
    """8 rows a step as one micro-batch of 8 or eight of 1 (plain SGD): the same weights. SFT's rows
    differ in length, so weighting its micro-batches by rows instead of target tokens would fail."""
    use_plain_sgd(monkeypatch)
    one = train(tmp_path, method, "iterations=2", *PLAIN_SGD_ARGS, "update.micro_batch_size=8", name="one")
    eight = train(tmp_path, method, "iterations=2", *PLAIN_SGD_ARGS, "update.micro_batch_size=1", name="eight")
    a = load_file(one / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    b = load_file(eight / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_reference_log_probs_are_computed_once_and_equal_recomputed_ones(tmp_path, monkeypatch):
    """The cache holds what a fresh computation gives, bit for bit; a resumed run (and every epoch)
    reads it instead of computing it again; a run whose cache is deleted recomputes the same values."""
    calls = []
    real = offline.reference_logps
    monkeypatch.setattr(offline, "reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = train(tmp_path, "dpo", "iterations=4", "task.n_train=16", name="run")  # 4 x 8 rows: two epochs of the data
    assert len(calls) == 2  # train and eval splits, once each
    cached = load_file(run / offline.REF_CACHE)
    again = train(tmp_path, "dpo", "iterations=4", "task.n_train=16", name="again")  # a new run computes them afresh
    assert len(calls) == 4
    assert all(torch.equal(cached[k], load_file(again / offline.REF_CACHE)[k]) for k in cached)
    with monkeypatch.context() as patch:
        die_after_logging(patch, 2)
        train(tmp_path, "dpo", "iterations=4", "task.n_train=16", name="killed", exit_code=130)
    assert len(calls) == 6
    train(tmp_path, "dpo", "iterations=4", "task.n_train=16", "--resume", name="killed")
    assert len(calls) == 6  # the resumed run read the cache
    assert strip_timings(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == strip_timings(read_jsonl(run / "metrics.jsonl"))


def test_cached_reference_log_probs_train_as_recomputed_ones_would(tmp_path, monkeypatch):
    """Computing log pi_ref in each micro-batch, beside the policy's forward, gives the weights the
    cached values give (within float32 rounding: the batches group rows differently)."""
    use_plain_sgd(monkeypatch)
    cached = train(tmp_path, "dpo", "iterations=3", *PLAIN_SGD_ARGS, name="cached")

    def on_the_fly(cfg):
        objective = offline.preference_objective(cfg)
        loss_of = offline.pair_loss(cfg)

        def loss(run, split, rows):
            device = run.processes.device
            logps = offline.pair_logps(run.learner, split, rows, run.tokenizer.pad_token_id, device)
            with torch.no_grad():
                ref = offline.pair_logps(run.ref, split, rows, run.tokenizer.pad_token_id, device)
            return loss_of(logps, ref, offline._lengths(split, rows, device))

        return offline.Objective(loss, objective.held_out, prepare=objective.prepare)

    monkeypatch.setitem(offline.OBJECTIVES, "dpo", on_the_fly)
    fresh = train(tmp_path, "dpo", "iterations=3", *PLAIN_SGD_ARGS, name="fresh")
    a = load_file(cached / "checkpoints" / "iter-000003" / "model" / "model.safetensors")
    b = load_file(fresh / "checkpoints" / "iter-000003" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_a_pair_longer_than_the_context_is_refused_naming_its_row_before_any_model_loads(tmp_path, monkeypatch, capsys):
    pairs, _ = write_data(tmp_path)
    rows = pairs.read_text().splitlines()
    rows[5] = json.dumps({"prompt": "x" * 2100, "chosen": "a", "rejected": "b"})  # the tiny model's context is 2048 tokens
    pairs.write_text("\n".join(rows) + "\n")
    from rebelrl import models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["train", *COMMON, "task.name=preferences", f"task.data={pairs}", "algo=dpo", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "pairs.jsonl, line 6" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    (["algo=dpo", "task.name=prompts"], "algo=dpo trains on a data file: set task.name=preferences"),
    (["algo=sft", "task.name=prompts"], "algo=sft trains on a data file: set task.name=demonstrations (or preferences"),
    (["algo=dpo", "task.name=demonstrations", "task.data=x.jsonl"], "algo=dpo trains on preference pairs"),
    (["algo=rebel", "task.name=preferences", "task.data=x.jsonl"], "task.name=preferences is data for algo=dpo or hypo or reward_model or sft or alol; "
     "algo=rebel samples replies to the rows' prompts, which needs a reward to judge them: set reward.fn"),
    (["algo=dpo", "task.name=preferences"], "task.name=preferences needs task.data"),
    (["algo=dpo", "task.name=preferences", "task.data=x.jsonl", "dpo.r_max=2"], "dpo.r_max=2 clips chi-PO's margin only"),
    (["algo=hypo", "task.name=preferences", "task.data=x.jsonl", "rollout.samples_per_prompt=1"], "rollout.samples_per_prompt=1: expected >= 2"),
    (["algo=reward_model", "task.name=preferences", "task.data=x.jsonl", "model.lora_r=4"], "algo=reward_model trains the whole network"),
    (["algo=dpo", "task.name=preferences", "task.data=x.jsonl", "dpo.beta=0"], "dpo.beta=0.0: expected > 0"),
    (["algo=sft", "task.name=preferences", "task.data=x.jsonl", "model.ref_name=tiny-random"], "model.ref_name='tiny-random': algo=sft without a reward"),
    (["algo=reward_model", "task.name=preferences", "task.data=x.jsonl", "model.activation_checkpointing=true"],
     "model.activation_checkpointing is not applied to a reward model's forward yet"),
])
def test_offline_settings_that_cannot_work_are_refused(tmp_path, capsys, override, message):
    assert main(["train", "model.name=tiny-random", *override, f"run_dir={tmp_path / 'r'}"]) == 2
    assert message in capsys.readouterr().err


def test_a_gold_reward_judges_the_same_held_out_samples(tmp_path, monkeypatch):
    """eval.gold_fn scores the held-out samples a second time: with the training reward as the gold one
    the two means agree, evaluation for evaluation (the testbed's gold is another reward)."""
    setup_task(tmp_path, monkeypatch)
    run = train(tmp_path, "dpo", "iterations=3", "reward.fn=tiny_rules:lowercase_fraction", "eval.gold_fn=tiny_rules:lowercase_fraction",
                "rollout.max_new_tokens=6")
    evals = read_jsonl(run / "eval.jsonl")
    assert all(e["gold_reward_mean"] == pytest.approx(e["reward_mean"]) for e in evals)
    assert main(["train", *COMMON, "algo=reward_model", "task.name=preferences", "task.data=x.jsonl", "eval.gold_fn=vader",
                 f"run_dir={tmp_path / 'no'}"]) == 2


def test_hypo_recomputes_log_pi_t_when_the_samplers_record_drifts(tmp_path):
    """rollout.logprob_tolerance is honoured by HyPO's samples as by the online loops: a tolerance
    no record meets makes the first pass recompute log pi_t, and the gap logged is the recomputed one."""
    run = train(tmp_path, "hypo", "iterations=2", "rollout.logprob_tolerance=1e-12")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert metrics[0]["old_logps_recomputed"] == 1.0 and metrics[-1]["logp_mismatch_max"] < 1e-3


# --- SFT packing ------------------------------------------------------------------------------------


def test_pack_is_best_fit_decreasing():
    """Longest first, each into the bin it leaves least room in: 7 opens bin A (room 3), 6 opens B
    (room 4), 4 fits B exactly (room 0), 3 fits A exactly, 2 opens C; nothing is split."""
    assert offline.pack([3, 7, 2, 6, 4], 10) == [[1, 0], [3, 4], [2]]
    assert offline.pack([5, 5, 5], 5) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="does not fit"):
        offline.pack([11], 10)


def test_packed_tensors_restart_positions_and_keep_only_each_rows_targets():
    """Two rows end to end, then padding: positions restart at each row (and at the padding), targets
    are the rows' own reply tokens, never a row's first token or the padding."""
    from rebelrl.rollout.dialogue import Encoded

    split = offline.Split(rows=[None, None, None], encoded=[(Encoded([1, 2], [3, 4], [1, 1]),), (Encoded([5], [6], [1]),),
                                                            (Encoded([7], [8, 9, 10, 11], [1, 1, 0, 1]),)])
    ids, positions, targets = offline.packed_tensors(split, offline.Packed(((0, 1), (2,))), 0, "cpu")
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 0]]
    assert targets.tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 0]]


def test_packed_sft_trains_as_unpacked_sft(tmp_path, monkeypatch):
    """Packing changes the shapes, not the loss: with plain SGD, two iterations of packed SFT (rows
    laid end to end in sequences of 128 tokens, micro-batches of 2 of them) end at the weights of
    unpacked SFT, and the logged losses agree (token accuracy is a mean over micro-batches, which group
    the rows otherwise, so it agrees only roughly)."""
    use_plain_sgd(monkeypatch)
    plain = train(tmp_path, "sft", "iterations=2", *PLAIN_SGD_ARGS, name="plain")
    packs = []
    real = offline.packed_tensors
    monkeypatch.setattr(offline, "packed_tensors", lambda split, packed, *a: packs.extend(packed.packs) or real(split, packed, *a))
    packed = train(tmp_path, "sft", "iterations=2", *PLAIN_SGD_ARGS, "sft.packing=true", "sft.max_length=128", "update.micro_batch_size=2",
                   name="packed")
    assert sum(len(p) for p in packs) == 16 and len(packs) < 16  # 8 rows an iteration, several to a sequence
    a = load_file(plain / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    b = load_file(packed / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    for x, y in zip(read_jsonl(plain / "metrics.jsonl"), read_jsonl(packed / "metrics.jsonl")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["mean_token_accuracy"] == pytest.approx(y["mean_token_accuracy"], abs=0.01)


def test_packing_a_model_that_attends_across_rows_is_refused(tmp_path, monkeypatch, capsys):
    """A model whose attention ignores the restarting positions (here: an attention mask of ones is
    passed, which turns Transformers' packed-sequence masking off) trains on the wrong loss: the first
    packed micro-batch is compared with the unpacked one and the run stops with one line."""
    from rebelrl import logprobs

    real = logprobs.packed_logprobs

    def leaky(model, input_ids, position_ids, targets):
        original = model.forward

        def forward(**kwargs):
            return original(**kwargs, attention_mask=torch.ones_like(kwargs["input_ids"]))

        model.forward = forward
        try:
            return real(model, input_ids, position_ids, targets)
        finally:
            del model.forward

    monkeypatch.setattr(offline, "packed_logprobs", leaky)
    train(tmp_path, "sft", "iterations=1", "sft.packing=true", "sft.max_length=128", exit_code=2)
    err = capsys.readouterr().err
    assert "sft.packing: tiny-random does not keep packed rows apart" in err and "Traceback" not in err


def test_a_demonstration_longer_than_a_packed_sequence_is_refused_naming_its_row(tmp_path, capsys):
    train(tmp_path, "sft", "iterations=1", "sft.packing=true", "sft.max_length=8", exit_code=2)
    err = capsys.readouterr().err
    assert "demos.jsonl, line 1" in err and "sft.max_length (a packed sequence) is 8" in err
    assert not (tmp_path / "sft").exists()  # checked before the run directory is claimed


@pytest.mark.parametrize("override, message", [
    (["algo=dpo", "task.name=preferences", "sft.packing=true"], "sft.packing packs demonstrations for algo=sft"),
    (["algo=sft", "task.name=demonstrations", "sft.max_length=512"], "sft.max_length=512 is the length of a packed sequence"),
])
def test_packing_settings_that_would_be_ignored_are_refused(tmp_path, capsys, override, message):
    assert main(["train", "model.name=tiny-random", "task.data=x.jsonl", *override, f"run_dir={tmp_path / 'r'}"]) == 2
    assert message in capsys.readouterr().err
