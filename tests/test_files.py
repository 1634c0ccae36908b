"""mhsft/files.py: a file or folder appears complete or not at all."""

from __future__ import annotations

import json

import pytest

from mhsft.files import atomic_open, new_temp_dir, publish_dir, read_json, read_yaml, write_json, write_text
from mhsft.utils import UserError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "args.json"
    write_json(p, {"模型": "Qwen", "n": 1})
    assert "模型" in p.read_text(encoding="utf-8")  # Chinese stays readable
    assert read_json(p) == {"模型": "Qwen", "n": 1}
    with pytest.raises(KeyboardInterrupt), atomic_open(p) as f:
        f.write('{"half": ')
        raise KeyboardInterrupt  # a kill in the middle of writing
    assert read_json(p) == {"模型": "Qwen", "n": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["args.json"]
    write_text(p, "new\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert p.read_text() == "new\n"
    assert (
        p.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    )  # the usual permissions, not a temp file's


def test_read_json_names_the_file(tmp_path):
    p = tmp_path / "results.json"
    p.write_text("{torn")
    with pytest.raises(UserError, match="results.json: cannot read it as JSON"):
        read_json(p)


def test_publish_dir_replaces_a_folder_whole(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    tmp = new_temp_dir(out)
    assert tmp.parent == tmp_path and tmp.name.startswith(".merged.tmp-")
    (tmp / "model.safetensors").write_text("new")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x.json").write_text(json.dumps([1]))
    publish_dir(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "sub"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp or old folder left behind
    fresh = new_temp_dir(tmp_path / "new")
    publish_dir(fresh, tmp_path / "new")
    assert (tmp_path / "new").is_dir() and not fresh.exists()


def test_read_yaml_names_the_file_and_line(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("a: 1\nb: [1, 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x\.yaml:3: not valid YAML"):
        read_yaml(p)
    with pytest.raises(UserError, match="no such file"):
        read_yaml(tmp_path / "none.yaml")
    p.write_text("a: 1\n", encoding="utf-8")
    assert read_yaml(p) == {"a": 1}
