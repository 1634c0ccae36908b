"""Dataset specs, sampling, splits, rejects, and hub ids resolved through each client's offline cache."""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter
from pathlib import Path

import pytest

from mhsft.data.loader import iter_datasets, load_datasets, parse_spec, sample_records, split_val
from mhsft.data.schema import DataError, Dialogue
from mhsft.utils import UserError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach a hub fails loudly instead of hanging or downloading."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def rec(i: int, **extra) -> dict:
    return {
        "id": f"r{i}",
        "conversations": [{"from": "human", "value": f"问{i}"}, {"from": "gpt", "value": f"答{i}"}],
        **extra,
    }


def jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def warnings():
    """Warnings logged by mhsft (its logger does not propagate, so caplog misses them)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    logger = logging.getLogger("mhsft")
    handler = Keep()
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


# ---------------------------------------------------------------------------------------------------------
# Specs


def test_parse_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "a.jsonl", [rec(0)])
    jsonl(tmp_path / "odd#3.jsonl", [rec(0)])
    assert parse_spec("a.jsonl").local and parse_spec("a.jsonl").sample is None
    assert parse_spec("a.jsonl#500").sample == 500 and parse_spec("a.jsonl#500").name == "a.jsonl"
    assert parse_spec("odd#3.jsonl").name == "odd#3.jsonl"  # an existing path is taken as is
    s = parse_spec("AI-ModelScope/psy_data:sub1/sub2#100")
    assert (s.local, s.name, s.subsets, s.sample) == (False, "AI-ModelScope/psy_data", ("sub1", "sub2"), 100)
    assert parse_spec("org/name").subsets == ()
    for bad in ("missing.jsonl", "./nope", "just-a-word", "a/b/c", "a.jsonl#0", " "):
        with pytest.raises(UserError):
            parse_spec(bad)


def test_sample_records_repeats_whole_copies_then_a_random_rest():
    import random

    items = list(range(10))
    assert sample_records(items, 4, random.Random(1)) == sample_records(items, 4, random.Random(1))
    assert len(set(sample_records(items, 4, random.Random(1)))) == 4
    counts = Counter(sample_records(items, 25, random.Random(0)))
    assert sum(counts.values()) == 25 and sorted(Counter(counts.values()).items()) == [(2, 5), (3, 5)]
    assert sample_records([], 5, random.Random(0)) == []


def test_split_val():
    import random

    train, val = split_val(list(range(100)), 0.1, random.Random(0))
    assert len(val) == 10 and len(train) == 90 and sorted(train + val) == list(range(100))
    assert train == sorted(train)  # order kept
    assert split_val([1, 2], 0.01, random.Random(0))[1] != []  # at least one held out
    assert split_val([1], 0.5, random.Random(0)) == ([1], [])  # but never the only record


# ---------------------------------------------------------------------------------------------------------
# load_datasets


def test_concatenate_sample_and_count(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(5)])
    b = jsonl(tmp_path / "b.jsonl", [rec(i + 100) for i in range(3)])
    r = load_datasets([str(a), f"{b}#7"], seed=1)
    assert len(r.train) == 12 and r.val == [] and r.num_rejected == 0
    assert [s.num_dialogues for s in r.sources] == [5, 3] and [s.num_used for s in r.sources] == [5, 7]
    assert [d.source.id for d in r.train[:5]] == [f"r{i}" for i in range(5)]
    again = load_datasets([str(a), f"{b}#7"], seed=1)
    other = load_datasets([str(a), f"{b}#2"], seed=2)
    assert [d.source.id for d in again.train] == [d.source.id for d in r.train]
    assert len(other.train) == 7


def test_seed_changes_the_sample(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(50)])
    ids = {seed: [d.source.id for d in load_datasets(f"{a}#10", seed=seed).train] for seed in (1, 2)}
    assert ids[1] != ids[2]


def test_split_ratio_and_val_dataset(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(40)])
    b = jsonl(tmp_path / "b.jsonl", [rec(i + 100) for i in range(10)])
    r = load_datasets([str(a), str(b)], split_ratio=0.1, seed=3)
    assert (len(r.train), len(r.val)) == (45, 5)
    assert sum(int(d.source.id[1:]) >= 100 for d in r.val) == 1  # each dataset split on its own
    assert not {d.source.id for d in r.train} & {d.source.id for d in r.val}
    assert [d.source.id for d in load_datasets([str(a), str(b)], split_ratio=0.1, seed=3).val] == [
        d.source.id for d in r.val
    ]
    v = jsonl(tmp_path / "v.jsonl", [rec(i + 500) for i in range(4)])
    r = load_datasets(str(a), val_specs=[str(v)], split_ratio=0.5)  # --val_dataset wins over the ratio
    assert (len(r.train), len(r.val)) == (40, 4) and r.sources[1].split == "val"


def _mixed_file(tmp_path: Path, n_bad: int) -> Path:
    lines = [json.dumps(rec(0))] + ["{broken"] * n_bad + [json.dumps({"id": "x", "conversations": []})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_rejects_are_written_and_printing_is_capped(tmp_path, warnings):
    f = _mixed_file(tmp_path, 30)
    rejects = tmp_path / "out" / "rejects.jsonl"
    r = load_datasets(str(f), rejects_path=rejects)
    assert len(r.train) == 1 and r.num_rejected == 31 and r.rejects_path == rejects
    rows = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 31 and rows[0]["line"] == 2 and rows[0]["record"] == "{broken"
    assert rows[-1]["id"] == "x" and "no turns" in rows[-1]["reason"]
    assert len(warnings) == 21 and warnings[0].startswith(f"skipped {f}:2: record #1: invalid JSON")
    assert "11 more" in warnings[-1] and str(rejects) in warnings[-1]
    load_datasets(str(jsonl(tmp_path / "ok.jsonl", [rec(1)])), rejects_path=rejects)
    assert rejects.read_text() == ""  # a fresh run does not keep the old run's rejects


def test_training_loader_counts_notices_and_escapes_surrogates(tmp_path, warnings):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "case_1.txt").write_text("来访者：你好\r\n\r\n心理咨询师：请说。\r\n\r\n来访者：\r\n", "utf-8")
    bad = tmp_path / "s.jsonl"
    bad.write_text(json.dumps(rec(2)) + '\n{"id": "sur", "conversations": [{"from": "human", "value": "\\udc80"}, '
                   '{"from": "gpt", "value": "a"}]}\n', "utf-8")  # fmt: skip
    rejects = tmp_path / "rejects.jsonl"
    r = load_datasets([str(folder), str(bad)], rejects_path=rejects)
    assert len(r.train) == 2 and r.num_rejected == 1
    assert r.sources[0].notices == {
        "an empty last turn (a bare speaker prefix at the end of the transcript) was dropped": 1
    }
    assert any("notice: 1 dialogue(s): an empty last turn" in w for w in warnings)
    assert json.loads(rejects.read_text("utf-8"))["record"]["conversations"][0]["value"] == "\udc80"


def test_strict_stops_at_the_first_bad_record(tmp_path):
    f = _mixed_file(tmp_path, 2)
    with pytest.raises(UserError, match=rf"^{f}:2: record #1: invalid JSON"):
        load_datasets(str(f), strict=True)


def test_user_errors(tmp_path):
    good = str(jsonl(tmp_path / "a.jsonl", [rec(0)]))
    bad = jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(UserError, match="no usable dialogues.*unrecognized record"):
        load_datasets(str(bad))
    with pytest.raises(UserError, match="no such file"):
        load_datasets(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="unknown dataset format"):
        load_datasets(good, fmt="csv")
    with pytest.raises(UserError, match="split_dataset_ratio"):
        load_datasets(good, split_ratio=1.0)
    with pytest.raises(UserError, match="no dataset"):
        load_datasets([])


def test_iter_datasets_streams_good_and_bad(tmp_path):
    f = _mixed_file(tmp_path, 2)
    items = list(iter_datasets([str(f), f"{f}#3"], seed=5))
    assert [isinstance(x, Dialogue) for x in items] == [True, False, False, False] + [False] * 3 + [True] * 3
    assert all(isinstance(x, DataError) for x in items[1:4])
    assert [d.source.id for d in items[-3:]] == ["r0"] * 3  # #N samples as load_datasets does


# ---------------------------------------------------------------------------------------------------------
# Hub ids, resolved from the clients' own caches in offline mode


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache with one dataset snapshot, and HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    repo = cache / "datasets--psy--counsel"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    jsonl(snap / "data" / "train.jsonl", [rec(i) for i in range(3)])
    jsonl(snap / "data" / "test.jsonl", [rec(i + 10) for i in range(2)])
    jsonl(snap / "extra" / "more.jsonl", [rec(i + 20) for i in range(4)])
    (snap / "dataset_infos.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads HF_HUB_CACHE once at import; snapshot_download looks it up on this constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snap


def test_hf_dataset_from_offline_cache(hf_cache):
    r = load_datasets("psy/counsel#2", use_hf=True)
    assert len(r.train) == 2 and all(Path(d.source.file).name == "train.jsonl" for d in r.train)
    r = load_datasets("psy/counsel:extra", use_hf=True)  # a subset as a folder of the repo
    assert [d.source.id for d in r.train] == ["r20", "r21", "r22", "r23"]
    with pytest.raises(UserError, match="no subset 'nope'; available: data, extra"):
        load_datasets("psy/counsel:nope", use_hf=True)


def test_hf_subsets_from_dataset_card(hf_cache):
    (hf_cache / "README.md").write_text(
        "---\nconfigs:\n- config_name: all\n  data_files:\n  - split: train\n    path: extra/*.jsonl\n"
        "  - split: test\n    path: data/test.jsonl\n  default: true\n- config_name: small\n"
        "  data_files: data/train.jsonl\n---\n# Card\n"
    )
    assert len(load_datasets("psy/counsel", use_hf=True).train) == 4  # the default config's train split
    assert len(load_datasets("psy/counsel:small", use_hf=True).train) == 3


def test_hf_missing_from_offline_cache_is_one_line(hf_cache):
    with pytest.raises(UserError) as e:
        load_datasets("psy/absent", use_hf=True)
    assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)


def test_modelscope_dataset_from_offline_cache(tmp_path, monkeypatch):
    # modelscope-hub's cache layout: $MODELSCOPE_CACHE/datasets/ORG--NAME/snapshots/<revision>/.
    # The client has no offline variable, so MODELSCOPE_OFFLINE=1 (ours) makes us pass local_files_only.
    snap = tmp_path / "ms" / "datasets" / "psy--counsel" / "snapshots" / "master"
    jsonl(snap / "train.jsonl", [rec(i) for i in range(3)])
    (snap / "configuration.json").write_text('{"framework": "pytorch"}')
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    r = load_datasets(["psy/counsel"])
    assert len(r.train) == 3 and r.num_rejected == 0
    with pytest.raises(UserError, match="MODELSCOPE_OFFLINE") as e:
        load_datasets(["psy/absent"])
    assert "\n" not in str(e.value)


def test_hub_dataset_without_readable_files(hf_cache):
    import shutil

    for child in hf_cache.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    (hf_cache / "train-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"no \.json/\.jsonl/\.txt data files.*\.parquet"):
        load_datasets("psy/counsel", use_hf=True)


# ---------------------------------------------------------------------------------------------------------
# Real data (../shared/data)


def test_real_acceptance_counts(shared_data, tmp_path):
    rejects = tmp_path / "rejects.jsonl"
    cases = {
        "train/emollm_data.json": 1596,
        "train/cpsycound_sample": 400,
        "eval/cpsycoune/Career/1.json": 1,
        "eval/cpsycoune": 18,
    }
    for spec, n in cases.items():
        r = load_datasets(str(shared_data / spec), rejects_path=rejects)
        assert (len(r.train), r.num_rejected) == (n, 0), spec
    r = load_datasets(
        [str(shared_data / "train/emollm_data.json"), str(shared_data / "train/cpsycound_sample#100")],
        split_ratio=0.05,
    )
    assert (len(r.train), len(r.val)) == (1516 + 95, 80 + 5)


def test_psyqa_sample_as_training_dialogues(tmp_path):
    """What `mhsft sft --dataset psyqa.json [--dataset_format psyqa]` trains on: one dialogue per answer."""
    sample = Path(__file__).resolve().parents[2] / "examples" / "data" / "psyqa_sample.json"
    auto = load_datasets(str(sample), split_ratio=0.2)
    forced = load_datasets(str(sample), fmt="psyqa", split_ratio=0.2)
    assert len(auto.train) + len(auto.val) == 10 and auto.num_rejected == 0 and len(auto.val) == 2
    assert [d.source.id for d in auto.train] == [d.source.id for d in forced.train]
    with pytest.raises(UserError, match="no usable dialogues"):
        load_datasets(str(jsonl(tmp_path / "s.jsonl", [rec(1)])), fmt="psyqa")
