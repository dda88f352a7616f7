"""Dataset reset (``reset.data``): rollouts forced through a prefix of the data's reply.

The prefixes are the data's own tokens, drawn as the authors draw them; the forced tokens carry no
policy gradient in PPO, RLOO, GRPO or REBEL (but PPO's values and every KL cover them); evaluation
never resets; a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rebelrl.algos import pg, rebel
from rebelrl.cli import main
from rebelrl.models import load_causal_lm, load_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.rollout.chat import stop_token_ids
from rebelrl.rollout.dialogue import encode_reply
from rebelrl.rollout.reset import ResetStates, prompt_key
from rebelrl.train.config import TrainConfig
from rebelrl.types import Conversation, Rollout, TokenBatch
from tests.tiny_run import PROMPTS, TINY_ARGS, die_after_logging, read_jsonl, setup_task, strip_timings

REPLY = "all good here"


def write_pairs(tmp_path, prompts=PROMPTS):
    path = tmp_path / "replies.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": f"{REPLY} {i}", "rejected": "NO"}) + "\n" for i, p in enumerate(dict.fromkeys(prompts))))
    return path


def test_prefixes_are_the_replies_first_k_tokens_k_uniform_on_1_to_L_minus_1():
    """k = 1 + floor(v (L - 1)) for the second draw v, cut to the token budget; a prompt is reset when
    the first draw u < prob; two draws a prompt whatever the data covers."""
    a, b = Conversation.from_prompt("a"), Conversation.from_prompt("b")
    states = ResetStates({prompt_key(a): [10, 11, 12, 13, 14]}, prob=0.5)
    torch.manual_seed(0)
    draws = torch.rand(3, 2, dtype=torch.float64).tolist()
    torch.manual_seed(0)
    out = states.prefixes([a, b, a], max_new_tokens=4)
    expected = []
    for (u, v), tokens in zip(draws, ([10, 11, 12, 13, 14], [], [10, 11, 12, 13, 14])):
        L = min(len(tokens), 4)
        expected.append(tokens[: 1 + int(v * (L - 1))] if u < 0.5 and L >= 2 else [])
    assert out == expected
    assert all(len(p) <= 3 for p in out)  # at least one of the 4 tokens is the policy's
    torch.manual_seed(1)
    lengths = [len(p) for p in ResetStates({prompt_key(a): list(range(6))}, prob=1.0).prefixes([a] * 5000, 64)]
    assert set(lengths) == {1, 2, 3, 4, 5}  # never 0, never the whole reply
    assert all(abs(lengths.count(k) / 5000 - 0.2) < 0.03 for k in range(1, 6))


def test_forced_tokens_are_the_datas_and_their_log_probs_are_the_policys():
    """Each prompt's k rows begin with its prefix, token for token; the forced mask marks exactly
    those tokens; their recorded log pi_t is the training forward's, as a drawn token's is."""
    from rebelrl.logprobs import rollout_logprobs

    tokenizer, model = load_tokenizer("tiny-random"), load_causal_lm("tiny-random", "float32", 0)
    prompts = [Conversation.from_prompt(p) for p in ("say hello", "go on", "xyz")]
    reply = encode_reply(tokenizer, prompts[0], REPLY).completion
    prefixes = [reply[:3], [], reply[:1]]
    torch.manual_seed(0)
    rollout = HFGenerator(model, tokenizer, 2).generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=6), prefixes=prefixes)
    for row in range(6):
        prefix = prefixes[row // 2]
        assert rollout.completion_ids[row, : len(prefix)].tolist() == prefix
        assert rollout.forced[row].tolist() == [1] * len(prefix) + [0] * (rollout.forced.shape[1] - len(prefix))
    assert torch.equal(rollout.policy_mask, rollout.completion_mask * (1 - rollout.forced))
    recomputed = rollout_logprobs(model, rollout, 1.0)
    torch.testing.assert_close(rollout.sample_logps, recomputed, atol=1e-5, rtol=0)
    assert rollout.conversations[0].last_assistant.startswith(tokenizer.decode(prefixes[0]))


def _rollout(forced: list[list[int]]) -> Rollout:
    """Four completions of four tokens (two prompts, k = 2), every token real, ``forced`` marking some."""
    n = len(forced)
    return Rollout(conversations=[Conversation.from_prompt("x").with_reply("y")] * n, prompt_ids=torch.ones(n, 2, dtype=torch.long),
                   prompt_mask=torch.ones(n, 2, dtype=torch.long), completion_ids=torch.ones(n, 4, dtype=torch.long),
                   completion_mask=torch.ones(n, 4, dtype=torch.long), finished=torch.ones(n, dtype=torch.bool),
                   sample_logps=torch.zeros(n, 4), group_size=2, forced=torch.tensor(forced))


FORCED = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_forced_tokens_carry_no_policy_gradient(algo):
    """The gradient of each method's loss with respect to the log-probs is zero at every forced
    token and not at the policy's own tokens; PPO's value loss still covers every token."""
    cfg = TrainConfig(algo=algo)
    rollout = _rollout(FORCED)
    old = torch.randn(4, 4) * 0.1
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    extra = {}
    if algo == "ppo":
        advantages = torch.randn(4, 4)
        extra = dict(returns=torch.randn(4, 4), old_values=torch.zeros(4, 4))
    batch = TokenBatch(old, old.clone(), advantages, **extra)
    logps = (old + 0.05 * torch.randn(4, 4)).requires_grad_()
    values = torch.zeros(4, 4, requires_grad=True) if algo == "ppo" else None
    loss, _ = pg.METHODS[algo].loss(cfg, rollout)(logps, values, batch, torch.arange(4))
    loss.backward()
    forced = rollout.forced.bool()
    assert (logps.grad[forced] == 0).all() and (logps.grad[~forced] != 0).all()
    if algo == "ppo":
        assert (values.grad != 0).all()  # the critic learns the forced states' values too


def test_rebel_regresses_on_the_continuations_and_penalises_the_whole_reply():
    """Pair log-probs sum the policy's own tokens; the KL penalty sums every token (its prefix share
    is the same for both replies of a pair, which continue one prefix)."""

    class FakeRun:
        cfg = TrainConfig(algo="rebel")
        cfg.rebel.kl_coef = 0.5

        def old_token_logps(self, rollout):
            return torch.tensor([[-1.0, -2.0, -3.0, -4.0]] * 4), True

    rollout = _rollout(FORCED)
    ref = torch.tensor([[-1.5, -2.5, -3.0, -3.0]] * 4)
    scores = torch.tensor([1.0, 0.0, 2.0, 0.0])
    batch = rebel.assemble(FakeRun(), rollout, scores, torch.tensor([[0, 1], [2, 3]]), ref)
    assert batch.pairs.old_logps.tolist() == [[-7.0, -7.0], [-9.0, -9.0]]  # -3-4 after two forced; -2-3-4 after one
    assert batch.pairs.ref_logps.tolist() == [[-6.0, -6.0], [-8.5, -8.5]]
    kl = (-10.0) - (-10.0)  # every token: -1-2-3-4 against -1.5-2.5-3-3
    assert batch.pairs.rewards.tolist() == [[1.0 - 0.5 * kl, 0.0 - 0.5 * kl], [2.0 - 0.5 * kl, 0.0 - 0.5 * kl]]
    assert batch.pairs.lengths.tolist() == [[2, 2], [3, 3]]


def _train(tmp_path, *extra, name="run", exit_code=0):
    args = ["train", *TINY_ARGS, f"task.prompts={tmp_path / 'prompts.jsonl'}", "rollout.max_new_tokens=6", f"run_dir={tmp_path / name}", *extra]
    assert main(args) == exit_code
    return tmp_path / name


@pytest.mark.parametrize("algo", ["rebel", "ppo", "rloo", "online_dpo", "grpo"])
def test_every_reset_method_trains_through_the_cli_and_evaluates_from_the_plain_prompt(tmp_path, monkeypatch, algo):
    setup_task(tmp_path, monkeypatch)
    data = write_pairs(tmp_path)
    plain = _train(tmp_path, f"algo={algo}", "iterations=2", name="plain")
    reset = _train(tmp_path, f"algo={algo}", "iterations=2", f"reset.data={data}", name="reset")
    metrics = read_jsonl(reset / "metrics.jsonl")
    assert all(m["reset/frac"] == 1.0 and m["reset/forced_tokens"] >= 1 for m in metrics)
    assert all(0 < m["response_length"] for m in metrics)
    # evaluation starts from the plain prompt: the initial evaluation is the run without reset's
    assert (plain / "eval_initial.jsonl").read_text() == (reset / "eval_initial.jsonl").read_text()


def test_reset_probability_and_coverage(tmp_path, monkeypatch):
    """reset.prob=0.5 resets about half the prompts; prompts with no reply in the data are never reset."""
    setup_task(tmp_path, monkeypatch)
    data = write_pairs(tmp_path, PROMPTS[:5])  # half the distinct prompts
    run = _train(tmp_path, "algo=rloo", "iterations=4", "rollout.prompts_per_iter=8", "reset.prob=0.5", f"reset.data={data}")
    fracs = [m["reset/frac"] for m in read_jsonl(run / "metrics.jsonl")]
    assert 0 < sum(fracs) / len(fracs) < 0.5


@pytest.mark.parametrize("setting", ["reset", "guide"])
def test_resume_with_reset_or_a_guide_repeats_the_uninterrupted_run(tmp_path, monkeypatch, setting):
    """Reset draws and the guide's (LOLS's per-iteration mode included) come from checkpointed or
    iteration-seeded streams: a killed and resumed run repeats the uninterrupted one."""
    setup_task(tmp_path, monkeypatch)
    data = write_pairs(tmp_path)
    extra = [f"reset.data={data}", "reset.prob=0.5"] if setting == "reset" else ["guide.mode=lols", "guide.switch=0.5", "guide.model=tiny-random"]
    common = ["algo=ppo", "iterations=4", *extra]
    full = _train(tmp_path, *common, name="full")
    with monkeypatch.context() as patch:
        die_after_logging(patch, 2)
        _train(tmp_path, *common, name="killed", exit_code=130)
    killed = _train(tmp_path, *common, "--resume", name="killed")
    assert strip_timings(read_jsonl(full / "metrics.jsonl")) == strip_timings(read_jsonl(killed / "metrics.jsonl"))
    a = load_file(full / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, message", [
    (["reset.prob=0.5"], "reset.prob=0.5 is read only with reset.data"),
    (["reset.field=rejected"], "reset.field=rejected is read only with reset.data"),
    (["algo=astar_po", "reset.data=DATA"], "algo=astar_po cannot use it: its V*(x) is estimated from the prompt alone"),
    (["reset.data=DATA", "reset.prob=0"], "reset.prob=0.0: expected in (0, 1]"),
    (["reset.data=OTHER"], "none of its 1 prompts is a training prompt"),
    (["reset.data=DATA", "reset.field=completion"], "reset.data (reset.field=completion): "),
    (["reset.data=MISSING"], "reset.data (reset.field=chosen): "),
    (["reset.data=ONE"], "every reply to a training prompt is shorter than 2 tokens"),
])
def test_reset_settings_that_cannot_work_are_refused(tmp_path, monkeypatch, capsys, override, message):
    setup_task(tmp_path, monkeypatch)
    data, other, one = write_pairs(tmp_path), tmp_path / "other.jsonl", tmp_path / "one.jsonl"
    other.write_text(json.dumps({"prompt": "never asked", "chosen": "a", "rejected": "b"}) + "\n")
    one.write_text("".join(json.dumps({"prompt": p, "chosen": "a", "rejected": "b"}) + "\n" for p in dict.fromkeys(PROMPTS)))
    from rebelrl import models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    files = {"DATA": data, "OTHER": other, "ONE": one, "MISSING": tmp_path / "missing.jsonl"}
    override = [next((o.replace(k, str(v)) for k, v in files.items() if o.endswith("=" + k)), o) for o in override]
    _train(tmp_path, *override, exit_code=2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # the run directory is not claimed: the corrected command runs there


def test_stop_tokens_are_never_forced(tmp_path):
    """The reply's turn terminator is cut from the reset state: the policy ends its reply itself."""
    tokenizer = load_tokenizer("tiny-random")
    prompt = Conversation.from_prompt("say hello")
    path = write_pairs(tmp_path, ["say hello"])
    cfg = TrainConfig(algo="rebel")
    cfg.reset.data = str(path)
    states = ResetStates.load(cfg, tokenizer, stop_token_ids(tokenizer), [prompt])
    full = encode_reply(tokenizer, prompt, f"{REPLY} 0").completion
    assert states.replies[prompt_key(prompt)] == full[:-1] and full[-1] in stop_token_ids(tokenizer)
