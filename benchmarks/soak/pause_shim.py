"""`python pause_shim.py STAGE ARGS...`: `mhsft STAGE ARGS...` that stops inside one save, for the kill campaign.

A SIGKILL sent at a random moment lands inside a checkpoint save only now and then (a tiny model's save takes tens
of milliseconds), so the campaign also kills at chosen places: this wrapper makes the n-th arrival at one of them
write a marker file and sleep, and the campaign kills it as soon as the marker appears. Nothing else changes (no
value computed differently), so the run resumed afterwards must still equal the uninterrupted one.

SOAK_PAUSE_AT=POINT:N, SOAK_MARKER=PATH. Points:
  checkpoint-write    inside the checkpoint's temporary folder, after the weights, optimizer and scheduler, before
                      the RNG state, args.json and the completion marker (trainer_state.json)
  checkpoint-publish  the temporary folder complete, before it is flushed to disk and renamed into place
  export-write        the merged weights written into the export's temporary folder, before the side files
  export-publish      the export's temporary folder complete, before it is renamed into place
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = {
    "checkpoint-write": ("mhsft.train.checkpointing", "save_rng_state"),
    "checkpoint-publish": ("mhsft.train.checkpointing", "publish_dir"),
    "export-write": ("mhsft.export.merge", "write_side_files"),
    "export-publish": ("mhsft.export.merge", "publish_dir"),
}


def pausing(fn, point: str, nth: int, marker: Path):
    """`fn`, except that its nth call first writes `marker` and sleeps (the campaign kills it there)."""
    calls = 0

    def wrapper(*a, **k):
        nonlocal calls
        calls += 1
        if calls == nth:
            marker.write_text(point, encoding="utf-8")
            time.sleep(600)
        return fn(*a, **k)

    return wrapper


def install() -> None:
    import importlib

    point, _, nth = os.environ["SOAK_PAUSE_AT"].partition(":")
    module_name, name = TARGETS[point]
    module = importlib.import_module(module_name)
    setattr(
        module, name, pausing(getattr(module, name), point, int(nth or 1), Path(os.environ["SOAK_MARKER"]))
    )


if __name__ == "__main__":
    install()
    from mhsft.cli import main

    sys.exit(main(sys.argv[1:]))
