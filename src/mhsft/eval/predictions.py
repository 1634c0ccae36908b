"""predictions.jsonl: one JSON record per finished evaluation item, appended as soon as the item is done.

A record's key hashes the task's settings, the dataset's content hash and the item id: a rerun with the same
settings skips what is done; changed settings (another model, prompt, generation setting) never reuse old rows.
A kill mid-write leaves at most one torn last line, which is ignored (its item is simply done again).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class PredictionLog:
    """predictions.jsonl, append-only: `done` maps each finished item's key to its record."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: its item is simply done again
                if isinstance(rec, dict) and "key" in rec:
                    self.done[rec["key"]] = rec
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        if torn:  # a kill mid-write left half a line: start the next record on a line of its own
            self.f.write("\n")

    @staticmethod
    def key(task_hash: str, dataset_sha: str, item_id: str) -> str:
        return hashlib.sha256(f"{task_hash}\0{dataset_sha}\0{item_id}".encode()).hexdigest()[:24]

    def put(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        self.done[rec["key"]] = rec

    def close(self) -> None:
        self.f.close()
