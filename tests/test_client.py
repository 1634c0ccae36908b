"""mhsft/client.py: loopback addresses never go through a proxy."""

from __future__ import annotations

from mhsft.client import ensure_loopback_no_proxy, is_loopback


def test_loopback_helpers(monkeypatch):
    env = {"NO_PROXY": "example.com"}
    ensure_loopback_no_proxy(env)
    assert env["NO_PROXY"].split(",") == ["example.com", "127.0.0.1", "localhost", "::1"]
    assert env["no_proxy"] == "127.0.0.1,localhost,::1"
    assert is_loopback("http://127.0.0.1:8000/v1") and is_loopback("http://[::1]:8/v1")
    assert is_loopback("http://localhost/v1") and not is_loopback("https://api.openai.com/v1")
