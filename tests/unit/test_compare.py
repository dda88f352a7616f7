"""``rebelrl compare`` on the tiny model: equal budgets, a shared initial evaluation, the report,
and an interrupted comparison that picks up where it stopped."""

import json

import pytest
import yaml

from rebelrl import compare
from rebelrl.cli import main
from rebelrl.config import ConfigError, load_config
from tests.tiny_run import TINY_ARGS, read_jsonl, setup_task


def _config(tmp_path, monkeypatch, **extra):
    prompts = setup_task(tmp_path, monkeypatch)
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in TINY_ARGS)}
    overrides.update({"task.prompts": str(prompts), "eval.every": 1, "checkpoint.every": 1})
    data = {
        "run_dir": str(tmp_path / "cmp"),
        "tasks": [{"name": "tiny", "overrides": overrides}],
        "methods": [
            {"name": "REBEL", "overrides": {"algo": "rebel"}},
            {"name": "GRPO", "overrides": {"algo": "grpo", "rollout.samples_per_prompt": 4, "update.minibatch_size": 8, "update.micro_batch_size": 8}},
        ],
        "budget": 32,
        "seeds": [0, 1],
        **extra,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_equal_budget_in_completions(tmp_path, monkeypatch):
    """32 completions: REBEL samples 8 prompts x 2 = 16 an iteration (2 iterations), GRPO 8 x 4 = 32
    (1 iteration), A*-PO 8 x (1 + 3 reference samples) = 32 (1 iteration)."""
    path = _config(tmp_path, monkeypatch)
    cfg = load_config(compare.CompareConfig, path, ["methods=[{name: R, overrides: {algo: rebel}}, {name: G, overrides: {algo: grpo, "
                                                   "rollout.samples_per_prompt: 4}}, {name: A, overrides: {algo: astar_po, astar.ref_samples: 3}}]"])
    runs = compare.plan(cfg, quick=True)
    assert [(r.method, r.cfg.iterations) for r in runs] == [("R", 2), ("G", 1), ("A", 1)]
    assert runs[0].cfg.eval.initial_from is None and {r.cfg.eval.initial_from for r in runs[1:]} == {str(runs[0].run_dir)}


def test_a_bad_method_is_reported_before_anything_runs(tmp_path, monkeypatch):
    path = _config(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="method G: .*grpo.clip_eps"):
        compare.plan(load_config(compare.CompareConfig, path, ["methods=[{name: G, overrides: {algo: grpo, grpo.clip_eps: -1}}]"]))
    assert main(["compare", str(path), "methods=[{name: G, overrides: {algo: nope}}]"]) == 2


def test_compare_end_to_end_resuming_after_a_kill(tmp_path, monkeypatch):
    path = _config(tmp_path, monkeypatch)
    launched = []

    def killed_on_the_second_run(run):
        if launched:
            raise KeyboardInterrupt
        launched.append(run.run_dir)
        return compare.launch_run(run)

    cfg = load_config(compare.CompareConfig, path, [])
    with pytest.raises(KeyboardInterrupt):
        compare.run_all(cfg, quick=True, launch=killed_on_the_second_run)
    first = launched[0]
    finished_at = (first / "eval.jsonl").stat().st_mtime

    assert main(["compare", str(path), "--quick"]) == 0
    assert (first / "eval.jsonl").stat().st_mtime == finished_at  # the finished run was read back, not retrained
    assert not any((tmp_path / "cmp" / "tiny").glob("*/checkpoints"))  # finished runs keep no weights unless asked
    root = tmp_path / "cmp"
    ledger = read_jsonl(root / "runs.jsonl")
    assert [(r["method"], r["completions"]) for r in ledger] == [("REBEL", 32), ("GRPO", 32)]
    assert all(r["wall_s"] > 0 and r["peak_rss_mb"] > 100 for r in ledger)
    grpo_evals = read_jsonl(root / "tiny" / "GRPO-seed0" / "eval.jsonl")
    assert grpo_evals[0]["reused_from"] == str(first) and grpo_evals[0]["reward_mean"] == read_jsonl(first / "eval.jsonl")[0]["reward_mean"]
    report = (root / "comparison.md").read_text()
    assert "| REBEL |" in report and "| GRPO |" in report
    for name in ("reward", "win_rate", "reward_vs_kl", "cost"):
        assert (root / "plots" / f"tiny-{name}.png").exists()
    assert json.loads(json.dumps(ledger))  # plain JSON


def test_offline_methods_beside_online_ones_at_equal_budgets(tmp_path, monkeypatch):
    """A preference file with a reward: REBEL samples replies to its prompts (16 completions an
    iteration, budget 32: 2 iterations), DPO, chi-PO and SFT on the chosen replies train on its rows
    (rows_budget 16, minibatches of 8: 2 iterations), a reward model too; the report states each
    budget in its own unit and shows the held-out pair accuracy of the methods that rank pairs."""
    setup_task(tmp_path, monkeypatch)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"prompt {i}", "chosen": "good day", "rejected": "GOOD DAY"}) + "\n" for i in range(24)))
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in TINY_ARGS) if not k.startswith("task.")}
    overrides.update({"eval.every": 1, "update.minibatch_size": 8, "update.micro_batch_size": 8, "task.name": "preferences",
                      "task.data": str(pairs), "task.n_eval": 4})
    data = {
        "run_dir": str(tmp_path / "cmp"),
        "tasks": [{"name": "pairs", "overrides": overrides}],
        "methods": [
            {"name": "REBEL", "overrides": {"algo": "rebel", "update.minibatch_size": 4, "update.micro_batch_size": 4}},
            {"name": "DPO", "overrides": {"algo": "dpo"}},
            {"name": "chi-PO", "overrides": {"algo": "dpo", "dpo.loss": "chipo"}},
            {"name": "SFT", "overrides": {"algo": "sft"}},
            {"name": "RM", "overrides": {"algo": "reward_model", "reward.fn": None}},
        ],
        "budget": 32, "rows_budget": 16, "seeds": [0],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    runs = compare.plan(load_config(compare.CompareConfig, path))
    assert [(r.method, r.cfg.iterations) for r in runs] == [("REBEL", 2), ("DPO", 2), ("chi-PO", 2), ("SFT", 2), ("RM", 2)]
    assert runs[3].cfg.eval.initial_from == str(runs[0].run_dir) and runs[4].cfg.eval.initial_from is None
    assert main(["compare", str(path)]) == 0
    report = (tmp_path / "cmp" / "comparison.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    assert "32 completions" in rows["REBEL"] and "16 rows" in rows["DPO"] and "16 rows" in rows["RM"]
    assert rows["DPO"].split(" | ")[4] != "-" and rows["REBEL"].split(" | ")[4] == "-"  # held-out pair accuracy
    ledger = read_jsonl(tmp_path / "cmp" / "runs.jsonl")
    assert {r["method"]: r["rows"] for r in ledger}["SFT"] == 16
    with pytest.raises(ConfigError, match="rows_budget=16 is the budget of the offline methods"):
        compare.plan(load_config(compare.CompareConfig, path, ["methods=[{name: R, overrides: {algo: rebel}}]"]))


def test_each_run_is_one_tracked_run_grouped_by_comparison_and_task(tmp_path, monkeypatch):
    """With a tracker in the base, every method and seed is its own tracked run, grouped by comparison and
    task; the runs export no model unless the comparison keeps its checkpoints."""
    pytest.importorskip("tensorboard")
    path = _config(tmp_path, monkeypatch, base={"log": {"report_to": ["tensorboard"]}})
    runs = compare.plan(load_config(compare.CompareConfig, path))
    assert [(r.cfg.log.name, r.cfg.log.group) for r in runs] == [
        (f"tiny/{m}-seed{s}", "cmp/tiny") for m in ("REBEL", "GRPO") for s in (0, 1)]
    assert not any(r.cfg.export.at_end for r in runs)
    kept = compare.plan(load_config(compare.CompareConfig, path, ["keep_checkpoints=true"]))
    assert all(r.cfg.export.at_end for r in kept)
    untracked = compare.plan(load_config(compare.CompareConfig, _config(tmp_path, monkeypatch)))
    assert {(r.cfg.log.name, r.cfg.log.group) for r in untracked} == {(None, None)}
