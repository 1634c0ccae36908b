"""A hostile-request campaign against `mhsft deploy`: what an attacker or a careless client sends, at volume, while
a monitor checks that valid neighbours are served exactly as when alone.

Starts `mhsft deploy --model builtin:tiny` on a free loopback port (127.0.0.1 only) and sends, from --clients
concurrent clients, a seeded mix of requests until --requests have been sent:
  - valid ones (chats, streams, completions with token ids and echo + logprobs, tokenize / detokenize, values at
    the edge of their ranges: temperature 1e-300, top_k 10**20, seed 2**63-1, logit bias +-100), which must all
    get 200;
  - malformed ones (seeds past 64 bits, NaN and Infinity, wrong types such as "stream":"yes" and "n":"2", lone
    UTF-16 surrogates in every endpoint, deep JSON, too many or too long stop strings, token ids outside the
    vocabulary, unknown models, routes and roles, invalid JSON and UTF-8, prompts past the context), which must
    all get a 4xx in OpenAI's error shape;
  - clients that leave: mid-stream and mid-body.
Beside them: slow clients sending their headers (or body) a byte at a time, which must be cut within the
configured timeout; bodies near the 8 MB limit (a padded chat, a 7.5 MB /tokenize) and past it (413); a
monitor sending concurrent temperature-0 chats whose replies must equal the same chats sent alone before the
load; and a prober timing GET /v1/models (never slower than 1 s).

Recorded: the status-code table per kind, responses 5xx, valid requests failed, malformed requests not
answered with a 4xx in OpenAI's shape, tracebacks and internal errors in the server log, the server's RSS
(cold, after a warm-up round that sends every kind once, peak, and after the load settles: growth <= 10% over
the warm baseline), the worst /v1/models latency, the slow clients' cut times, /health's in-flight count at
the end and a normal request answered correctly after the load. Prints a table, writes JSON, exits 1 when a
goal is missed.

    python benchmarks/soak/hostile_requests.py            # full: >= 10,000 requests, 8 clients (~5-10 min, 2 cores)
    python benchmarks/soak/hostile_requests.py --quick    # CI: a few hundred requests, ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TIMEOUT_HEADERS = 2.0  # the server's --timeout_headers / --timeout_body for the campaign
CUT_SLACK_S = 1.0  # a slow client counts as cut in time within the timeout plus this
MAX_BODY_MB = 8.0
VOCAB = 2112  # builtin:tiny's embedding rows (its tokenizer has 2051 tokens); checked against /tokenize below
TEXTS = ["你好，我最近压力很大", "我晚上总是睡不着，怎么办？", "和家人吵架了，心里很难受", "工作上的事情让我很焦虑",
         "谢谢你听我说这些", "I feel anxious about my exams", "最近总是提不起精神😔"]  # fmt: skip
OUT_OF_RANGE = [{"temperature": -1}, {"temperature": 2.01}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                {"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
                {"repetition_penalty": 1e9}, {"top_logprobs": 21, "logprobs": True}, {"n": 0}, {"n": 17},
                {"max_tokens": -1}, {"logit_bias": {"5": 100.5}}, {"seed": -(2**63) - 1}]  # fmt: skip
MONITOR = ["来访者：我最近压力很大，晚上睡不着。", "我觉得没有人理解我", "考试快到了，我很紧张"]


@dataclass
class Reply:
    status: int  # 0: no response (connection closed or timed out)
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


# ------------------------------------------------------------------------------------------------ HTTP


async def send(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60.0,
               headers: dict | None = None) -> Reply:  # fmt: skip
    """One request on its own connection (Connection: close), read to the end."""
    t0 = time.monotonic()
    try:
        return await asyncio.wait_for(_exchange(port, method, path, body, headers or {}, t0), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        return Reply(0, seconds=time.monotonic() - t0, error=type(e).__name__)


async def _exchange(port, method, path, body, headers, t0) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode() + (body or b""))
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        hdrs = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        data = await reader.read()
        if hdrs.get("transfer-encoding") == "chunked":
            data = dechunk(data)
        return Reply(status, data, hdrs, time.monotonic() - t0)
    finally:
        writer.close()


def dechunk(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        j = data.index(b"\r\n", i)
        n = int(data[i:j].split(b";")[0], 16)
        if n == 0:
            break
        out += data[j + 2 : j + 2 + n]
        i = j + 2 + n + 2
    return bytes(out)


def is_openai_error(r: Reply) -> bool:
    try:
        err = json.loads(r.body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


# ------------------------------------------------------------------------------------------------ the mix


def _chat(rng, **kw) -> dict:
    msgs = [{"role": "user", "content": rng.choice(TEXTS)}]
    return {"model": "tiny", "messages": msgs, "max_tokens": rng.randint(1, 12), **kw}


def _j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _raw_surrogate(obj: dict, placeholder: str) -> bytes:
    """`obj` as JSON with the string `placeholder` replaced by one holding a lone surrogate escape (valid JSON)."""
    return _j(obj).replace(f'"{placeholder}"'.encode(), b'"\\ud83d x"')


def _valid(rng) -> tuple[str, str, bytes]:
    """(kind, path, body) of a request that must get 200."""
    kinds = {
        "chat": lambda: ("/v1/chat/completions", _chat(rng, temperature=rng.choice([0, 0.7]), seed=rng.randint(0, 99))),
        "chat_stream": lambda: ("/v1/chat/completions", _chat(rng, stream=True, logprobs=True, top_logprobs=2)),
        "chat_edge_values": lambda: ("/v1/chat/completions", _chat(
            rng, temperature=rng.choice([1e-300, 1e-5, 2]), top_k=rng.choice([10**20, -1, 1]),
            top_p=rng.choice([1e-300, 1]), seed=rng.choice([2**63 - 1, -(2**63), 0]), n=rng.randint(1, 3),
            repetition_penalty=rng.choice([0.01, 100]), presence_penalty=-2, frequency_penalty=2,
            logit_bias={str(rng.randrange(VOCAB)): rng.choice([-100, 100])})),
        "completion_ids_echo": lambda: ("/v1/completions", {
            "model": "tiny", "prompt": [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]], "echo": True,
            "logprobs": 2, "max_tokens": rng.randint(0, 3), "temperature": 0}),
        "completion_text_stream": lambda: ("/v1/completions", {
            "model": "tiny", "prompt": rng.choice(TEXTS), "stream": True, "max_tokens": 5, "stop": ["。", "？"]}),
        "tokenize": lambda: ("/tokenize", {"prompt": rng.choice(TEXTS)}),
        "detokenize": lambda: ("/detokenize", {"tokens": [rng.randrange(VOCAB) for _ in range(20)]}),
    }  # fmt: skip
    kind = rng.choice(list(kinds))
    path, body = kinds[kind]()
    return kind, path, _j(body)


def _malformed(rng) -> tuple[str, str, bytes]:
    """(kind, path, body) of a request that must get a 4xx in OpenAI's shape."""
    c = _chat(rng)
    s = "@SURROGATE@"
    bodies = {
        "seed_past_int64": ("/v1/chat/completions", _j({**c, "temperature": 1, "seed": rng.choice([10**30, 2**64])})),
        "nan_value": ("/v1/chat/completions", _j(c)[:-1] + b', "temperature": ' + rng.choice([b"NaN", b"Infinity"]) + b"}"),
        "out_of_range": ("/v1/chat/completions", _j({**c, **rng.choice(OUT_OF_RANGE)})),
        "wrong_type": ("/v1/chat/completions", _j({**c, **rng.choice([{"stream": "yes"}, {"n": "2"},
            {"max_tokens": "many"}, {"temperature": True}, {"messages": "hi"}, {"n": 2.0}, {"seed": "1"}])})),
        "surrogate_chat": ("/v1/chat/completions", _raw_surrogate({**c, "messages": [{"role": "user", "content": s}]}, s)),
        "surrogate_completion": ("/v1/completions", _raw_surrogate({"model": "tiny", "prompt": rng.choice([s, ["ok", s]])}, s)),
        "surrogate_tokenize": ("/tokenize", _raw_surrogate(rng.choice([{"prompt": s}, {"messages": [{"role": "user", "content": s}]}]), s)),
        "surrogate_detokenize": ("/detokenize", _raw_surrogate({"tokens": [1, 2], "model": s}, s)),
        "surrogate_stop": ("/v1/chat/completions", _raw_surrogate({**c, "stop": [s]}, s)),
        "deep_json": ("/v1/chat/completions", b'{"model":"tiny","x":' + b"[" * (d := rng.choice([100, 5000])) + b"]" * d + b"}"),
        "many_stops": ("/v1/chat/completions", _j({**c, "stop": rng.choice([["x"] * 17, "x" * 600])})),
        "out_of_vocab": rng.choice([("/v1/completions", _j({"model": "tiny", "prompt": [[1, VOCAB + rng.randrange(10**9)]]})),
                                    ("/detokenize", _j({"tokens": [-1, 5]})),
                                    ("/v1/chat/completions", _j({**c, "logit_bias": {str(10**7): 1}}))]),
        "unknown_model": ("/v1/chat/completions", _j({**c, "model": "gpt-5"})),
        "bad_json": ("/v1/chat/completions", rng.choice([b'{"model": "tiny", "messages": [', b'{"x": "\xff\xfe"}', b"[1, 2]", b""])),
        "bad_message": ("/v1/chat/completions", _j({**c, "messages": rng.choice([[], [{"role": "wizard", "content": "x"}]])})),
        "past_context": ("/v1/chat/completions", _j({**c, "max_tokens": rng.choice([10**12, 600])})),
        "empty_prompt": ("/v1/completions", _j({"model": "tiny", "prompt": rng.choice(["", [], [[]]])})),
    }  # fmt: skip
    kind = rng.choice(list(bodies))
    path, body = bodies[kind]
    return kind, path, body


async def leave_mid_stream(port: int, rng) -> Reply:
    """A streamed chat whose client reads a few chunks and hangs up."""
    body = _j(_chat(rng, max_tokens=200, ignore_eos=True, stream=True))
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        await writer.drain()
        status = int((await asyncio.wait_for(reader.readline(), 30)).split()[1])
        await asyncio.wait_for(reader.read(rng.randint(50, 2000)), 30)
        return Reply(status, seconds=time.monotonic() - t0)
    except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
        return Reply(0, seconds=time.monotonic() - t0, error=type(e).__name__)
    finally:
        writer.close()


async def leave_mid_body(port: int) -> Reply:
    """Headers announcing 1,000 bytes, ten sent, then gone."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"model": '
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        return Reply(0)  # nothing to read: what counts is the server log (no error) and its in-flight count
    except OSError as e:
        return Reply(0, error=type(e).__name__)


# ------------------------------------------------------------------------------------------------ the campaign


@dataclass
class Tally:
    """What the campaign saw."""

    table: dict = field(default_factory=lambda: defaultdict(Counter))  # kind -> status -> count
    sent: int = 0
    five_xx: list = field(default_factory=list)
    valid_failed: list = field(default_factory=list)
    malformed_not_4xx: list = field(default_factory=list)
    monitor: Counter = field(default_factory=Counter)
    models_latency: list = field(default_factory=list)
    slow_cut_s: list = field(default_factory=list)
    slow_not_cut: int = 0
    rss: list = field(default_factory=list)

    def record(self, kind: str, want: str, r: Reply) -> None:
        self.sent += 1
        self.table[kind][r.status or (r.error or "left")] += 1
        if r.status >= 500:
            self.five_xx.append(f"{kind}: {r.status} {r.body[:200]!r}")
        if want == "200" and (r.status != 200 or (b"data: " in r.body[:6] and b"data: [DONE]" not in r.body)):
            self.valid_failed.append(f"{kind}: {r.status or r.error} {r.body[:200]!r}")
        if want == "4xx" and not (400 <= r.status < 500 and is_openai_error(r)):
            self.malformed_not_4xx.append(f"{kind}: {r.status or r.error} {r.body[:200]!r}")


async def client(port: int, seed: int, tally: Tally, target: int) -> None:
    """One client sending the seeded mix until the campaign has sent `target` requests."""
    rng = random.Random(seed)
    while tally.sent < target:
        roll = rng.random()
        if roll < 0.45:
            kind, path, body = _valid(rng)
            tally.record(kind, "200", await send(port, "POST", path, body))
        elif roll < 0.93:
            kind, path, body = _malformed(rng)
            tally.record(kind, "4xx", await send(port, "POST", path, body))
        elif roll < 0.95:
            tally.record("unknown_route", "4xx", await send(port, rng.choice(["GET", "POST"]), "/v1/nothing"))
        elif roll < 0.975:
            tally.record("leave_mid_stream", "left", await leave_mid_stream(port, rng))
        else:
            tally.record("leave_mid_body", "left", await leave_mid_body(port))


async def chat_text(port: int, text: str) -> str | None:
    body = _j({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 16,
               "temperature": 0, "ignore_eos": True})  # fmt: skip
    r = await send(port, "POST", "/v1/chat/completions", body)
    return json.loads(r.body)["choices"][0]["message"]["content"] if r.status == 200 else None


async def monitor(port: int, reference: list[str], tally: Tally, stop: asyncio.Event) -> None:
    """Concurrent temperature-0 chats, each compared with the same chat sent alone before the load."""
    while not stop.is_set():
        replies = await asyncio.gather(*(chat_text(port, t) for t in MONITOR))
        for got, want in zip(replies, reference):
            tally.monitor["sent"] += 1
            tally.monitor["failed" if got is None else "matched" if got == want else "differed"] += 1


async def prober(port: int, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        r = await send(port, "GET", "/v1/models", timeout=30)
        tally.models_latency.append(r.seconds if r.status == 200 else float("inf"))
        await asyncio.sleep(0.1)


async def slow_clients(port: int, tally: Tally, stop: asyncio.Event, every: float) -> None:
    """One connection after another sending its headers (or, past complete headers, its body) a byte per
    `every` seconds; each must be cut within the server's timeout."""
    n = 0
    while not stop.is_set():
        n += 1
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        if n % 2 == 0:
            head = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b" " * 500
            )
        took, cut = await _trickle(port, head, every, limit=TIMEOUT_HEADERS + 10)
        tally.sent += 1
        tally.table["slow_client"]["cut" if cut else "not cut"] += 1
        if cut:
            tally.slow_cut_s.append(took)
        else:
            tally.slow_not_cut += 1


async def _trickle(port: int, data: bytes, every: float, limit: float) -> tuple[float, bool]:
    """Send `data` (its header block at once when it holds a whole one, then the rest) a byte per `every` s;
    (seconds until the server answered or closed, whether it did within `limit`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answered = asyncio.create_task(reader.read())  # done when the server sends its 408 and closes
    t0 = time.monotonic()
    preamble = data.index(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else 0
    try:
        writer.write(data[:preamble])
        for b in data[preamble:]:
            if answered.done() or time.monotonic() - t0 > limit:
                break
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(every)
        await asyncio.wait_for(asyncio.shield(answered), max(0.1, limit - (time.monotonic() - t0)))
        return time.monotonic() - t0, True
    except (OSError, asyncio.TimeoutError):  # a write to a closed connection: cut as well
        took = time.monotonic() - t0
        return took, took < limit
    finally:
        answered.cancel()
        writer.close()


def big_bodies(quick: bool) -> list[tuple[str, str, bytes, str]]:
    """(kind, path, body, want): bodies near the size limit and past it."""
    limit = int(MAX_BODY_MB * (1 << 20))
    pad = "x" * (limit - (1 << 20) // 2)  # a valid chat with 7.5 MB of padding in an unknown field
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
    text = "来访者：我最近压力很大，晚上睡不着，白天也没有精神。咨询师：听起来你真的很辛苦。"
    size = (1 << 20) if quick else limit - (1 << 20) // 2
    prompt = (text * (size // len(text.encode()) + 1))[: size // 3]
    return [
        ("padded_chat_7.5MB", "/v1/chat/completions", _j({**chat, "pad": pad}), "200"),
        (f"tokenize_{size / (1 << 20):.1f}MB", "/tokenize", _j({"prompt": prompt}), "200"),
        ("body_over_limit_9MB", "/v1/chat/completions", b'{"pad": "' + b"x" * (9 << 20) + b'"}', "4xx"),
    ]


async def big_sender(port: int, tally: Tally, rounds: int, quick: bool) -> None:
    for _ in range(rounds):
        for kind, path, body, want in big_bodies(quick):
            tally.record(kind, want, await send(port, "POST", path, body, timeout=300))


async def sample_rss(pid: int, tally: Tally, stop: asyncio.Event) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        tally.rss.append(proc.memory_info().rss)
        await asyncio.sleep(0.5)


async def settle(port: int, timeout: float = 30.0) -> int:
    """Wait until the server has nothing in flight; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        r = await send(port, "GET", "/health", timeout=10)
        left = json.loads(r.body)["in_flight"] if r.status == 200 else -1
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.2)


async def warm_up(port: int, quick: bool) -> None:
    """Every kind once (the big bodies included), so that the baseline RSS holds what the load's first minute
    allocates for good (caches, the worker pool's threads, the allocator's arenas): growth past it is a leak."""
    rng, tally = random.Random(0), Tally()
    for _ in range(40):
        for make, want in ((_valid, "200"), (_malformed, "4xx")):
            kind, path, body = make(rng)
            tally.record(kind, want, await send(port, "POST", path, body))
    await leave_mid_stream(port, rng)
    await leave_mid_body(port)
    await big_sender(port, tally, 1, quick)


async def campaign(port: int, pid: int, args) -> dict:
    import psutil

    rss = psutil.Process(pid).memory_info().rss
    out: dict = {"rss_cold": rss}
    reference = [await chat_text(port, t) for t in MONITOR]  # each alone, before any load
    await warm_up(port, args.quick)
    out["in_flight_after_warm_up"] = await settle(port)
    await asyncio.sleep(1.0)
    out["rss_warm"] = psutil.Process(pid).memory_info().rss
    tally, stop = Tally(), asyncio.Event()
    t0 = time.monotonic()
    background = [asyncio.create_task(f) for f in (
        monitor(port, reference, tally, stop), prober(port, tally, stop), sample_rss(pid, tally, stop),
        slow_clients(port, tally, stop, every=0.2), slow_clients(port, tally, stop, every=0.5))]  # fmt: skip
    clients = [client(port, args.seed * 1000 + i, tally, args.requests) for i in range(args.clients)]
    await asyncio.gather(*clients, big_sender(port, tally, args.big_rounds, args.quick))
    stop.set()
    await asyncio.gather(*background)
    out["load_seconds"] = time.monotonic() - t0
    out["in_flight_at_end"] = await settle(port)
    await asyncio.sleep(3.0)  # let the allocator and the worker threads go quiet
    out["rss_after"] = psutil.Process(pid).memory_info().rss
    after = await chat_text(port, MONITOR[0])
    out["normal_request_after"] = {"answered": after is not None, "equals_alone": after == reference[0]}
    out["tally"] = tally
    return out


# ------------------------------------------------------------------------------------------------ report


def summarize(out: dict, log_text: str, args) -> dict:
    t: Tally = out.pop("tally")
    cut_limit = TIMEOUT_HEADERS + CUT_SLACK_S
    worst_models = max(t.models_latency, default=float("inf"))
    growth = out["rss_after"] / out["rss_warm"] - 1
    res = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "requests": t.sent + t.monitor["sent"] + len(t.models_latency),
        "mix_requests": t.sent,
        "status_table": {k: dict(sorted(v.items(), key=str)) for k, v in sorted(t.table.items())},
        "responses_5xx": len(t.five_xx),
        "valid_failed": len(t.valid_failed),
        "malformed_not_4xx_openai_shape": len(t.malformed_not_4xx),
        "monitor": dict(t.monitor),
        "tracebacks_in_log": log_text.count("Traceback"),
        "internal_errors_in_log": len(re.findall(r"internal error|generation failed|Exception in ASGI", log_text)),
        "models_get": {"count": len(t.models_latency), "max_s": worst_models,
                       "p50_s": sorted(t.models_latency)[len(t.models_latency) // 2] if t.models_latency else None},
        "slow_clients": {"count": len(t.slow_cut_s) + t.slow_not_cut, "not_cut": t.slow_not_cut,
                         "max_cut_s": max(t.slow_cut_s, default=None), "timeout_s": TIMEOUT_HEADERS},
        "rss_mb": {k: round(out[f"rss_{k}"] / 2**20, 1) for k in ("cold", "warm", "after")}
        | {"peak": round(max(t.rss, default=0) / 2**20, 1), "growth_over_warm": round(growth, 4)},
        **{k: out[k] for k in ("load_seconds", "in_flight_after_warm_up", "in_flight_at_end", "normal_request_after")},
        "examples": {"5xx": t.five_xx[:5], "valid_failed": t.valid_failed[:5], "malformed": t.malformed_not_4xx[:5]},
    }  # fmt: skip
    res["goals"] = {
        "requests >= target": res["requests"] >= args.requests,
        "0 responses 5xx": res["responses_5xx"] == 0,
        "0 valid requests failed": res["valid_failed"] == 0 and t.monitor["failed"] == 0,
        "monitor replies equal the same chats alone": t.monitor["differed"] == 0 and t.monitor["matched"] > 0,
        "every malformed request a 4xx in OpenAI's shape": res["malformed_not_4xx_openai_shape"] == 0,
        "0 tracebacks or internal errors in the log": res["tracebacks_in_log"] + res["internal_errors_in_log"]
        == 0,
        "RSS growth <= 10% after the load settles": growth <= 0.10,
        "GET /v1/models never slower than 1 s": worst_models < 1.0,
        "slow clients cut within the timeout": t.slow_not_cut == 0
        and max(t.slow_cut_s, default=0) <= cut_limit,
        "/health shows nothing in flight at the end": out["in_flight_at_end"] == 0,
        "a normal request after the load answered correctly": all(out["normal_request_after"].values()),
    }
    return res


def print_report(res: dict) -> None:
    statuses = sorted({str(s) for row in res["status_table"].values() for s in row})
    print(f"{'kind':<26}" + "".join(f"{s:>9}" for s in statuses))
    for kind, row in res["status_table"].items():
        print(
            f"{kind:<26}"
            + "".join(f"{row.get(s, row.get(int(s) if s.isdigit() else s, '')):>9}" for s in statuses)
        )
    m, sl, rss = res["monitor"], res["slow_clients"], res["rss_mb"]
    print(
        f"\n{res['requests']:,} requests ({res['mix_requests']:,} in the mix) in {res['load_seconds']:.0f} s; "
        f"5xx: {res['responses_5xx']}; valid failed: {res['valid_failed']}; malformed not 4xx: "
        f"{res['malformed_not_4xx_openai_shape']}; tracebacks: {res['tracebacks_in_log']}; internal errors: "
        f"{res['internal_errors_in_log']}"
    )
    print(
        f"monitor: {m.get('matched', 0)}/{m.get('sent', 0)} equal to alone, {m.get('differed', 0)} differed, "
        f"{m.get('failed', 0)} failed; GET /v1/models max {res['models_get']['max_s']:.3f} s over "
        f"{res['models_get']['count']}; slow clients: {sl['count']}, cut in <= {sl['max_cut_s'] or 0:.2f} s "
        f"(timeout {sl['timeout_s']:g} s), not cut {sl['not_cut']}"
    )
    print(
        f"RSS MB: cold {rss['cold']}, warm {rss['warm']}, peak {rss['peak']}, after {rss['after']} "
        f"({rss['growth_over_warm']:+.1%}); in flight at the end: {res['in_flight_at_end']}; "
        f"normal request after: {res['normal_request_after']}"
    )
    for goal, ok in res["goals"].items():
        print(f"  [{'ok' if ok else 'MISSED'}] {goal}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: 600 requests, 4 clients, a 1 MB /tokenize")
    ap.add_argument(
        "--requests", type=int, default=None, help="mix requests to send (default 10,000; quick 400)"
    )
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 8; quick 4)")
    ap.add_argument(
        "--big_rounds", type=int, default=None, help="rounds of near-limit bodies (default 3; quick 1)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/soak_hostile.json"))
    ap.add_argument("--workdir", default=None, help="where the server log goes (default: a temporary folder)")
    args = ap.parse_args()
    args.requests = args.requests or (600 if args.quick else 10_000)
    args.clients = args.clients or (4 if args.quick else 8)
    args.big_rounds = args.big_rounds or (1 if args.quick else 3)

    from serve_throughput import subprocess_env

    from mhsft.client import DeployProcess
    from mhsft.files import write_json

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak_hostile_"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    argv = ["--model", "builtin:tiny", "--host", "127.0.0.1", "--max_model_len", "512", "--max_batch_size", "8",
            "--max_body_mb", f"{MAX_BODY_MB:g}", "--timeout_headers", f"{TIMEOUT_HEADERS:g}",
            "--timeout_body", f"{TIMEOUT_HEADERS:g}"]  # fmt: skip
    with DeployProcess(argv, log, env=subprocess_env(), timeout=300, cwd=ROOT) as srv:
        out = asyncio.run(campaign(srv.port, srv.proc.pid, args))
    res = summarize(out, log.read_text(encoding="utf-8", errors="replace"), args)
    res["server_log"] = str(log)
    print_report(res)
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0 if all(res["goals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
