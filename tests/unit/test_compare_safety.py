"""``rebelrl compare`` on the tiny model: two runs in one folder are refused before anything runs, a
run that fails is one line naming it, and a resumed run is reported with every launch counted."""

import pytest
import yaml

from rebelrl.cli import main
from tests.tiny_run import TINY_ARGS, read_jsonl, setup_task


def one_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def _compare_config(tmp_path, monkeypatch, **extra):
    prompts = setup_task(tmp_path, monkeypatch)
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in TINY_ARGS)}
    overrides.update({"task.prompts": str(prompts), "eval.every": 1, "checkpoint.every": 1})
    data = {"run_dir": str(tmp_path / "cmp"), "tasks": [{"name": "tiny", "overrides": overrides}],
            "methods": [{"name": "REBEL", "overrides": {"algo": "rebel"}}], "budget": 32, "seeds": [0], **extra}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_compare_refuses_a_repeated_seed_before_any_run(tmp_path, monkeypatch, capsys):
    """seeds [0, 0]: the second run resumed the finished first one in the same folder, replaced it and
    failed with a traceback."""
    path = _compare_config(tmp_path, monkeypatch, seeds=[0, 1, 0])
    assert main(["compare", str(path)]) == 2
    line = one_line(capsys)
    assert line.startswith("rebelrl compare: config error: ") and "seeds: 0 listed more than once ([0, 1, 0])" in line
    assert not (tmp_path / "cmp").exists()


DYING_MODULE = '''
import os
import signal
from pathlib import Path

from tiny_rules import lowercase_fraction

FLAG = Path({flag!r})
CHECKPOINT = Path({run!r}) / "checkpoints" / "latest"


def lowercase_or_killed(conversations):
    """Kills its own process (once) after the run's first checkpoint."""
    if FLAG.exists() and CHECKPOINT.exists():
        FLAG.unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return lowercase_fraction(conversations)
'''


@pytest.fixture
def killed_compare(tmp_path, monkeypatch):
    """A comparison of one run whose process is killed after its first checkpoint."""
    run = tmp_path / "cmp" / "tiny" / "REBEL-seed0"
    flag = tmp_path / "kill-once"
    flag.write_text("")
    path = _compare_config(tmp_path, monkeypatch)
    (tmp_path / "dying_rules.py").write_text(DYING_MODULE.format(flag=str(flag), run=str(run)))
    config = yaml.safe_load(path.read_text())
    config["tasks"][0]["overrides"]["reward.fn"] = "dying_rules:lowercase_or_killed"
    path.write_text(yaml.safe_dump(config))
    return path, run


def test_a_failed_compare_run_is_one_line_naming_it(killed_compare, capsys):
    path, run = killed_compare
    assert main(["compare", str(path)]) == 2
    line = one_line(capsys)
    log = run.parent / "REBEL-seed0.log"
    assert line == f"rebelrl compare: tiny / REBEL / seed 0 failed (killed by SIGKILL); run folder {run}, log {log}"
    assert "rebelrl: resolved config" in log.read_text()


def test_compare_counts_every_launch_of_a_resumed_run(killed_compare, capsys):
    """The relaunched run's own wall time and peak memory were reported as the run's."""
    path, run = killed_compare
    assert main(["compare", str(path)]) == 2
    assert main(["compare", str(path)]) == 0
    launches = read_jsonl(run / "compare_launches.jsonl")
    assert [r["exit_code"] for r in launches] == [-9, 0]
    (record,) = read_jsonl(run.parent.parent / "runs.jsonl")
    assert record["launches"] == 2 and record["wall_s"] == pytest.approx(sum(r["wall_s"] for r in launches))
    assert record["peak_rss_mb"] == max(r["peak_rss_mb"] for r in launches) and record["completions"] == 32
    assert "Wall time is the sum over every launch of a run" in (run.parent.parent / "comparison.md").read_text()


def test_compare_refuses_a_folder_holding_the_users_files(tmp_path, monkeypatch, capsys):
    """run_dir=. (or any folder of the user's): compare.yaml, comparison.md and plots/ were overwritten."""
    path = _compare_config(tmp_path, monkeypatch)
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "comparison.md").write_text("# my notes\n")
    (mine / "compare.yaml").write_text("my: settings\n")
    assert main(["compare", str(path), f"run_dir={mine}"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"rebelrl compare: run_dir {mine} holds files that are not a rebelrl comparison's "
                           "(compare.yaml, comparison.md, plots) and no .rebelrl-compare marker")
    assert sorted(p.name for p in mine.rglob("*")) == ["compare.yaml", "comparison.md", "plots"]
    assert (mine / "comparison.md").read_text() == "# my notes\n" and (mine / "compare.yaml").read_text() == "my: settings\n"
