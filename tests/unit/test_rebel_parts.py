import json

import pytest
import torch

from rebelrl.algos.rebel import make_pairs
from rebelrl.cli import main
from rebelrl.eval import win_rate
from tests.tiny_run import TINY_ARGS, read_jsonl, setup_task


def test_pairs_for_two_samples_are_the_two_samples():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2])
    assert make_pairs(scores, 2, "best_worst").tolist() == [[0, 1], [2, 3]]


def test_best_worst_pairing_and_its_tie_rule():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9,  # prompt 0: best = first max (1), worst = 0
                           0.3, 0.3, 0.3, 0.3])  # prompt 1: all tied -> first (4) vs last (7)
    assert make_pairs(scores, 4, "best_worst").tolist() == [[1, 0], [4, 7]]


def test_adjacent_pairing():
    scores = torch.zeros(8)
    assert make_pairs(scores, 4, "adjacent").tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 0.0, 0.5, 0.2]), torch.tensor([0.0, 1.0, 0.5, 0.1])) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate(torch.zeros(2), torch.zeros(3))


def test_lora_run_trains_only_the_adapter(tmp_path, monkeypatch):
    prompts = setup_task(tmp_path, monkeypatch)
    run = tmp_path / "lora"
    args = ["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run}", "iterations=2", "model.lora_r=4", "rebel.kl_coef=0.1"]
    assert main(args) == 0
    metrics = read_jsonl(run / "metrics.jsonl")
    assert all(m["loss"] == m["loss"] for m in metrics)
    assert metrics[0]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts as a no-op
    assert metrics[1]["kl_to_ref"] != pytest.approx(0.0, abs=1e-6)  # the reference is the adapter switched off
    assert (run / "checkpoints" / "iter-000002" / "model" / "adapter_model.safetensors").exists()


def test_k4_best_worst_run(tmp_path, monkeypatch):
    prompts = setup_task(tmp_path, monkeypatch)
    run = tmp_path / "k4"
    args = ["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={run}", "iterations=1", "rollout.samples_per_prompt=4"]
    assert main(args) == 0
    (row,) = read_jsonl(run / "metrics.jsonl")
    assert row["pair_score_gap"] > 0  # best vs worst of four differ


def test_bad_prompt_file_fails_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    setup_task(tmp_path, monkeypatch)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    import rebelrl.models as models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded before validation"))
    assert main(["train", *TINY_ARGS, f"task.prompts={bad}", f"run_dir={tmp_path / 'r'}"]) == 2
    assert f"rebelrl train: {bad}, line 2, field 'prompt': expected a string, got int" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_generate_and_eval_commands(tmp_path, monkeypatch, capsys):
    prompts = setup_task(tmp_path, monkeypatch)
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "model=tiny-random", f"prompts={prompts}", "n=2", "max_new_tokens=5", f"output={out}"]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 60 and {"prompt", "completion", "finished"} <= set(rows[0])
    capsys.readouterr()
    args = ["eval", "model=tiny-random", "baseline=tiny-random", "task.name=prompts", f"task.prompts={prompts}",
            "task.n_eval=5", "reward.fn=tiny_rules:lowercase_fraction", "max_new_tokens=5"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    # the same model with the same seed: identical samples, every prompt a tie, zero KL
    assert result["win_rate_vs_baseline"] == 0.5
    assert result["kl_to_baseline"] == pytest.approx(0.0, abs=1e-5)


def test_reasoning_gym_task_trains_through_the_cli(tmp_path):
    run = tmp_path / "rg"
    args = [a for a in TINY_ARGS if not a.startswith(("task.", "reward."))]
    args += ["task.name=reasoning-gym", "task.dataset=basic_arithmetic", "task.n_train=16", "task.n_eval=4", "reward.no_eos_penalty=null",
             f"run_dir={run}", "iterations=1"]
    assert main(["train", *args]) == 0
    (row,) = read_jsonl(run / "metrics.jsonl")
    assert 0.0 <= row["score_mean"] <= 1.0 and row["loss"] == row["loss"]
    sample = read_jsonl(run / "eval_initial.jsonl")[0]
    assert "<answer>" in sample["prompt"]


def test_lora_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    import shutil

    from tests.tiny_run import strip_timings

    prompts = setup_task(tmp_path, monkeypatch)
    common = ["train", *TINY_ARGS, f"task.prompts={prompts}", "iterations=3", "checkpoint.every=1", "model.lora_r=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*common, f"run_dir={full}"]) == 0
    assert main([*common, f"run_dir={part}"]) == 0
    shutil.rmtree(part / "checkpoints" / "iter-000003")  # as if killed before the last checkpoint
    (part / "checkpoints" / "latest").write_text("iter-000002\n")
    assert main([*common, f"run_dir={part}", "--resume"]) == 0
    assert strip_timings(read_jsonl(part / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))
