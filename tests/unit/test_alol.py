"""A-LoL (``algo=alol``): the four variants' losses against hand-derived numbers, priority sampling,
the advantages computed once from the reference's own greedy replies, and the method through the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rebelrl.algos import offline
from rebelrl.cli import main
from rebelrl.losses import alol_loss
from rebelrl.models import load_causal_lm, load_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.train.config import AlolConfig
from rebelrl.types import Conversation
from tests.tiny_run import PLAIN_SGD_ARGS, die_after_logging, read_jsonl, setup_task, strip_timings, use_plain_sgd
from tests.unit.test_offline import COMMON, write_data

LOGPS = torch.tensor([[-1.0, -2.0, 0.0]])
REF = torch.tensor([[-1.5, -2.5, -9.0]])  # the third token is padding: never counted
TARGETS = torch.tensor([[1, 1, 0]])


@pytest.mark.parametrize("variant, advantage, expected", [
    # log r(y) = 0.5 + 0.5 = 1, r = e = 2.718 -> clipped to 1.9; NLL = 3: 2 x 1.9 x 3
    ("alol", 2.0, 11.4),
    # r per token = e^0.5 = 1.6487 each, unclipped: 2 x (1.6487 x 1 + 1.6487 x 2)
    ("seq", 2.0, 2 * math.exp(0.5) * 3),
    ("ref_free", 2.0, 6.0),
    # A+ NLL + beta (log pi(y) - log pi_ref(y)) = 2 x 3 + 0.5 x (-3 + 4)
    ("kl", 2.0, 6.5),
    ("alol", -1.0, 0.0),  # A <= 0: not trained on
    ("ref_free", -1.0, -3.0),  # ref-free keeps the sign (priority sampling never draws such rows)
])
def test_alol_losses_by_hand(variant, advantage, expected):
    loss, metrics = alol_loss(LOGPS, REF, TARGETS, torch.tensor([advantage]), variant, kl_beta=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_alol_weights_are_stop_gradient_factors_and_kl_shifts_the_advantage():
    """d loss / d log pi(y_t) is -A+ w on every target token (the weight is not differentiated); the
    kl variant's is -(A+ - beta): an advantage shifted by beta, not a KL penalty's."""
    for variant, grad in (("alol", -2 * 1.9), ("seq", -2 * math.exp(0.5)), ("kl", -(2 - 0.5)), ("ref_free", -2.0)):
        logps = LOGPS.clone().requires_grad_()
        alol_loss(logps, REF, TARGETS, torch.tensor([2.0]), variant, kl_beta=0.5)[0].backward()
        assert logps.grad[0, :2].tolist() == pytest.approx([grad, grad], rel=1e-6) and logps.grad[0, 2] == 0, variant


def test_the_weight_is_clipped_below_too():
    loss, metrics = alol_loss(LOGPS, torch.tensor([[0.0, 0.0, 0.0]]), TARGETS, torch.tensor([1.0]), "alol")
    assert loss.item() == pytest.approx(0.1 * 3)  # r = e^-3 = 0.05 -> 0.1
    assert metrics["alol/weight_clipped_frac"] == 1.0 and metrics["alol/weight_mean"] == pytest.approx(0.1)


def test_priority_sampling_draws_rows_in_proportion_to_the_positive_advantage(monkeypatch):
    """A = [0, 1, 3, -1]: rows 1 and 2 drawn a quarter and three quarters of the time, rows 0 and 3
    never; the same iteration draws the same rows (a resumed run repeats them)."""
    cfg = SimpleNamespace(alol=AlolConfig(), seed=0, update=SimpleNamespace(micro_batch_size=8))
    objective = offline.alol_objective(cfg)
    train, held = offline.Split([None] * 4, [()] * 4), offline.Split([None], [()])
    monkeypatch.setattr(offline, "alol_advantages", lambda run, split, name: torch.tensor([0.0, 1.0, 3.0, -1.0][: len(split)]))
    monkeypatch.setattr(offline, "reference_token_logps", lambda run, split, batch_size: None)
    run = SimpleNamespace(computed={}, say=print)
    objective.prepare(run, train, held)
    drawn = [i for it in range(1, 401) for i in objective.rows(run, it, 4, 10)]
    counts = [drawn.count(i) / len(drawn) for i in range(4)]
    assert counts[0] == 0 and counts[3] == 0 and abs(counts[1] - 0.25) < 0.03 and abs(counts[2] - 0.75) < 0.03
    assert objective.rows(run, 7, 4, 10) == objective.rows(run, 7, 4, 10)


def write_scored(tmp_path, n=24):
    """Demonstrations with a reward column: lowercase replies score 1, uppercase ones 0."""
    pairs, _ = write_data(tmp_path, n)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": reply, "reward": float(reply.islower())}) + "\n"
                            for r in rows for reply in (r["chosen"], r["rejected"])))
    return path


def train(tmp_path, *extra, name="alol", exit_code=0):
    data = write_scored(tmp_path)
    run_dir = tmp_path / name
    args = ["train", *COMMON, "algo=alol", "task.name=demonstrations", f"task.data={data}", "reward.fn=tiny_rules:lowercase_fraction",
            "reward.no_eos_penalty=null", "rollout.max_new_tokens=6", f"run_dir={run_dir}", *extra]
    assert main(args) == exit_code
    return run_dir


def test_advantages_are_the_rows_reward_minus_the_references_greedy_score(tmp_path, monkeypatch):
    """With no ridge and fewer prompts than hidden units the linear V_ref interpolates: it is the score
    of the reference's greedy reply to each prompt, computed here independently of the loop."""
    setup_task(tmp_path, monkeypatch)
    captured = {}
    real = offline.alol_advantages
    monkeypatch.setattr(offline, "alol_advantages", lambda run, split, name: captured.setdefault(name, (split, real(run, split, name)))[1])
    train(tmp_path, "iterations=1", "alol.value_ridge=0")
    split, advantages = captured["training"]
    tokenizer, model = load_tokenizer("tiny-random"), load_causal_lm("tiny-random", "float32", 0)
    import tiny_rules

    prompts = [Conversation(row.messages[:-1], {}) for row in split.rows]
    greedy = HFGenerator(model, tokenizer, 8).generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=6))
    values = torch.tensor(tiny_rules.lowercase_fraction(greedy.conversations))
    rewards = torch.tensor([row.meta["reward"] for row in split.rows])
    torch.testing.assert_close(advantages, rewards - values, atol=1e-3, rtol=0)


@pytest.mark.parametrize("variant", ["alol", "seq", "ref_free", "kl"])
def test_each_variant_learns_the_good_rows(tmp_path, monkeypatch, variant):
    """Half the rows are good (lowercase, reward 1) and half bad (uppercase, reward 0): every variant
    raises the held-out likelihood of good replies over bad ones, and trains only on rows with A > 0."""
    setup_task(tmp_path, monkeypatch)
    seen = []
    real = offline.alol_objective

    def spying(cfg):
        objective = real(cfg)
        loss = objective.loss

        def spy(run, split, rows):
            seen.extend(split.rows[i].messages[-1].content for i in rows.tolist())
            return loss(run, split, rows)

        objective.loss = spy
        return objective

    monkeypatch.setitem(offline.OBJECTIVES, "alol", spying)
    extra = ["alol.kl_beta=0.1"] if variant == "kl" else []
    run = train(tmp_path, "iterations=6", f"alol.variant={variant}", *extra, name=variant)
    assert seen and all(text.islower() for text in seen)  # only good rows were drawn
    model = load_causal_lm(str(run / "checkpoints" / "iter-000006" / "model"), "float32", 0)
    ref, tokenizer = load_causal_lm("tiny-random", "float32", 0), load_tokenizer("tiny-random")
    from rebelrl.rollout.dialogue import encode_reply

    prompt = Conversation.from_prompt("prompt 999: say")
    encoded = [encode_reply(tokenizer, prompt, text) for text in ("see you soon", "SEE YOU SOON")]

    def gap(m):
        logps, targets = offline.token_logps(m, encoded, tokenizer.pad_token_id, "cpu")
        good, bad = (logps * targets).sum(1).tolist()
        return good - bad

    assert gap(model) > gap(ref) + 0.5
    metrics = read_jsonl(run / "metrics.jsonl")
    assert all(math.isfinite(m["loss"]) for m in metrics) and "reward_mean" in read_jsonl(run / "eval.jsonl")[-1]


def test_alol_resumes_to_the_uninterrupted_run_and_accumulates_exactly(tmp_path, monkeypatch):
    """A resumed run reads the advantages from its checkpoint (no second greedy pass of the reference)
    and repeats the uninterrupted run; 8 rows as one micro-batch or eight give the same weights."""
    setup_task(tmp_path, monkeypatch)
    calls = []
    real = offline.alol_advantages
    monkeypatch.setattr(offline, "alol_advantages", lambda *a: calls.append(a[2]) or real(*a))
    full = train(tmp_path, "iterations=4", name="full")
    with monkeypatch.context() as patch:
        die_after_logging(patch, 3)  # after the checkpoint of iteration 2
        train(tmp_path, "iterations=4", "checkpoint.every=2", name="killed", exit_code=130)
    assert calls == ["training", "held-out"] * 2
    killed = train(tmp_path, "iterations=4", "checkpoint.every=2", "--resume", name="killed")
    assert calls == ["training", "held-out"] * 2  # read from the checkpoint
    assert strip_timings(read_jsonl(full / "metrics.jsonl")) == strip_timings(read_jsonl(killed / "metrics.jsonl"))
    use_plain_sgd(monkeypatch)
    one = train(tmp_path, "iterations=2", *PLAIN_SGD_ARGS, "update.micro_batch_size=8", name="one")
    eight = train(tmp_path, "iterations=2", *PLAIN_SGD_ARGS, "update.micro_batch_size=1", name="eight")
    a = load_file(one / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    b = load_file(eight / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    (["algo=alol", "task.name=demonstrations", "task.data=x.jsonl"], "algo=alol needs reward.fn"),
    (["algo=alol", "task.name=demonstrations", "task.data=x.jsonl", "reward.fn=vader", "alol.variant=kl"], "alol.variant=kl needs alol.kl_beta"),
    (["algo=alol", "task.name=demonstrations", "task.data=x.jsonl", "reward.fn=vader", "alol.kl_beta=0.1"], "alol.kl_beta=0.1 is read only"),
    (["algo=alol", "task.name=demonstrations", "task.data=x.jsonl", "reward.fn=vader", "alol.weight_min=2"], "alol.weight_min=2 must be <="),
    (["algo=alol", "task.name=demonstrations", "task.data=x.jsonl", "reward.fn=vader", "alol.variant=ref_free", "alol.weight_max=3"],
     "alol.variant=ref_free has none, so they would be ignored"),
    (["algo=alol", "task.name=demonstrations", "task.data=x.jsonl", "reward.fn=vader", "alol.variant=ref_free", "alol.priority=false"],
     "keep alol.priority=true"),
])
def test_alol_settings_that_cannot_work_are_refused(tmp_path, capsys, override, message):
    assert main(["train", "model.name=tiny-random", *override, f"run_dir={tmp_path / 'r'}"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("last, message", [
    ({"reward": "0.5"}, "scored.jsonl, line 12, field 'reward': '0.5' is not a finite number"),
    ({"reward": float("nan")}, "scored.jsonl, line 12, field 'reward': nan is not a finite number"),
    ({}, "scored.jsonl, line 12, field 'reward': missing, while other rows have one"),
    ({"reward": True}, "scored.jsonl, line 12, field 'reward': True is not a finite number"),
])
def test_a_reward_column_is_a_number_on_every_row_or_on_none(tmp_path, monkeypatch, capsys, last, message):
    """Checked before the run directory is claimed or any model loads, naming file, row and field."""
    setup_task(tmp_path, monkeypatch)
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt {i}", "completion": "hello there", **extra}) + "\n"
                            for i, extra in enumerate([{"reward": 1.0}] * 11 + [last])))
    from rebelrl import models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    run_dir = tmp_path / "r"
    assert main(["train", *COMMON, "algo=alol", "task.name=demonstrations", f"task.data={path}", "reward.fn=tiny_rules:lowercase_fraction",
                 f"run_dir={run_dir}"]) == 2
    assert message in capsys.readouterr().err and not run_dir.exists()
