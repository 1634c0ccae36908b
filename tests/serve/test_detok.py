"""mhsft/serve/detok.py: streamed text never splits a character and honours stop strings."""

from __future__ import annotations

from mhsft.model import load_tokenizer
from mhsft.serve.detok import TextStream


def test_text_stream_never_splits_a_character(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    text = "你好龘靐，世界"  # rare characters: not in the tiny BPE, so each is split into byte tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the test needs a character split across tokens"
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_window_stays_short_when_tokens_make_no_text(tiny_model_dir):
    from mhsft.model import load_tokenizer
    from mhsft.serve.detok import MAX_PENDING

    tok = load_tokenizer(str(tiny_model_dir))
    silent = tok.convert_tokens_to_ids("<|im_end|>")  # a special token: decodes to nothing
    stream = TextStream(tok)
    out = "".join(stream.push(i) for i in tok("你好", add_special_tokens=False)["input_ids"])
    for _ in range(200):
        out += stream.push(silent)
        assert len(stream.ids) - stream.prefix <= 2 * MAX_PENDING + 2
    out += "".join(stream.push(i) for i in tok("，世界", add_special_tokens=False)["input_ids"])
    assert out + stream.flush() == "你好，世界"


def test_text_stream_stop_strings(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    ids = tok("我很好。来访者：还有", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=["来访者："])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        assert "来" not in shown  # the start of the stop string is never shown
        if stream.stopped:
            break
    shown += stream.flush()
    assert stream.stopped and shown == "我很好。" and stream.text == "我很好。"
    # text that only looks like the start of a stop string is released at the end
    stream = TextStream(tok, stop=["来访者：你"])
    out = "".join(stream.push(i) for i in tok("好的来访者", add_special_tokens=False)["input_ids"])
    assert out + stream.flush() == "好的来访者" and not stream.stopped


def test_token_bytes_are_the_tokens_own(tiny_model_dir):
    """A token holding part of a character gives its raw bytes (joined, they are the character), not the bytes
    of the U+FFFD that decoding it alone gives; special tokens are their text; ids past the vocabulary, empty."""
    from mhsft.serve.detok import TokenBytes

    tok = load_tokenizer(str(tiny_model_dir))
    tb = TokenBytes(tok)
    text = "你好龘靐，世界 😊"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert b"".join(tb(i) for i in ids) == text.encode("utf-8")
    assert all(tb(i) != "\ufffd".encode() for i in ids)
    assert tb(tok.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"
    assert tb(len(tok) + 5) == b""


def test_token_bytes_of_sentencepiece_byte_fallback():
    from mhsft.serve.detok import TokenBytes

    class SentencePieceLike:  # Llama-style: byte-fallback pieces and "▁" words, no byte-level decoder
        pieces = {0: "<0xE4>", 1: "▁你好"}

        def convert_ids_to_tokens(self, i):
            return self.pieces[i]

        def decode(self, ids, **kw):
            return " 你好" if ids == [1] else "\ufffd"

    tb = TokenBytes(SentencePieceLike())
    assert tb(0) == b"\xe4" and tb(1) == " 你好".encode()
