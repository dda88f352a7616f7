import json

import torch

from rebelrl.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from rebelrl.train.metrics import JsonlLogger


def test_save_is_atomic_and_prunes(tmp_path, model, tokenizer):
    for it in (2, 4, 6):
        save_checkpoint(tmp_path, it, model, tokenizer, {"optimizer": {}, "note": it}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("iter-*")) == ["iter-000004", "iter-000006"]
    assert latest_checkpoint(tmp_path) == root / "iter-000006"
    state = load_trainer_state(root / "iter-000006")
    assert state["iteration"] == 6 and state["note"] == 6 and "torch" in state["rng"]
    assert (root / "iter-000006" / "model" / "model.safetensors").exists()


def test_a_save_killed_midway_is_ignored(tmp_path, model, tokenizer):
    save_checkpoint(tmp_path, 2, model, tokenizer, {})
    broken = tmp_path / "checkpoints" / ".tmp-iter-000004"
    (broken / "model").mkdir(parents=True)  # what a kill during the next save leaves behind
    assert latest_checkpoint(tmp_path).name == "iter-000002"
    (tmp_path / "checkpoints" / "latest").unlink()  # even without the pointer file
    assert latest_checkpoint(tmp_path).name == "iter-000002"


def test_checkpoint_loads_with_from_pretrained(tmp_path, model, tokenizer):
    from transformers import AutoModelForCausalLM

    path = save_checkpoint(tmp_path, 1, model, tokenizer, {})
    loaded = AutoModelForCausalLM.from_pretrained(path / "model")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_metrics_rewind_drops_rows_after_the_checkpoint(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    for it in range(1, 6):
        log.log({"iteration": it, "x": float(it)})
    with open(log.path, "a") as f:
        f.write('{"iteration": 6, "x"')  # cut by a kill
    log.rewind(3)
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
