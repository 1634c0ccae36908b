"""`mhsft infer`: chat with a model (and its LoRA adapter) in the terminal, or answer a JSONL file of dialogues.

Interactive commands (ms-swift's): `clear` forgets the conversation, `reset-system` asks for a new system prompt,
`multi-line` switches to input that ends with a line ending in `#` (`single-line` switches back), `exit` or
`quit` leaves. Batch mode (`--infer_data FILE.jsonl`, `-` for stdin) writes one JSON line per dialogue: the full
conversation with the generated reply, the reply, and the reference reply when the record had one.
"""

from __future__ import annotations

import json
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mhsft.args import EngineArguments, GenerationArguments, ModelArguments, QuantArguments, parse_args
from mhsft.data import readers
from mhsft.data.schema import DataError, Dialogue, Source
from mhsft.files import atomic_open
from mhsft.model import base_model_for, parse_adapters
from mhsft.serve.detok import TextStream
from mhsft.serve.engine import Engine, Request, encode_chat, engine_from_args
from mhsft.serve.sampling import SamplingParams
from mhsft.utils import UserError, get_logger

COMMANDS = "clear | reset-system | multi-line | single-line | exit"


@dataclass
class InferArguments(EngineArguments, GenerationArguments, ModelArguments, QuantArguments):
    adapter_name: str | None = field(
        default=None, metadata={"help": "With several named adapters: the one to use (default: the first)."}
    )
    infer_backend: str = field(
        default="pt", metadata={"help": "pt (vllm/sglang/lmdeploy: use mhsft deploy)."}
    )
    infer_data: str | None = field(
        default=None,
        metadata={"help": "JSONL (or JSON array) of dialogues to answer in batch; - reads stdin."},
    )
    result_path: str | None = field(
        default=None,
        metadata={
            "help": "Where batch results go (default CKPT/infer_result/TIME.jsonl; stdout for stdin input)."
        },
    )

    def sampling(self, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams.of(self, max_new_tokens)


@dataclass
class Reply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def generate(engine: Engine, messages: list[dict], params: SamplingParams, adapter, on_text=None) -> Reply:
    """One reply to `messages`, waiting for it; `on_text(delta)` sees the text as it is generated. Ctrl-C stops
    the generation and keeps what was generated so far."""
    prompt = encode_chat(engine.tokenizer, messages)
    room = engine.max_model_len - len(prompt)
    if room <= 1:
        raise UserError(f"the conversation has {len(prompt)} tokens; the context is {engine.max_model_len}")
    params.max_new_tokens = min(params.max_new_tokens, room - 1)
    events: queue.Queue = queue.Queue()
    req = Request(prompt, params, events.put, adapter=adapter)
    engine.submit(req)
    stream = TextStream(engine.tokenizer)
    n, reason = 0, "stop"
    while True:
        try:
            ev = events.get()
        except KeyboardInterrupt:
            engine.cancel(req)
            continue
        if ev.kind == "token":
            n += 1
            delta = "" if ev.is_stop else stream.push(ev.token)
        elif ev.kind == "error":
            raise UserError(ev.message or "generation failed")
        else:
            delta, reason = stream.flush(), ev.finish_reason or "stop"
        if delta and on_text:
            on_text(delta)
        if ev.kind == "done":
            return Reply(stream.text, reason, len(prompt), n)


# ---------------------------------------------------------------------------------------------------------
# Interactive


def _read(inp: IO, out: IO, prompt: str, multi: bool) -> str | None:
    out.write(prompt)
    out.flush()
    if not multi:
        line = inp.readline()
        return None if not line else line.rstrip("\r\n")
    lines = []
    while True:
        line = inp.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line.endswith("#"):
            lines.append(line[:-1])
            return "\n".join(lines)
        lines.append(line)


def chat_loop(engine: Engine, args: InferArguments, adapter, inp: IO, out: IO) -> int:
    out.write(
        f"mhsft infer: chat with {', '.join([adapter] if adapter else []) or 'the base model'}. "
        f"Commands: {COMMANDS}\n"
    )
    system, history, multi = args.system, [], False
    while True:
        text = _read(inp, out, "<<< " if not multi else "<<<[M] ", multi)
        if text is None:
            out.write("\n")
            return 0
        cmd = text.strip()
        if cmd in ("exit", "quit"):
            return 0
        if cmd == "clear":
            history = []
            out.write("(conversation cleared)\n")
            continue
        if cmd == "reset-system":
            new = _read(inp, out, "new system prompt (empty: the model's default): ", False)
            system = (new or "").strip() or None
            history = []
            out.write("(system prompt set, conversation cleared)\n")
            continue
        if cmd == "multi-line":
            multi = True
            out.write("(multi-line input: end it with a line ending in #)\n")
            continue
        if cmd == "single-line":
            multi = False
            out.write("(single-line input)\n")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": text})
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        while len(encode_chat(engine.tokenizer, msgs)) > engine.max_model_len // 2 and len(history) > 2:
            history = history[2:]  # keep room for the reply: the oldest exchange goes first
            msgs = ([{"role": "system", "content": system}] if system else []) + history
        out.write(">>> ")
        out.flush()

        def show(delta: str) -> None:
            out.write(delta)
            out.flush()

        try:
            reply = generate(engine, msgs, args.sampling(), adapter, show if args.stream else None)
        except UserError as e:
            history.pop()
            out.write(f"\n(error: {e})\n")
            continue
        if not args.stream:
            out.write(reply.text)
        out.write("\n" + ("(reply cut at --max_new_tokens)\n" if reply.finish_reason == "length" else ""))
        history.append({"role": "assistant", "content": reply.text})


# ---------------------------------------------------------------------------------------------------------
# Batch


def _to_dialogue(rec, src: Source) -> tuple[Dialogue, str | None]:
    """A record in any format the data stage reads (a reply at the end is optional: it becomes the reference)
    or ms-swift's {"query", "history", "system"}; returns the prompt dialogue and the reference reply."""
    if isinstance(rec, dict) and "query" in rec and not any(k in rec for k in ("messages", "conversations")):
        rec = {
            "instruction": rec["query"],
            "output": rec.get("response"),
            "history": rec.get("history"),
            "system": rec.get("system"),
        }
    if isinstance(rec, dict) and "instruction" in rec and rec.get("output") is None:
        rec = {**rec, "output": ""}
    kind = readers.detect_record(rec)
    if kind not in readers.CONVERTERS:
        raise DataError(src, "unrecognized record: expected messages, conversations, query or instruction")
    d = readers.CONVERTERS[kind](rec, src)
    turns = list(d.turns)
    label = None
    if turns and turns[-1].role == "assistant":
        label = turns.pop().content or None
    if not turns or turns[-1].role != "user":
        raise DataError(
            src, "the dialogue must end with a user turn (optionally followed by a reference reply)"
        )
    for i, t in enumerate(turns):
        if t.role != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(
                src, f"turn {i + 1}: expected {'user' if i % 2 == 0 else 'assistant'}, got {t.role}"
            )
    return Dialogue(turns, d.system, src), label


def read_infer_data(path: str):
    """Yield (Dialogue, reference) or DataError for each record of a JSONL file, a JSON array file, or stdin."""
    name = "<stdin>" if path == "-" else path
    if path == "-":
        lines = sys.stdin.buffer.read().splitlines()
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--infer_data {path}: no such file")
        raw = p.read_bytes()
        if raw.lstrip()[:1] == b"[":
            try:
                items = json.loads(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, ValueError) as e:
                raise UserError(f"{path}: not a valid JSON array ({str(e)[:100]})") from None
            for i, rec in enumerate(items):
                yield _convert(rec, Source(name, index=i, id=readers.record_id(rec)))
            return
        lines = raw.splitlines()
    index = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        src = Source(name, index=index, line=lineno)
        index += 1
        try:
            rec = json.loads(line.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            yield DataError(src, f"invalid JSON: {str(e)[:100]}")
            continue
        yield _convert(rec, Source(name, index=src.index, line=lineno, id=readers.record_id(rec)))


def _convert(rec, src: Source):
    try:
        return _to_dialogue(rec, src)
    except DataError as e:
        return e


def run_batch(engine: Engine, args: InferArguments, adapter, out: IO) -> tuple[int, int]:
    """Answer every dialogue of --infer_data, writing results in input order. Returns (answered, bad)."""
    from tqdm import tqdm

    items = list(read_infer_data(args.infer_data))
    bad = [e for e in items if isinstance(e, DataError)]
    for e in bad:
        get_logger().error(f"skipped {e}")
    todo = [x for x in items if not isinstance(x, DataError)]
    results: dict[int, dict] = {}
    queues: dict[int, tuple[queue.Queue, Request, TextStream]] = {}
    window = max(2 * engine.max_batch_size, 8)  # keep the engine full without queueing the whole file
    bar = tqdm(total=len(todo), desc="infer", unit="dialogue", file=sys.stderr, dynamic_ncols=True)
    nxt = written = answered = 0
    with bar:
        while written < len(todo):
            while nxt < len(todo) and len(queues) < window:
                d, _ = todo[nxt]
                try:
                    queues[nxt] = _submit(engine, args, adapter, d)
                except Exception as e:  # too long, template failure: that record only
                    results[nxt] = {"error": f"{d.source.where()}: {d.source.label()}: {str(e)[:200]}"}
                nxt += 1
            _collect(queues, todo, results)
            written, done = _write_in_order(results, written, out, bar)
            answered += done
            if written < len(todo) and written not in results:
                time.sleep(0.01)
    return answered, len(items) - answered


def _submit(
    engine: Engine, args: InferArguments, adapter, d: Dialogue
) -> tuple[queue.Queue, Request, TextStream]:
    """One dialogue onto the engine, its reply capped to the room the context leaves; raises if it cannot go."""
    tok = engine.tokenizer
    q: queue.Queue = queue.Queue()
    prompt = encode_chat(tok, d.to_messages())
    params = args.sampling()
    params.max_new_tokens = min(params.max_new_tokens, engine.max_model_len - len(prompt) - 1)
    req = Request(prompt, params, q.put, adapter=adapter)
    engine.submit(req)
    return q, req, TextStream(tok)


def _collect(
    queues: dict[int, tuple[queue.Queue, Request, TextStream]], todo: list, results: dict[int, dict]
) -> None:
    """The engine's events so far into each request's text; a finished or failed request moves to `results`."""
    for i, (q, _req, stream) in list(queues.items()):
        while not q.empty():
            ev = q.get()
            if ev.kind == "token" and not ev.is_stop:
                stream.push(ev.token)
            elif ev.kind == "error":
                results[i] = {"error": ev.message}
                del queues[i]
                break
            elif ev.kind == "done":
                stream.flush()
                d, label = todo[i]
                msgs = d.to_messages() + [{"role": "assistant", "content": stream.text}]
                results[i] = {
                    "id": d.source.id,
                    "messages": msgs,
                    "response": stream.text,
                    "labels": label,
                    "finish_reason": ev.finish_reason,
                }
                del queues[i]
                break


def _write_in_order(results: dict[int, dict], written: int, out: IO, bar) -> tuple[int, int]:
    """Write (or log the failure of) the results that come next in input order: (written now, answered of them)."""
    answered = 0
    while written in results:
        res = results.pop(written)
        if "error" in res:
            get_logger().error(f"failed {res['error']}")
        else:
            out.write(json.dumps(res, ensure_ascii=False) + "\n")
            out.flush()
            answered += 1
        bar.update(1)
        written += 1
    return written, answered


def _result_path(args: InferArguments, adapters: dict[str, str]) -> Path:
    if args.result_path:
        return Path(args.result_path)
    root = Path(next(iter(adapters.values()))) if adapters else Path.cwd()
    return root / "infer_result" / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def main(argv: list[str]) -> int:
    args = parse_args(InferArguments, argv, "mhsft infer")
    if args.infer_backend != "pt":
        raise UserError(
            f"mhsft infer runs the pt backend; for {args.infer_backend} start `mhsft deploy --infer_backend "
            f"{args.infer_backend}` and talk to it over HTTP"
        )
    adapters = parse_adapters(args.adapters)
    base = base_model_for(args.model, adapters)
    adapter = args.adapter_name or (next(iter(adapters)) if adapters else None)
    if adapter is not None and adapter not in adapters:
        raise UserError(f"--adapter_name {adapter}: not among --adapters ({', '.join(adapters) or 'none'})")
    engine, _ = engine_from_args(base, args, cuda_graphs=args.cuda_graphs)
    try:
        if args.infer_data is None:
            return chat_loop(engine, args, adapter, sys.stdin, sys.stdout)
        if args.infer_data == "-" and not args.result_path:
            done, bad = run_batch(engine, args, adapter, sys.stdout)
            get_logger().info(f"answered {done} dialogues" + (f", {bad} skipped" if bad else ""))
            return 0 if done or not bad else 2
        if not Path(args.infer_data).is_file():
            raise UserError(f"--infer_data {args.infer_data}: no such file")
        path = _result_path(args, adapters)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:  # an interrupted run leaves no half file that looks whole
            done, bad = run_batch(engine, args, adapter, f)
        get_logger().info(f"answered {done} dialogues" + (f", {bad} skipped" if bad else "") + f": {path}")
        return 0 if done or not bad else 2
    finally:
        engine.stop()
