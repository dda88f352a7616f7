"""Report writer: JSON-lines reading, PNG plots and the Markdown summary of a fake run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rebelrl.eval.report import read_jsonl, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ("reward.png", "kl.png", "win_rate.png", "reward_vs_kl.png", "timing.png")


def _metrics_row(it: int) -> dict:
    return {
        "iteration": it, "loss": 1.0 / it, "reward_mean": 0.1 * it, "reward_std": 0.05,
        "score_mean": 0.1 * it, "kl_to_ref": 0.2 * it, "response_length": 40.0 + it,
        "frac_no_eos": 0.0, "lr": 1e-6, "grad_norm": 0.5,
        "time/rollout": 3.0, "time/score": 1.0, "time/logprobs": 2.0, "time/train": 4.0, "time/total": 10.0,
    }


def _write_jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    metrics = [_metrics_row(it) for it in (1, 2, 3, 4)]
    del metrics[2]["kl_to_ref"]  # a row that did not log every key
    # The run was killed while writing iteration 5.
    _write_jsonl(tmp_path / "metrics.jsonl", metrics, tail='{"iteration": 5, "loss": 0.')
    evals = [
        {"iteration": 0, "reward_mean": 0.125, "reward_std": 0.3, "win_rate_vs_initial": 0.5,
         "kl_to_ref": 0.0, "response_length": 41.0, "frac_no_eos": 0.0, "n_prompts": 64},
        {"iteration": 2, "reward_mean": 0.25, "reward_std": 0.3, "win_rate_vs_initial": 0.5625,
         "kl_to_ref": 0.4, "response_length": 43.0, "frac_no_eos": 0.0, "n_prompts": 64},
        {"iteration": 4, "reward_mean": 0.4375, "reward_std": 0.3, "win_rate_vs_initial": 0.671875,
         "kl_to_ref": 0.8, "response_length": 45.0, "frac_no_eos": 0.015625, "n_prompts": 64},
    ]
    _write_jsonl(tmp_path / "eval.jsonl", evals)
    (tmp_path / "config.yaml").write_text("algo: rebel\neta: 1.0\n")
    return tmp_path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


def _image_links(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_read_jsonl_missing_file_is_empty(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl") == []


def test_read_jsonl_drops_only_a_truncated_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 1}\n\n{"iteration": 2}\n{"iteration": 3, "lo')
    assert read_jsonl(path) == [{"iteration": 1}, {"iteration": 2}]

    path.write_text('{"iteration": 1}\n{"iteration": 2, "lo\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_jsonl(path)


def test_full_run_writes_every_plot_and_the_numbers(run_dir):
    report_path = write_report(run_dir, title="REBEL on tldr")
    assert report_path == run_dir / "report.md"
    report = report_path.read_text()

    for name in ALL_PLOTS:
        _assert_png(run_dir / "plots" / name)
    links = _image_links(report)
    assert sorted(links) == sorted(f"plots/{name}" for name in ALL_PLOTS)
    for link in links:
        assert not Path(link).is_absolute() and (run_dir / link).is_file()

    assert report.startswith("# REBEL on tldr\n")
    # Initial and final eval reward, final win rate and final eval KL, as put in the fixture.
    assert "| Initial eval reward (iteration 0) | 0.125 |" in report
    assert "| Final eval reward (iteration 4) | 0.438 |" in report
    assert "| Final win rate vs initial | 0.672 |" in report
    assert "| Final KL to reference (eval, iteration 4, nats) | 0.800 |" in report
    # time/total is 10 s every iteration; rollout 3 s is 30% of it, train 4 s is 40%.
    assert "| Mean seconds per iteration | 10.00 |" in report
    assert "| Mean rollout time (share) | 3.00 s (30.0%) |" in report
    assert "| Mean train time (share) | 4.00 s (40.0%) |" in report
    # The truncated iteration 5 is dropped, not reported.
    assert "| Training iterations logged | 4 |" in report
    # Every evaluation is a row of the evaluation table.
    assert "| 2 | 0.250 | 0.300 | 0.562 | 0.400 | 43.0 | 0.000 | 64 |" in report
    assert "| 4 | 0.438 | 0.300 | 0.672 | 0.800 | 45.0 | 0.016 | 64 |" in report
    assert "[config.yaml](config.yaml)" in report
    assert not list(run_dir.glob("**/*.tmp")), "temporary files were left behind"


def test_run_without_evals_skips_eval_plots(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl", [_metrics_row(it) for it in (1, 2, 3)])
    report = write_report(tmp_path).read_text()

    assert report.startswith(f"# Training report: {tmp_path.name}\n")
    for name in ("reward.png", "kl.png", "timing.png"):
        _assert_png(tmp_path / "plots" / name)
    for name in ("win_rate.png", "reward_vs_kl.png"):
        assert not (tmp_path / "plots" / name).exists()
        assert name not in report
    assert sorted(_image_links(report)) == ["plots/kl.png", "plots/reward.png", "plots/timing.png"]
    assert "Initial eval reward" not in report
    # With no eval KL the summary falls back to the last train KL (0.2 * 3).
    assert "| Final KL to reference (train, iteration 3, nats) | 0.600 |" in report
    assert "No evaluations were logged" in report


def test_rewriting_a_report_is_idempotent(run_dir):
    first = write_report(run_dir).read_text()
    assert write_report(run_dir).read_text() == first


def test_evaluation_samples_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run stopped while writing its samples keeps the previous file whole (later evaluations and
    resumed runs compare with it), and leaves no temporary file behind."""
    import sys

    from rebelrl.eval.evaluate import save_sample_rows

    evaluate_module = sys.modules["rebelrl.eval.evaluate"]

    path = tmp_path / "eval_samples_latest.jsonl"
    rows = [{"prompt": f"p{i}", "completion": "c", "score": float(i), "finished": True} for i in range(3)]
    save_sample_rows(path, rows)
    before = path.read_text()
    calls = []

    def dumps_then_die(obj):
        calls.append(obj)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return json.dumps(obj)

    monkeypatch.setattr(evaluate_module.json, "dumps", dumps_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_sample_rows(path, [{**r, "score": 9.0} for r in rows])
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
