"""DataError.to_reject_line: one line of strict UTF-8 JSON for any record the readers can produce."""

from __future__ import annotations

import json

import pytest

from mhsft.data.schema import DataError, Source


def _strict(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    assert "\n" not in line
    return json.loads(line.encode("utf-8").decode("utf-8"), parse_constant=refuse)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"value": "你好"}, {"value": "你好"}),
        ({"value": "\ud83d 难过"}, {"value": "\ud83d 难过"}),  # escaped as \\ud83d: still the same record
        ({"value": float("nan")}, '{"value": NaN}'),  # the record's JSON text, as a string
        (
            [float("inf"), "\udc80"],
            '[Infinity, "\udc80"]',
        ),  # the surrogate escaped in the line, kept in the text
    ],
)
def test_reject_line_is_strict_utf8_json(raw, expected):
    line = DataError(Source("f.jsonl", 3, 4, "r1"), "bad", raw).to_reject_line()
    row = _strict(line)
    assert row["record"] == expected and (row["file"], row["line"], row["id"], row["reason"]) == (
        "f.jsonl",
        4,
        "r1",
        "bad",
    )


def test_reject_line_of_a_record_too_deep_to_serialize():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert _strict(DataError(Source("f.json"), "too deep", deep).to_reject_line())["record"] is None
