"""What several test modules share: the repository's root, running the CLI in-process, reading a SwanLab run."""

from __future__ import annotations

from pathlib import Path

from mhsft import cli

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `mhsft ARGV` in-process: (exit code, stdout, stderr). A traceback is a failure."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        rc = e.code if isinstance(e.code, int) else 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def swanlab_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Metrics as SwanLab stored them: the run-*.swanlab file is a LevelDB-style log of protobuf Records;
    SwanLab's own reader (the one `swanlab sync` uses) decodes it."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (path,) = run_dir.glob("swanlog/run-*/run-*.swanlab")
    reader = DataStoreReader()
    reader.open(path)
    out: dict[str, dict[int, float]] = {}
    try:
        for data in reader:
            rec = Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "scalar":
                out.setdefault(rec.scalar.key, {})[rec.scalar.step] = rec.scalar.value.number
    finally:
        reader.close()
    return out
