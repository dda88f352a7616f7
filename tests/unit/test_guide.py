"""Guided roll-in and roll-out (``guide.mode``): who writes which tokens, that the guide's tokens never
enter a policy loss, that log pi_t is the policy's everywhere, LOLS / D2LOLS schedules, and every
mode through the CLI (resume with a guide: ``test_reset.py``)."""

from __future__ import annotations

import pytest
import torch

from rebelrl.cli import main
from rebelrl.logprobs import rollout_logprobs
from rebelrl.models import load_causal_lm, load_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.rollout.guide import Guide, guided_rollout
from rebelrl.types import Conversation
from tests.tiny_run import TINY_ARGS, read_jsonl, setup_task

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8)


def _models():
    tokenizer = load_tokenizer("tiny-random")
    return tokenizer, load_causal_lm("tiny-random", "float32", 0), load_causal_lm("tiny-random", "float32", 1)  # policy, guide


def test_lols_and_d2lols_schedules():
    lols = Guide(None, PARAMS, "lols", 0.8, 0.8, seed=3)
    modes = [lols.mode_at(i) for i in range(1, 2001)]
    assert abs(modes.count("rollin") / 2000 - 0.8) < 0.03 and modes == [lols.mode_at(i) for i in range(1, 2001)]
    d2 = Guide(None, PARAMS, "d2lols", 0.8, 5, seed=0)
    assert [d2.mode_at(i) for i in range(1, 8)] == ["rollout"] * 4 + ["rollin"] * 3


def _policy_logps(model):
    return lambda rollout: rollout_logprobs(model, rollout, 1.0)


def test_rollin_forces_the_guides_own_tokens_and_the_policy_writes_the_rest():
    """PPO++: each prompt's rows start with the first k tokens of the guide's reply (one k a prompt);
    those are the forced tokens; log pi_t of every token is the policy's."""
    tokenizer, policy, guide_model = _models()
    prompts = [Conversation.from_prompt(p) for p in ("say hello", "go on", "xyz")]
    guide = Guide(HFGenerator(guide_model, tokenizer, 4), PARAMS, "rollin", 1.0, None, 0)
    torch.manual_seed(0)
    torch.rand(3, 2, dtype=torch.float64)  # the draws guided_rollout makes first
    written = guide.generator.generate(prompts, 1, PARAMS)  # what the guide writes then (every prompt: guide.prob = 1)
    torch.manual_seed(0)
    rollout, metrics = guided_rollout(guide, HFGenerator(policy, tokenizer, 4), prompts, 2, PARAMS, 1, _policy_logps(policy))
    assert metrics["guide/rollin"] == 1.0 and metrics["guide/completions"] == 3
    for row in range(6):
        k = int(rollout.forced[row].sum())
        assert rollout.forced[row, :k].all() and not rollout.forced[row, k:].any()
        if k:
            assert rollout.completion_ids[row, :k].tolist() == written.completion_ids[row // 2, :k].tolist()
        assert k == int(rollout.forced[row - row % 2].sum())  # both rows of a prompt share it
    torch.testing.assert_close(rollout.sample_logps, rollout_logprobs(policy, rollout, 1.0), atol=1e-5, rtol=0)


def test_rollout_keeps_the_policys_first_k_tokens_and_the_guide_writes_the_rest():
    """AggreVaTeD: the policy's rows are its own first k tokens (one k a prompt, 1 <= k < the shortest
    reply), then the guide's; the policy is trained on its k tokens alone; log pi_t is recomputed by
    the policy where the guide wrote."""
    tokenizer, policy, guide_model = _models()
    prompts = [Conversation.from_prompt(p) for p in ("say hello", "go on", "xyz")]
    guide = Guide(HFGenerator(guide_model, tokenizer, 4), PARAMS, "rollout", 1.0, None, 0)
    torch.manual_seed(0)
    torch.rand(3, 2, dtype=torch.float64)  # the draws guided_rollout makes first
    own = HFGenerator(policy, tokenizer, 4).generate(prompts, 2, PARAMS)
    torch.manual_seed(0)
    rollout, metrics = guided_rollout(guide, HFGenerator(policy, tokenizer, 4), prompts, 2, PARAMS, 1, _policy_logps(policy))
    assert metrics["guide/rollin"] == 0.0
    mine = rollout.policy_mask
    for row in range(6):
        k = int(mine[row].sum())
        shortest = int(own.completion_mask[row - row % 2 : row - row % 2 + 2].sum(1).min())
        if shortest >= 2:
            assert 1 <= k < shortest and mine[row, :k].all()
            assert rollout.completion_ids[row, :k].tolist() == own.completion_ids[row, :k].tolist()
            assert rollout.forced[row, k:].sum() == rollout.completion_mask[row, k:].sum()  # the rest is the guide's
        assert k == int(mine[row - row % 2].sum())
    torch.testing.assert_close(rollout.sample_logps, rollout_logprobs(policy, rollout, 1.0), atol=1e-5, rtol=0)


def _train(tmp_path, *extra, name="run", exit_code=0):
    args = ["train", *TINY_ARGS, f"task.prompts={tmp_path / 'prompts.jsonl'}", "rollout.max_new_tokens=6", f"run_dir={tmp_path / name}", *extra]
    assert main(args) == exit_code
    return tmp_path / name


@pytest.mark.parametrize("algo, mode", [("rebel", "rollin"), ("rebel", "rollout"), ("ppo", "lols"), ("rloo", "d2lols"), ("ppo", "rollout")])
def test_every_mode_trains_through_the_cli_and_counts_the_guides_replies(tmp_path, monkeypatch, algo, mode):
    setup_task(tmp_path, monkeypatch)
    extra = ["guide.switch=2"] if mode == "d2lols" else []
    run = _train(tmp_path, f"algo={algo}", "iterations=3", f"guide.mode={mode}", "guide.prob=1.0", *extra)
    metrics = read_jsonl(run / "metrics.jsonl")
    for m in metrics:  # 8 prompts, 2 replies each; roll-in: the guide writes one reply a prompt; roll-out: it rewrites the guided prompts' replies
        guided = 8 if m["guide/rollin"] else m["guide/frac"] * 8 * 2
        assert m["guide/completions"] == guided and m["completions"] == 16 + guided
    if mode == "d2lols":
        assert [m["guide/rollin"] for m in metrics] == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("override, message", [
    (["guide.prob=0.5"], "guide.prob=0.5 is read only with a guide"),
    (["guide.mode=d2lols"], "guide.mode=d2lols needs guide.switch"),
    (["guide.mode=rollin", "guide.switch=3"], "guide.switch=3 is read only by guide.mode=lols or d2lols"),
    (["guide.mode=rollin", "algo=astar_po"], "algo=astar_po cannot use one"),
    (["guide.mode=rollin", "reset.data=x.jsonl"], "use one of them"),
    (["guide.mode=rollin", "guide.model=GEMMA"], "has another tokenizer than model.name='tiny-random'"),
    (["guide.mode=rollin", "guide.model=EMPTY"], "is a folder without a model's config.json"),
    (["guide.mode=rollout", "rollout.max_new_tokens=1"], "leaves no k in 1..L-1"),
])
def test_guide_settings_that_cannot_work_are_refused(tmp_path, monkeypatch, capsys, override, message):
    setup_task(tmp_path, monkeypatch)
    from rebelrl import models
    from tests.families import build_family

    if any("GEMMA" in o for o in override):
        override = [o.replace("GEMMA", str(build_family("gemma", tmp_path / "gemma"))) for o in override]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("not a model")
    override = [o.replace("EMPTY", str(tmp_path / "empty")) for o in override]
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    _train(tmp_path, *override, exit_code=2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_compare_counts_the_guides_replies_in_the_budget():
    """An iteration spends its own replies plus at most the guide's: one a prompt rolling in, one a
    policy reply rolling out (LOLS and D2LOLS may do either)."""
    from rebelrl.compare import completions_per_iteration
    from rebelrl.train.config import GuideConfig, RolloutConfig, TrainConfig

    def per_iteration(mode, **kw):
        return completions_per_iteration(TrainConfig(algo="ppo", rollout=RolloutConfig(prompts_per_iter=8, samples_per_prompt=2),
                                                     guide=GuideConfig(mode=mode, **kw)))

    assert per_iteration("none") == 16
    assert per_iteration("rollin") == 16 + 8
    assert per_iteration("rollout") == per_iteration("lols") == per_iteration("d2lols", switch=3) == 16 + 16


def test_rollout_keeps_the_policys_sampler_dropped_mass_on_its_own_tokens():
    """With top-k the policy's sampler removes mass on the tokens it draws; the rewritten rollout keeps
    that record on the policy's tokens and has none on the guide's."""
    tokenizer, policy, guide_model = _models()
    prompts = [Conversation.from_prompt(p) for p in ("say hello", "go on", "xyz")]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, top_k=3)
    guide = Guide(HFGenerator(guide_model, tokenizer, 4), PARAMS, "rollout", 1.0, None, 0)
    torch.manual_seed(0)
    rollout, _ = guided_rollout(guide, HFGenerator(policy, tokenizer, 4), prompts, 2, params, 1, _policy_logps(policy))
    assert (rollout.dropped_mass[rollout.policy_mask.bool()] > 0).all()
    assert (rollout.dropped_mass[rollout.forced.bool()] == 0).all()


def test_rollout_leaves_unguided_prompts_to_the_policy_and_the_guide_sees_only_its_own():
    """guide.prob < 1: a prompt the draw leaves unguided keeps the policy's replies, token for token,
    with nothing forced; the guide is asked to continue the guided prompts' replies alone."""
    tokenizer, policy, guide_model = _models()
    prompts = [Conversation.from_prompt(p) for p in ("say hello", "go on", "xyz", "why", "a b c", "ok then")]
    guide = Guide(HFGenerator(guide_model, tokenizer, 4), PARAMS, "rollout", 0.5, None, 0)
    torch.manual_seed(0)
    draws = torch.rand(len(prompts), 2, dtype=torch.float64).tolist()  # the draws guided_rollout makes first
    own = HFGenerator(policy, tokenizer, 4).generate(prompts, 2, PARAMS)
    lengths = own.completion_mask.sum(1).view(-1, 2).min(1).values.tolist()
    rolled_out = [b for b, (u, _) in enumerate(draws) if u < 0.5 and lengths[b] >= 2]
    assert 0 < len(rolled_out) < len(prompts)  # the seed gives both kinds
    asked = []
    generate = guide.generator.generate
    guide.generator.generate = lambda rows, *a, **k: asked.append(len(rows)) or generate(rows, *a, **k)
    torch.manual_seed(0)
    rollout, metrics = guided_rollout(guide, HFGenerator(policy, tokenizer, 4), prompts, 2, PARAMS, 1, _policy_logps(policy))
    assert asked == [2 * len(rolled_out)] and metrics["guide/completions"] == 2 * len(rolled_out)
    for row in range(12):
        if row // 2 in rolled_out:
            assert rollout.forced[row].sum() > 0
            continue
        T = int(own.completion_mask[row].sum())
        assert rollout.forced[row].sum() == 0 and int(rollout.completion_mask[row].sum()) == T
        assert rollout.completion_ids[row, :T].tolist() == own.completion_ids[row, :T].tolist()
        assert rollout.conversations[row].messages[-1] == own.conversations[row].messages[-1]
    torch.testing.assert_close(rollout.sample_logps, rollout_logprobs(policy, rollout, 1.0), atol=1e-5, rtol=0)
