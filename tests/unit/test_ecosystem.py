"""Trackers, sample tables and the exported model, through real runs of the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rebelrl.cli import main
from tests.tiny_run import TINY_ARGS, die_after_logging, read_jsonl, setup_task

ARGS = [*TINY_ARGS, "iterations=4"]


def _train(tmp_path, monkeypatch, *extra, name="run") -> Path:
    prompts = setup_task(tmp_path, monkeypatch)
    run_dir = tmp_path / name
    assert main(["train", *ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", *extra]) == 0
    return run_dir


def _kill_then_resume(tmp_path, monkeypatch, *extra) -> Path:
    """A run killed right after it logged iteration 3 (its last checkpoint: 2), then resumed to the end."""
    prompts = setup_task(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    args = ["train", *ARGS, f"task.prompts={prompts}", f"run_dir={run_dir}", *extra]
    with monkeypatch.context() as m:
        die_after_logging(m, 3)
        assert main(args) == 130
    assert main([*args, "--resume"]) == 0
    return run_dir


# --- the sample table --------------------------------------------------------------------------------


def test_every_evaluation_writes_its_sample_table(tmp_path, monkeypatch):
    run_dir = _train(tmp_path, monkeypatch, "export.at_end=false")
    tables = sorted(p.name for p in (run_dir / "samples").glob("*.parquet"))
    assert tables == ["iter-000000.parquet", "iter-000002.parquet", "iter-000004.parquet"]
    table = pq.read_table(run_dir / "samples" / "iter-000004.parquet").to_pylist()
    latest, initial = read_jsonl(run_dir / "eval_samples_latest.jsonl"), read_jsonl(run_dir / "eval_initial.jsonl")
    assert len(table) == 6 and {row["iteration"] for row in table} == {4}
    assert [r["reply"] for r in table] == [r["completion"] for r in latest]
    assert [r["initial reply"] for r in table] == [r["completion"] for r in initial]
    assert [r["score"] for r in table] == pytest.approx([r["score"] for r in latest])


# --- trackers ---------------------------------------------------------------------------------------


def _steps_once(pairs: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in pairs]


def test_tensorboard_gets_every_row_once_through_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _kill_then_resume(tmp_path, monkeypatch, "log.report_to=[tensorboard]", "export.at_end=false")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0}).Reload()
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert _steps_once(loss) == [1, 2, 3, 4]  # iteration 3, logged before the kill, is not sent twice
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in metrics], rel=1e-5)
    assert [e.step for e in events.Scalars("eval/reward_mean")] == [0, 2, 4]
    assert [e.value for e in events.Scalars("eval/reward_mean")] == pytest.approx([r["reward_mean"] for r in evals], rel=1e-5)
    assert [e.step for e in events.Histograms("eval/reward")] == [0, 2, 4]
    assert "eval/samples/text_summary" in events.Tags()["tensors"]
    assert json.loads((run_dir / "trackers.json").read_text())["tensorboard"]["train"] == 4


def test_trackio_gets_every_row_once_through_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run_dir = _kill_then_resume(tmp_path, monkeypatch, "log.report_to=[trackio]", "log.project=tiny", "log.name=run-a", "export.at_end=false")
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("tiny", "run-a")
    train = [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row]
    assert _steps_once(train) == [1, 2, 3, 4]
    assert [v for _, v in train] == pytest.approx([r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")], rel=1e-5)
    assert [row["step"] for row in logs if "eval/reward_mean" in row] == [0, 2, 4]
    assert [row["step"] for row in logs if "eval/samples" in row] == [0, 2, 4]


def test_mlflow_gets_every_row_once_through_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    run_dir = _kill_then_resume(tmp_path, monkeypatch, "log.report_to=[mlflow]", "log.project=tiny", "export.at_end=false")
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["id"]
    client = MlflowClient(tracking_uri=store.as_uri())
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert _steps_once(history) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "eval/reward_mean")] == [0, 2, 4]
    assert client.get_run(run_id).data.params["algo"] == "rebel"
    assert sorted(a.path for a in client.list_artifacts(run_id, "samples")) == [f"samples/iter-00000{i}.json" for i in (0, 2, 4)]


def test_wandb_offline_gets_every_row_once_through_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _kill_then_resume(tmp_path, monkeypatch, "log.report_to=[wandb]", "log.project=tiny", "export.at_end=false")
    from wandb.proto import wandb_internal_pb2

    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    steps = []  # (step, keys) of each history row, as W&B commits one row a step
    for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for data in _wandb_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                steps.append((int(record.history.step.num), {item.key or "/".join(item.nested_key) for item in record.history.item}))
    assert [step for step, keys in steps if "train/loss" in keys] == [1, 2, 3, 4]
    assert [step for step, keys in steps if "eval/reward_mean" in keys] == [0, 2, 4]
    assert [step for step, keys in steps if any(k.startswith("eval/samples") for k in keys)] == [0, 2, 4]


def _wandb_records(raw: bytes) -> list[bytes]:
    """The records of an offline W&B run file: a 7-byte header, then LevelDB's log format (32 KiB blocks;
    each piece: CRC (4 bytes), length (2, little-endian), type (1: whole, 2: first, 3: middle, 4: last))."""
    assert raw[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if kind == 0 and length == 0:
            break
        piece, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            records.append(pending)
    return records


def test_trackers_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    prompts = setup_task(tmp_path, monkeypatch)
    base = ["train", *ARGS, f"task.prompts={prompts}", f"run_dir={tmp_path / 'run'}"]
    assert main([*base, "log.report_to=[neptune]"]) == 2
    assert "log.report_to: unknown tracker 'neptune'" in capsys.readouterr().err
    assert main([*base, "export.adapter_only=true"]) == 2
    assert "export.adapter_only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- the exported model ---------------------------------------------------------------------------


def _trained_policy(monkeypatch) -> dict:
    """Catches the policy as the run ends (the weights the export must hold)."""
    from rebelrl.algos import run as run_module

    caught = {}
    finish = run_module.Run.finish

    def keep(self):
        caught["policy"] = self.policy
        return finish(self)

    monkeypatch.setattr(run_module.Run, "finish", keep)
    return caught


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("lora", [False, True])
def test_exported_folder_loads_with_plain_transformers_and_equal_logits(tmp_path, monkeypatch, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    caught = _trained_policy(monkeypatch)
    run_dir = _train(tmp_path, monkeypatch, *(["model.lora_r=4", "optim.lr=3e-2"] if lora else []), "rollout.temperature=0.8")
    folder = run_dir / "model"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("say hello", return_tensors="pt").input_ids
    policy = caught["policy"].eval()
    assert torch.allclose(_logits(model, ids), _logits(policy, ids), atol=1e-5)
    if lora:  # the adapter changed the weights: the merged folder is not the base model
        base = AutoModelForCausalLM.from_pretrained(run_dir / "model")
        assert not any(n.startswith("base_model") or "lora" in n for n, _ in base.named_parameters())
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.do_sample and generation.temperature == 0.8 and generation.max_new_tokens == 8
    assert tokenizer.eos_token_id in ([generation.eos_token_id] if isinstance(generation.eos_token_id, int) else generation.eos_token_id)


def test_adapter_only_export_and_an_older_iteration(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    from rebelrl.models import load_causal_lm, peft_quietly

    caught = _trained_policy(monkeypatch)
    run_dir = _train(tmp_path, monkeypatch, "model.lora_r=4", "optim.lr=3e-2", "export.adapter_only=true", "checkpoint.keep_last=0")
    folder = run_dir / "model"
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    with peft_quietly():  # a user's own load of the adapter: PEFT's deprecation warning is not ours to show
        model = PeftModel.from_pretrained(load_causal_lm("tiny-random"), str(folder)).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(_logits(model, ids), _logits(caught["policy"].eval(), ids), atol=1e-5)
    # an earlier checkpoint, merged, into a folder of the user's choice
    assert main(["export", str(run_dir), "--iteration", "2", "--output", str(tmp_path / "at2")]) == 0
    assert json.loads((tmp_path / "at2" / "rebelrl_export.json").read_text())["checkpoint"] == "iter-000002"
    assert main(["export", str(run_dir), "--iteration", "3"]) == 2
    assert "no checkpoint of iteration 3; it has iter-000002, iter-000004" in capsys.readouterr().err


def test_export_never_overwrites_a_folder_of_the_users(tmp_path, monkeypatch, capsys):
    run_dir = _train(tmp_path, monkeypatch, "export.at_end=false")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run_dir), "--output", str(mine)]) == 2
    assert "not a rebelrl export" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    assert main(["export", str(run_dir)]) == 0 and main(["export", str(run_dir)]) == 0  # its own export is replaced


def test_model_card_says_how_the_model_was_made(tmp_path, monkeypatch):
    run_dir = _train(tmp_path, monkeypatch)
    card = (run_dir / "model" / "README.md").read_text()
    evals = read_jsonl(run_dir / "eval.jsonl")
    for needed in ("tiny-random", "algo=rebel", "REBEL: Reinforcement Learning via Regressing Relative Rewards", "tiny_rules:lowercase_fraction",
                   "temperature 0.7", "| reward_mean |", f"{evals[-1]['reward_mean']:.4f}", "transformers ", "torch ", "library_name: transformers",
                   "4 of 4 iterations"):
        assert needed in card, needed


def test_push_to_hub_uploads_the_exported_folder(tmp_path, monkeypatch):
    from rebelrl import export as export_module

    run_dir = _train(tmp_path, monkeypatch)
    calls = []

    class StandInHub:  # the Hub API's two calls that an upload makes, recorded
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, folder_path, repo_id, **kw):
            files = sorted(p.name for p in Path(folder_path).iterdir() if not any(p.match(g) for g in kw.get("ignore_patterns", [])))
            calls.append(("upload_folder", repo_id, files))
            return type("Commit", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", StandInHub)
    assert main(["export", str(run_dir), "--push-to-hub", "me/tiny-rebel", "--private"]) == 0
    assert calls[0] == ("create_repo", "me/tiny-rebel", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][0] == "upload_folder" and {"model.safetensors", "config.json", "generation_config.json", "README.md",
                                                 "tokenizer.json"} <= set(calls[1][2])
    assert export_module.MARKER not in calls[1][2]
