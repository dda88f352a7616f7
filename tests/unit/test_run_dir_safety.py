"""What a run folder may lose: nothing of the user's, and nothing of a run's that cannot be made again.

Through the CLI on the tiny model: resume clears only a folder rebelrl marked, and in it only what
rebelrl wrote; no kill point leaves a folder that needs cleaning by hand; resume reads only the
run's own checkpoints and refuses a damaged one with one line; a full disk keeps the previous
checkpoint; a run_dir that cannot be written is one line."""

import errno
import os

import pytest
import torch

from rebelrl.algos import run as run_module
from rebelrl.cli import main
from rebelrl.train import checkpoint as checkpoint_module
from tests.resume_run import ITERATIONS, args, full, task_dir  # noqa: F401  (fixtures)
from tests.tiny_run import die_after_logging, read_jsonl, strip_timings

@pytest.fixture
def stopped(task_dir, tmp_path, monkeypatch):
    """A run killed after iteration 3; its last checkpoint is iteration 2's."""
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        die_after_logging(mp, 3)
        assert main(args(task_dir, run)) == 130
    return run


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- only a marked folder is cleared, and in it only what rebelrl wrote -----------------------------


def test_resume_refuses_an_unmarked_folder_with_run_like_names(task_dir, tmp_path, capsys):
    """A user's own metrics.jsonl, report.md and plots/ looked like an unfinished old run: --resume
    said it was starting again and deleted them."""
    folder = tmp_path / "mine"
    (folder / "plots").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"iteration": 1, "my": "numbers"}\n')
    (folder / "report.md").write_text("# my report\n")
    (folder / "plots" / "mine.png").write_bytes(b"\x89PNG mine")
    before = snapshot(folder)
    assert main([*args(task_dir, folder), "--resume"]) == 2
    line = one_line(capsys)
    assert "holds files that are not a rebelrl run's (metrics.jsonl, plots, report.md) and no .rebelrl-run marker" in line
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "plots", "report.md"]


def test_resume_keeps_a_users_temporary_looking_files(task_dir, stopped, full):
    """Names that look temporary but that rebelrl never writes survive a resume from a checkpoint."""
    mine = {".notes.tmp": "a", ".eval.jsonl.tmp4242": "b", "checkpoints/.backup.tmp": "c", "plots/.draft.png.tmp7": "d"}
    (stopped / "plots").mkdir(exist_ok=True)
    for name, text in mine.items():
        (stopped / name).write_text(text)
    assert main([*args(task_dir, stopped), "--resume"]) == 0
    assert {name: (stopped / name).read_text() for name in mine} == mine
    assert strip_timings(read_jsonl(stopped / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))


def test_starting_again_keeps_the_users_files_in_a_marked_run(task_dir, tmp_path, monkeypatch, capsys):
    """A run killed before its first checkpoint starts again under --resume: its logs are replaced,
    a file the user put in its folder (or in plots/) is not."""
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        die_after_logging(mp, 1)
        assert main(args(task_dir, run)) == 130
    (run / "plots").mkdir(exist_ok=True)
    (run / "plots" / "mine.png").write_bytes(b"mine")
    (run / "notes.txt").write_text("mine")
    assert main([*args(task_dir, run), "--resume"]) == 0
    assert "starting the run again from iteration 0" in capsys.readouterr().err
    assert (run / "plots" / "mine.png").read_bytes() == b"mine" and (run / "notes.txt").read_text() == "mine"
    assert [m["iteration"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_finished_run_whose_checkpoints_are_gone_is_not_started_again(task_dir, tmp_path, capsys):
    """``rebelrl compare`` deletes a finished run's checkpoints; resuming it must not replace its results."""
    run = tmp_path / "run"
    assert main(args(task_dir, run)) == 0
    for path in sorted((run / "checkpoints").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    before = snapshot(run)
    assert main([*args(task_dir, run), "--resume"]) == 2
    assert "its checkpoints are gone, but its logs show it saved one (iteration 4 logged, report.md written)" in one_line(capsys)
    assert snapshot(run) == before


# --- no kill point needs cleaning by hand ---------------------------------------------------------------


def test_a_kill_while_the_marker_is_written_leaves_a_resumable_folder(task_dir, tmp_path, monkeypatch):
    """A kill between writing the marker's temporary file and renaming it left a folder that neither a
    fresh start nor --resume accepted."""
    run = tmp_path / "run"
    real_replace = os.replace

    def killed_at_the_marker(src, dst):
        if os.path.basename(dst) == ".rebelrl-run":
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", killed_at_the_marker)
        assert main(args(task_dir, run)) in (0, 130)
    assert main([*args(task_dir, run), "--resume"]) == 0
    assert (run / ".rebelrl-run").is_file() and [m["iteration"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not [p.name for p in run.rglob(".*") if p.name != ".rebelrl-run"]


def test_a_kill_right_after_marking_leaves_a_folder_a_new_run_accepts(task_dir, tmp_path, monkeypatch):
    """Marked, then killed before config.yaml was in place: the folder holds nothing of a run, so a
    plain start (no --resume) is accepted."""
    run = tmp_path / "run"
    real = run_module.write_atomic

    def killed_at_the_config(path, text):
        if path.name == "config.yaml":
            path.with_name(".config.yaml.4242.rebelrl-tmp").write_text(text[:10])  # what a kill mid-write leaves
            raise KeyboardInterrupt
        real(path, text)

    with monkeypatch.context() as mp:
        mp.setattr(run_module, "write_atomic", killed_at_the_config)
        assert main(args(task_dir, run)) == 130
    assert main(args(task_dir, run)) == 0
    assert sorted(p.name for p in run.glob(".*")) == [".rebelrl-run"]


# --- resume reads only the run's own, whole checkpoints ----------------------------------------------


@pytest.mark.parametrize("how", ["relative", "absolute", "symlinked folder"])
def test_a_latest_pointer_out_of_the_run_is_refused(how, task_dir, full, stopped, capsys):
    """A planted or stale checkpoints/latest that leads to another run's checkpoint: resume loaded it
    and cut this run's logs back."""
    root = stopped / "checkpoints"
    foreign = full / "checkpoints" / "iter-000004"
    if how == "relative":
        (root / "latest").write_text(os.path.relpath(foreign, root) + "\n")
    elif how == "absolute":
        (root / "latest").write_text(f"{foreign}\n")
    else:
        (root / "iter-000008").symlink_to(foreign, target_is_directory=True)
        (root / "latest").write_text("iter-000008\n")
    before = snapshot(stopped)
    assert main([*args(task_dir, stopped), "--resume"]) == 2
    line = one_line(capsys)
    assert line.startswith("rebelrl train: ") and "resume reads only checkpoints inside its own run" in line
    assert snapshot(stopped) == before


@pytest.mark.parametrize("damage", ["truncated trainer state", "truncated weights", "planted pickle"])
def test_a_damaged_checkpoint_is_refused_on_one_line(damage, task_dir, stopped, capsys):
    checkpoint = stopped / "checkpoints" / "iter-000002"
    if damage == "truncated trainer state":
        path, expected = checkpoint / "trainer_state.pt", "trainer_state.pt: truncated or corrupt"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "truncated weights":
        path, expected = checkpoint / "model" / "model.safetensors", "model.safetensors: truncated or corrupt"
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path, expected = checkpoint / "trainer_state.pt", "holds more than tensors and plain values (a pickled print)"
        torch.save({"iteration": 2, "x": _Planted()}, path)
    before = snapshot(stopped)
    assert main([*args(task_dir, stopped), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err.strip().splitlines()[-1]
    assert snapshot(stopped) == before


class _Planted:
    def __reduce__(self):
        return (print, ("planted",))


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(task_dir, full, tmp_path, monkeypatch, capsys):
    """ENOSPC while the iteration-4 checkpoint is written: one line saying the disk is full, the
    iteration-2 checkpoint and the pointer to it intact, no temporary folder left; once there is
    room, --resume finishes the run as if nothing happened."""
    run = tmp_path / "run"
    real_save = torch.save

    def disk_full(obj, path, *a, **k):
        if isinstance(obj, dict) and obj.get("iteration") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint_module.torch, "save", disk_full)
        assert main(args(task_dir, run)) == 2
    line = one_line(capsys)
    assert "could not write the checkpoint of iteration 4: the disk is full (errno ENOSPC)" in line
    assert f"the previous checkpoint {run / 'checkpoints' / 'iter-000002'} is intact" in line
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter-000002", "latest"] and (root / "latest").read_text() == "iter-000002\n"
    assert checkpoint_module.load_trainer_state(root / "iter-000002")["iteration"] == 2
    assert main([*args(task_dir, run), "--resume"]) == 0
    assert strip_timings(read_jsonl(run / "metrics.jsonl")) == strip_timings(read_jsonl(full / "metrics.jsonl"))


# --- a run_dir that cannot be written ----------------------------------------------------------------


def test_a_run_dir_that_cannot_be_written_is_one_line(task_dir, tmp_path, monkeypatch, capsys):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    assert main(args(task_dir, dangling)) == 2
    assert one_line(capsys) == f"rebelrl train: run_dir {dangling} is a symbolic link to {tmp_path / 'gone'}, which does not exist"

    (tmp_path / "a_file").write_text("mine")
    assert main(args(task_dir, tmp_path / "a_file" / "run")) == 2
    assert one_line(capsys) == f"rebelrl train: run_dir {tmp_path / 'a_file' / 'run'}: {tmp_path / 'a_file'} is a file, not a folder"

    locked = tmp_path / "locked" / "run"  # a folder in a read-only parent (as root, access checks pass: fail the mkdir)
    real_mkdir = type(locked).mkdir

    def read_only(self, *a, **k):
        if self == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(type(locked), "mkdir", read_only)
    assert main(args(task_dir, locked)) == 2
    line = one_line(capsys)
    assert line.startswith(f"rebelrl train: run_dir {locked}") and "Permission denied" in line
