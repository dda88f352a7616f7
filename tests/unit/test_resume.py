"""Runs that never lose, corrupt or overwrite: kills at every stage, then --resume; the run-dir rule;
config changes on resume."""


import pytest
import torch
import yaml
from safetensors.torch import load_file

from rebelrl.cli import main
from rebelrl.train import checkpoint as checkpoint_module
from rebelrl.train import metrics as metrics_module
from tests.resume_run import ITERATIONS, args, full, task_dir  # noqa: F401  (fixtures)
from tests.tiny_run import read_jsonl, strip_timings


def _die_after_logging(monkeypatch, log_name, iteration):
    real = metrics_module.JsonlLogger.log

    def log(self, record):
        real(self, record)
        if self.path.name == log_name and record["iteration"] == iteration:
            raise KeyboardInterrupt

    monkeypatch.setattr(metrics_module.JsonlLogger, "log", log)


def _die_between_rename_and_pointer(monkeypatch, iteration):
    """A kill while ``checkpoints/latest`` is rewritten: iter-N is in place, the pointer still names the
    previous one, and the pointer's temporary file is left behind."""
    real = checkpoint_module.write_atomic

    def write_atomic(path, text):
        if path.name == checkpoint_module.LATEST and text.strip() == f"iter-{iteration:06d}":
            checkpoint_module.temp_path(path, 12345).write_text(text[:3])
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(checkpoint_module, "write_atomic", write_atomic)


KILLS = {
    # name: (how, resumed from a checkpoint?)
    "after the iteration-0 evaluation, before iteration 1": (lambda mp: _die_after_logging(mp, "eval.jsonl", 0), False),
    "after iteration 1, before the first checkpoint": (lambda mp: _die_after_logging(mp, "metrics.jsonl", 1), False),
    "after the iteration-2 evaluation, before its checkpoint": (lambda mp: _die_after_logging(mp, "eval.jsonl", 2), False),
    "after iteration 3": (lambda mp: _die_after_logging(mp, "metrics.jsonl", 3), True),
    "between the iteration-4 checkpoint and its pointer": (lambda mp: _die_between_rename_and_pointer(mp, 4), True),
}


@pytest.mark.parametrize("kill", list(KILLS))
def test_kill_then_resume_reproduces_the_uninterrupted_run(kill, task_dir, full, tmp_path, monkeypatch, capsys):
    how, from_checkpoint = KILLS[kill]
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        how(mp)
        assert main(args(task_dir, run)) == 130
    interrupted = capsys.readouterr().err.strip().splitlines()[-1]
    assert interrupted.startswith("rebelrl train: interrupted; ")
    assert interrupted.endswith(f"run_dir={run} iterations=4 eval.every=2 checkpoint.every=2 --resume")
    if not from_checkpoint:
        assert "no complete checkpoint was saved" in interrupted

    assert main([*args(task_dir, run), "--resume"]) == 0
    err = capsys.readouterr().err
    if not from_checkpoint:
        assert "has no complete checkpoint yet: starting the run again from iteration 0" in err
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert strip_timings(read_jsonl(run / name)) == strip_timings(read_jsonl(full / name)), name
    assert (run / "eval_initial.jsonl").read_text() == (full / "eval_initial.jsonl").read_text()
    a = load_file(full / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    b = load_file(run / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in run.rglob(".*") if p.name != ".rebelrl-run"], "temporary files of interrupted writes remain"


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(task_dir, tmp_path, monkeypatch, capsys):
    config = tmp_path / "my config.yaml"
    config.write_text("seed: 0\n")
    run = tmp_path / "run"
    _die_after_logging(monkeypatch, "metrics.jsonl", 3)
    assert main(["train", str(config), *args(task_dir, run)[1:]]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"rebelrl train: interrupted; the last complete checkpoint is {run / 'checkpoints' / 'iter-000002'} (iteration 2)")
    assert f"resume with: rebelrl train '{config}' model.name=tiny-random " in line and line.endswith(" --resume")


# --- the run directory ------------------------------------------------------------------------------


@pytest.mark.parametrize("as_dot", [False, True])
def test_a_folder_holding_the_users_files_is_refused(as_dot, task_dir, tmp_path, monkeypatch, capsys):
    """``run_dir=.`` in a folder with the user's own config.yaml and report.md overwrote both."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: config\n")
    (folder / "report.md").write_text("# my report\n")
    if as_dot:
        monkeypatch.chdir(folder)
    assert main(args(task_dir, "." if as_dot else folder)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files that are not a rebelrl run's (config.yaml, report.md)" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "report.md"]
    assert (folder / "config.yaml").read_text() == "my: config\n"
    assert main([*args(task_dir, folder), "--resume"]) == 2  # not even with --resume


def test_a_run_is_marked_and_a_second_start_is_refused(task_dir, full, capsys):
    assert (full / ".rebelrl-run").exists()
    before = (full / "metrics.jsonl").read_text()
    assert main(args(task_dir, full)) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert (full / "metrics.jsonl").read_text() == before


# --- config changes on resume -------------------------------------------------------------------------


@pytest.fixture
def stopped(task_dir, tmp_path, monkeypatch):
    """A run killed after iteration 3, with its last checkpoint at iteration 2."""
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        _die_after_logging(mp, "metrics.jsonl", 3)
        assert main(args(task_dir, run)) == 130
    return run


def test_resume_with_a_changed_config_is_refused_with_the_diff(task_dir, stopped, capsys):
    assert main([*args(task_dir, stopped, "optim.lr=1e-3", "rebel.eta=5"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the config differs from the run's (rebel.eta: 10.0 -> 5.0; optim.lr: 0.003 -> 0.001)" in err
    assert "--allow-config-change" in err
    assert not (stopped / "config_changes.jsonl").exists()


def test_an_allowed_change_is_recorded_and_the_new_lr_takes_effect(task_dir, stopped, capsys):
    assert main([*args(task_dir, stopped, "optim.lr=1e-3"), "--resume", "--allow-config-change"]) == 0
    assert "config changed from iteration 3 (optim.lr: 0.003 -> 0.001)" in capsys.readouterr().err
    changes = read_jsonl(stopped / "config_changes.jsonl")
    assert changes == [{"from_iteration": 3, "changes": {"optim.lr": {"old": 0.003, "new": 0.001}}}]
    assert yaml.safe_load((stopped / "config.yaml").read_text())["optim"]["lr"] == 0.003  # how the run started
    # a constant schedule: the lr logged is the lr in force
    assert [m["lr"] for m in read_jsonl(stopped / "metrics.jsonl")] == [0.003, 0.003, 0.001, 0.001]
    assert "- from iteration 3: `optim.lr`: 0.003 -> 0.001" in (stopped / "report.md").read_text()
    # the same values again are no change; the run's own first config now is one
    assert main([*args(task_dir, stopped, "optim.lr=1e-3", "iterations=6"), "--resume", "--allow-config-change"]) == 0
    assert read_jsonl(stopped / "config_changes.jsonl")[1] == {"from_iteration": 5, "changes": {"iterations": {"old": 4, "new": 6}}}
    assert main([*args(task_dir, stopped, "iterations=6"), "--resume"]) == 2
    assert "optim.lr: 0.001 -> 0.003" in capsys.readouterr().err.strip().splitlines()[-1]


def test_keys_the_checkpoint_was_built_from_never_change(task_dir, stopped, capsys):
    assert main([*args(task_dir, stopped, "task.n_eval=5"), "--resume", "--allow-config-change"]) == 2
    assert "cannot resume with a different task.n_eval (task.n_eval: 6 -> 5)" in capsys.readouterr().err
    # the rollout budget is also the evaluation's while eval.max_new_tokens is null: win rates against
    # iteration 0 would compare replies of different lengths
    assert main([*args(task_dir, stopped, "rollout.max_new_tokens=6"), "--resume", "--allow-config-change"]) == 2
    assert "cannot resume with a different held-out sampling" in capsys.readouterr().err
    assert main([*args(task_dir, stopped, "rollout.max_new_tokens=6", "eval.max_new_tokens=8"), "--resume", "--allow-config-change"]) == 2
    assert "eval.max_new_tokens" in capsys.readouterr().err  # eval.* themselves are frozen


def test_what_counts_as_a_run_directory(tmp_path):
    from rebelrl.train.run_dir import clean_interrupted_writes, is_run_dir

    unmarked = tmp_path / "unmarked"  # run output names, but no marker: the user's, whatever they are called
    (unmarked / "checkpoints").mkdir(parents=True)
    (unmarked / "metrics.jsonl").write_text("")
    assert not is_run_dir(unmarked)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".rebelrl-run").write_text("")
    assert is_run_dir(run)
    (run / ".eval.jsonl.4242.rebelrl-tmp").write_text("")  # writes a kill cut short
    (run / ".report.md.k2x9ab_q.rebelrl-tmp").write_text("")
    (run / ".notes.tmp").write_text("mine")  # a temporary-looking name rebelrl never writes
    clean_interrupted_writes(run)
    assert sorted(p.name for p in run.iterdir()) == [".notes.tmp", ".rebelrl-run"]
