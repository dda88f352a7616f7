"""Append-only JSONL metrics that a resumed run can rewind to its checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rebelrl.train.checkpoint import write_atomic


class JsonlLogger:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()

    def rewind(self, iteration: int) -> None:
        """Drop rows logged after ``iteration`` (a run killed after its last checkpoint logged them)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if row.get("iteration", 0) <= iteration:
                kept.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in kept))
