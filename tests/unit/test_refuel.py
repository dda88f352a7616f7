"""Multi-turn rollouts, turn spans and REFUEL end to end on the tiny model."""

import pytest
import torch
from safetensors.torch import load_file

from rebelrl.algos.refuel import roll_in, sample_turns
from rebelrl.cli import main
from rebelrl.envs import SecretEnv
from rebelrl.logprobs import completion_logprobs, token_logprobs
from rebelrl.losses import rebel_loss
from rebelrl.models import tiny_model, tiny_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.rollout.dialogue import encode_dialogue, play, truncate_turns, turn_mask
from rebelrl.types import Conversation
from tests.tiny_run import REFUEL_ARGS, read_jsonl, setup_task

DIALOGUE = Conversation.from_chat(
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
)


def test_turn_spans_select_exactly_each_assistant_turn(tokenizer):
    ids, spans = encode_dialogue(tokenizer, DIALOGUE)
    assert len(spans) == 2
    assert tokenizer.decode(ids[spans[0][0] : spans[0][1]]) == "hello!<|im_end|>"
    assert tokenizer.decode(ids[spans[1][0] : spans[1][1]]) == "bye<|im_end|>"
    mask = turn_mask(spans, 2, len(ids))
    assert tokenizer.decode([t for t, m in zip(ids, mask.tolist()) if m]) == "bye<|im_end|>"
    assert mask.sum() == len("bye") + 1


def test_truncate_turns():
    assert [m.content for m in truncate_turns(DIALOGUE, 1).messages] == ["be brief", "hi", "hello!"]
    assert truncate_turns(DIALOGUE, 5) == DIALOGUE


def test_sample_turns_follow_the_authors_scheme():
    torch.manual_seed(0)
    h, L = sample_turns(2000, 5, "sampled")
    assert all(1 <= hi <= Li <= 5 for hi, Li in zip(h, L))
    assert set(L) == {1, 2, 3, 4, 5}
    # P(h = 1) = mean over L of 1/L = (1 + 1/2 + 1/3 + 1/4 + 1/5) / 5 = 0.4567
    assert sum(hi == 1 for hi in h) / 2000 == pytest.approx(0.4567, abs=0.04)
    h, L = sample_turns(100, 5, "horizon")
    assert set(L) == {5}


def test_branches_share_the_prefix_and_turn_h_logprobs_match_the_full_dialogue(model, tokenizer):
    """The two branches see the same prefix, token for token; the log-probs REFUEL regresses on (the
    branch completions) equal the turn-h tokens of the whole dialogue picked by the turn mask, so the
    REFUEL loss is rebel_loss on hand-computed turn-h log-probs."""
    env = SecretEnv(horizon=3, items=["cat", "dog", "frog"])
    gen = HFGenerator(model, tokenizer)
    params = SamplingParams(1.0, max_new_tokens=8)
    starts = env.reset(2, seed=0)
    prefixes, branch = roll_in(gen, env, starts, [2, 3], params)
    assert branch == [2, 3]
    assert [sum(m.role == "user" for m in p.messages) for p in prefixes] == [2, 3]
    rollout = gen.generate(prefixes, 2, params)
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[1])
    assert torch.equal(rollout.prompt_ids[2], rollout.prompt_ids[3])

    branch_logps = completion_logprobs(
        model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
    ).sum(1)  # (4,)
    compared = 0
    for row, conv in enumerate(rollout.conversations):
        ids, spans = encode_dialogue(tokenizer, conv)
        span_start, span_end = spans[branch[row // 2] - 1]  # a cut reply's span holds no terminator
        sampled = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        if ids[span_start:span_end] != sampled:
            continue  # a sampled special token that decoding drops: the text no longer round-trips
        ids = torch.tensor([ids])
        per_token = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0]  # token t+1 given its past
        by_hand = per_token[span_start - 1 : span_end - 1].sum()
        torch.testing.assert_close(branch_logps[row], by_hand, atol=1e-4, rtol=0)
        compared += 1
    assert compared >= 2

    old = branch_logps.detach().view(2, 2) - 0.3
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, _ = rebel_loss(branch_logps.view(2, 2), old, rewards, eta=2.0)
    expected = ((0.3 - 0.3 - 2.0) ** 2 + (0.3 - 0.3 + 2.0) ** 2) / 2
    assert loss.item() == pytest.approx(expected)


def test_scripted_dialogues_are_deterministic_under_a_seed(model, tokenizer):
    env = SecretEnv(horizon=3)
    gen = HFGenerator(model, tokenizer)

    def run(seed):
        torch.manual_seed(seed)
        return play(gen, env, env.reset(3, seed=7), [3, 3, 3], SamplingParams(1.0, max_new_tokens=6)).conversations

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_refuel_raises_the_end_reward_of_a_learnable_task(tmp_path, monkeypatch):
    setup_task(tmp_path, monkeypatch)
    run = tmp_path / "refuel"
    assert main(["train", *REFUEL_ARGS, f"run_dir={run}", "iterations=12"]) == 0
    metrics = read_jsonl(run / "metrics.jsonl")
    assert all(m["loss"] == m["loss"] for m in metrics)
    early = sum(m["score_mean"] for m in metrics[:3]) / 3
    late = sum(m["score_mean"] for m in metrics[-3:]) / 3
    assert late > early + 0.15, (early, late)
    evals = read_jsonl(run / "eval.jsonl")
    assert evals[-1]["reward_mean"] > evals[0]["reward_mean"]
    assert set(evals[-1]) >= {"win_rate_turn_1", "win_rate_turn_2", "win_rate_turn_3", "kl_to_ref"}
    assert evals[-1]["win_rate_turn_3"] > 0.5
    initial = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    trained = load_file(run / "checkpoints" / "iter-000012" / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    assert (run / "plots" / "win_rate_per_turn.png").exists()
    assert "Win rate vs initial policy at each turn h" in (run / "report.md").read_text()


@pytest.mark.parametrize("extra", [[], ["refuel.rollin=reference", "refuel.target=turn"], ["refuel.rollin=reference", "refuel.target=turn", "refuel.loss=dpo"]])
def test_refuel_and_its_baselines_run_on_the_secret_task(tmp_path, extra):
    run = tmp_path / "secret"
    args = [a for a in REFUEL_ARGS if not a.startswith(("task.", "reward."))]
    args += ["task.name=secret", "task.horizon=2", "task.n_train=16", "task.n_eval=4", f"run_dir={run}", "iterations=2", *extra]
    assert main(["train", *args]) == 0
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)
    assert all(1 <= m["branch_turn_mean"] <= 2 for m in metrics)


def test_refuel_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    from tests.tiny_run import strip_timings

    setup_task(tmp_path, monkeypatch)
    full = tmp_path / "full"
    assert main(["train", *REFUEL_ARGS, f"run_dir={full}", "iterations=4", "checkpoint.every=2"]) == 0
    part = tmp_path / "part"
    assert main(["train", *REFUEL_ARGS, f"run_dir={part}", "iterations=4", "checkpoint.every=2"]) == 0
    # pretend the run was killed after iteration 2: drop what came later, resume from iteration 2
    import shutil

    shutil.rmtree(part / "checkpoints" / "iter-000004")
    (part / "checkpoints" / "latest").write_text("iter-000002\n")
    assert main(["train", *REFUEL_ARGS, f"run_dir={part}", "iterations=4", "checkpoint.every=2", "--resume"]) == 0
    assert strip_timings(read_jsonl(part / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))
    assert strip_timings(read_jsonl(part / "eval.jsonl")) == strip_timings(read_jsonl(full / "eval.jsonl"))


def test_refuel_config_errors():
    from rebelrl.config import ConfigError, load_config
    from rebelrl.train.config import TrainConfig

    with pytest.raises(ConfigError, match="multi-turn"):
        load_config(TrainConfig, None, ["algo=refuel"])
    with pytest.raises(ConfigError, match="samples_per_prompt must be 2"):
        load_config(TrainConfig, None, ["algo=refuel", "task.name=secret", "rollout.samples_per_prompt=4"])


class HintThenRepeat:
    """A scripted ``Generator`` for guess-number with hints: asks for a hint, then repeats the number it was told."""

    def generate(self, prompts, n, params):
        from types import SimpleNamespace

        replies = []
        for c in prompts:
            last = c.messages[-1].content
            reply = last.removeprefix("Hint: my number is ").rstrip(".") if last.startswith("Hint:") else "A hint, please."
            replies += [c.with_reply(reply)] * n
        return SimpleNamespace(conversations=replies)


def test_the_future_target_values_a_hint_that_the_turn_target_scores_zero():
    """What separates REFUEL from the single-turn baselines on guess-number with hints: judged at its
    own turn a hint is worth 0 and a guess 1/8; judged one turn later (the policy plays on) the hint
    wins every game and the guess still only one in eight."""
    from types import SimpleNamespace

    from rebelrl.algos.refuel import continue_branches
    from rebelrl.envs.numbers import NumberEnv, number_reward

    env = NumberEnv(horizon=3, max_number=8, hints=True)
    starts = [Conversation.from_prompt("play", meta={"number": k}) for k in range(1, 9)]
    asked = [s.with_reply("A hint, please.") for s in starts]
    guessed = [s.with_reply("4") for s in starts]
    assert number_reward(asked) == [0.0] * 8  # target=turn
    assert sum(number_reward(guessed)) == 1.0
    run = SimpleNamespace(generator=HintThenRepeat(), sampling=SamplingParams(1.0, max_new_tokens=4))
    future = continue_branches(run, env, asked + guessed, [1] * 16)  # target=future, L = h + 1
    assert number_reward(future[:8]) == [1.0] * 8
    assert sum(number_reward(future[8:])) == 1.0
    assert [m.content for m in future[2].messages[1:]] == ["A hint, please.", "Hint: my number is 3.", "3"]
