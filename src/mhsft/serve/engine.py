"""A continuous-batching generation engine for `mhsft infer` and `mhsft deploy --infer_backend pt`.

One scheduler thread owns the model. Requests arrive from any thread (`submit`), wait for a free slot, are
prefilled together, then decode one token per step alongside every other running request of the same adapter;
a finished or cancelled request frees its slot at once and a waiting one takes it at the next step. Results go
back through each request's `emit` callback (an asyncio queue for the server, a plain queue for the CLI).

Why not transformers' own continuous batching (`generate_batch` / ContinuousBatchingManager)? It runs one model
state for all requests, so it cannot serve several PEFT adapters side by side, has no per-request sampling
settings, seed or cancellation from a client that left, and no prompt logprobs for lm-eval's `echo`; measured on
an H100 it was also slower than a static `generate` batch (514 vs 778 tokens/s at 64 streams).

The KV cache (`kv_cache.SlotCache`) gives each request a fixed slot, and the attention mask is a ready 4-D
one, so the model code, PEFT's LoRA layers included, runs unchanged. On CUDA the decode step is captured as a
CUDA graph per (adapter, batch bucket, KV-length bucket): a 7B decode step is otherwise dominated by the launch
overhead of ~1,500 small kernels.

Scheduling is asynchronous, one step ahead: the sampled tokens stay on the device (`slot_tokens`, one per
slot), the next step reads its inputs from there and is queued before the previous step's tokens are read
back and reported. So the scheduler's Python (reporting 64 tokens, finishing rows, admitting new ones) runs
while the device computes, instead of between two steps. A row that stopped on a token is already in the next
step: that one token is computed and dropped. Lengths are known ahead, so a row never runs past its limit.

A request's own fault fails it alone. Its prompt ids and sampling values are checked once, when it is submitted
(in the caller's thread, never per step; `SamplingParams.checked`); its sampling state is built before it takes
a slot; a failure in its own prefill, prompt logprobs or consumer ends it alone and frees its slot. Before, a
seed of 10**30 failed after taking a slot and kept it forever, and a temperature of 1e-300 failed every
request of its batch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import inspect
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mhsft.lora_forward import fast_lora_inference
from mhsft.model import BASE, inference_quant, load_for_inference, parse_adapters
from mhsft.packed_attention import register_packed_attention, select_attn_backend
from mhsft.serve import scoring
from mhsft.serve.decode_attention import register_decode_attention
from mhsft.serve.kv_cache import SlotCache, kv_cache_bytes
from mhsft.serve.sampling import Pending, RowState, SamplingParams, sample_async, stop_token_ids, to_device
from mhsft.utils import UserError, get_logger

KV_BUCKET = 256  # decode attends over the longest row rounded up to this (a graph per bucket)


class Busy(RuntimeError):
    """The engine's queue cannot take these requests now; the same requests may succeed later."""


@dataclass
class Event:
    kind: str  # "prompt_logprobs" | "token" | "done" | "error"
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    is_stop: bool = False  # the token is an end-of-sequence token (scored, never shown as text)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]] | None]] | None = None
    message: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: str | None = BASE
    id: str = ""
    cancelled: bool = False
    # scheduler state
    slot: int = -1
    cache_len: int = 0  # tokens of this request written (or queued to be written) into its slot
    generated: int = 0  # tokens reported
    inflight: int = 0  # tokens sampled on the device, not yet read back
    last_queued: bool = False  # the token in flight is its last (by max_new_tokens or the context)
    done: bool = False
    row: RowState | None = None
    arrived: float = field(default_factory=time.monotonic)


def bucket(n: int, sizes: list[int]) -> int:
    return next((s for s in sizes if s >= n), sizes[-1])


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        adapters: list[str] | None = None,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        max_prefill_tokens: int = 16384,
        cuda_graphs: bool | None = None,
        batch_wait_s: float = 0.005,
        burst_wait_s: float = 0.1,
        max_queue: int = 4096,  # requests waiting for a slot, beyond the max_batch_size running
        pad_batches: bool | None = None,
        fast_paths: bool = True,
        async_scheduling: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = list(adapters or [])
        self._attach(model)
        limit = int(getattr(self.config, "max_position_embeddings", 0) or 4096)
        self.max_model_len = min(int(max_model_len or min(limit, 4096)), limit)
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_prefill_tokens = max(self.max_model_len, int(max_prefill_tokens))
        self.batch_wait_s, self.burst_wait_s = batch_wait_s, burst_wait_s
        self.max_queue = max_queue
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.fast_paths = fast_paths
        self.async_scheduling = async_scheduling  # off: each step is read back before the next is queued
        self.cudnn_attention = not fast_paths
        self.float_mask = (
            self._choose_attention(fast_paths) == "eager"
        )  # eager adds the mask; sdpa takes a bool
        if fast_paths and self.adapters:
            fast_lora_inference(model)
        # One slot past the last is scratch space: padding rows of a bucketed batch write there.
        self.scratch = self.max_batch_size
        self.cache = self._allocate_cache()
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs and on_cuda)
        self.pad_batches = self.use_graphs if pad_batches is None else pad_batches
        self.batch_sizes = sorted({min(2**i, self.max_batch_size) for i in range(12)} | {self.max_batch_size})
        self.graphs: dict[tuple, _Graph] = {}
        self.graph_pool = None
        # The last sampled token of each slot, on the device: the next decode step's input.
        self.slot_tokens = torch.zeros(self.max_batch_size + 1, dtype=torch.long, device=self.device)
        self._init_scheduler()

    def _attach(self, model) -> None:
        """The parts of the (PEFT-wrapped) model a step calls: the decoder, the LM head, and its settings."""
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = self.inner.model if hasattr(self.inner, "model") else self.inner.get_decoder()
        self.lm_head = self.inner.get_output_embeddings()
        # transformers 5.2x renamed the decoder's `past_key_values` argument to `cache`.
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.config = self.inner.config
        self.device = next(model.parameters()).device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.vocab = int(self.config.vocab_size)

    def _choose_attention(self, fast_paths: bool) -> str:
        """Set the attention the engine's 4-D per-row masks need and return its name. They need an attention that
        takes arbitrary masks (flash-attention 2 does not): SDPA, through our decode wrapper unless the fast paths
        are off (benchmarks/decode_profile.py compares both), or eager when the model was loaded so."""
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl == "eager":
            return impl
        want = register_decode_attention() if fast_paths else "sdpa"
        if impl not in ("sdpa", want):
            get_logger().info(f"generation uses sdpa attention (not {impl}) for its per-row masks")
        self.inner.set_attn_implementation(want)
        return want

    def _allocate_cache(self) -> SlotCache:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        slots = self.max_batch_size + 1  # + the scratch slot
        try:
            return SlotCache(cfg.num_hidden_layers, slots, self.max_model_len, cfg.num_key_value_heads, head_dim,
                             self.dtype, self.device)  # fmt: skip
        except torch.OutOfMemoryError:
            need = kv_cache_bytes(cfg, slots, self.max_model_len, self.dtype) / 2**30
            raise UserError(
                f"the KV cache ({need:.1f} GiB for {self.max_batch_size} x {self.max_model_len} tokens) does not "
                "fit: lower --max_batch_size or --max_model_len"
            ) from None

    def _init_scheduler(self) -> None:
        """The scheduler's queues, slots and counters (the scheduler thread owns them once started)."""
        self.inflight: list[_Step] = []  # queued on the device, in order, not yet reported
        self.active_adapter: object = object()  # unknown until the first switch
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self.calls: queue.SimpleQueue = queue.SimpleQueue()  # (fn, future): work for the scheduler thread
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.free = list(range(self.max_batch_size))
        heapq.heapify(self.free)
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.ids = itertools.count()
        self.pending = 0  # submitted, not finished (inbox + waiting + running)
        self.lock = threading.Lock()
        self.stats = {
            "requests": 0,
            "cancelled": 0,
            "generated_tokens": 0,
            "prefill_tokens": 0,
            "prefill_batches": 0,
            "prefill_seconds": 0.0,  # wall time of the prefills, first tokens sampled included
            "steps": 0,
            "max_running": 0,
        }

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> Engine:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="mhsft-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None

    def submit(self, *reqs: Request) -> None:
        """Queue requests, all or none. Raises UserError for a request that can never run (too long, token ids
        outside the vocabulary, a sampling value out of range), Busy when the queue cannot take them all now,
        and RuntimeError when the engine is stopping. Each request is checked here, once and in the caller's
        thread, so that none can fail the batch it later runs in."""
        if self.stopping:
            raise RuntimeError("the engine is shutting down")
        for req in reqs:
            self._check(req)
        room = self.max_batch_size + self.max_queue
        if len(reqs) > room:
            raise UserError(f"{len(reqs)} generations at once; this server queues at most {room}")
        with self.lock:
            if self.pending + len(reqs) > room:
                raise Busy(f"{self.pending} requests in flight, the queue is full")
            self.pending += len(reqs)
        for req in reqs:
            req.id = req.id or f"r{next(self.ids)}"
            self.inbox.put(req)
        self.wake.set()

    def _check(self, req: Request) -> None:
        """Refuse what could fail later in a batch; replace the sampling values by ones that always compute."""
        if req.adapter is not BASE and req.adapter not in self.adapters:
            raise UserError(f"unknown adapter {req.adapter!r}")
        ids = req.prompt_ids
        if not ids:
            raise UserError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise UserError(
                f"the prompt has {len(ids)} tokens; this server's context is {self.max_model_len}"
            )
        if min(ids) < 0 or max(ids) >= self.vocab:  # an embedding lookup out of range fails the whole batch
            raise UserError(f"the prompt holds token ids outside [0, {self.vocab})")
        req.params = req.params.checked(self.vocab)

    def cancel(self, req: Request) -> None:
        """Stop generating for `req` (its client left); its slot is freed at the next step."""
        req.cancelled = True
        self.wake.set()

    def score(self, pairs: list[scoring.Pair], adapter=BASE) -> list[float]:
        """The log-likelihood of each (context ids, continuation ids) under `adapter` (BASE: the base model),
        many per forward (mhsft.serve.scoring). Runs on the scheduler thread, between decode steps, so that one
        thread owns the model; waits for the result."""
        if adapter is not BASE and adapter not in self.adapters:
            raise UserError(f"unknown adapter {adapter!r}")
        return self._on_scheduler(lambda: self._score(pairs, adapter))

    def load(self) -> int:
        return self.pending

    # ------------------------------------------------------------------ scheduler thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self.stopping:
                try:
                    self._iteration()
                except Exception as e:  # never let one bad batch take the server down
                    get_logger().error(f"generation failed: {type(e).__name__}: {e}")
                    self.inflight = []
                    for req in list(self.running.values()) + list(self.waiting):
                        self._finish(req, error=f"generation failed: {type(e).__name__}")
                    self.waiting.clear()
            for req in list(self.running.values()) + list(self.waiting) + self._drain_inbox():
                self._finish(req, error="the server is shutting down")
            with contextlib.suppress(queue.Empty):
                while True:
                    self.calls.get_nowait()[1].set_exception(RuntimeError("the engine is shutting down"))

    def _drain_inbox(self) -> list[Request]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.inbox.get_nowait())
        return out

    def _on_scheduler(self, fn):
        """fn() on the scheduler thread (where the model is used), its result or exception handed back."""
        if self.thread is None:  # not started: this thread is the only user
            with torch.inference_mode():
                return fn()
        if self.stopping:
            raise RuntimeError("the engine is shutting down")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.calls.put((fn, done))
        self.wake.set()
        return done.result()

    def _run_calls(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                fn, done = self.calls.get_nowait()
                try:
                    done.set_result(fn())
                except BaseException as e:  # the caller gets it; the engine goes on
                    done.set_exception(e)

    def _score(self, pairs: list[scoring.Pair], adapter) -> list[float]:
        self._use_adapter(adapter)
        before = self.config._attn_implementation
        self.inner.set_attn_implementation(register_packed_attention(select_attn_backend(self.device)[0]))
        try:
            return scoring.score(
                self.decoder, self.lm_head, self.config, pairs, self.max_prefill_tokens, self.device
            )
        finally:
            self.inner.set_attn_implementation(before)

    def _iteration(self) -> None:
        self._run_calls()
        idle = not self.running and not self.waiting and not self.inflight
        if idle:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            if self.inbox.empty():
                return  # a call that woke the engine runs at the top of the next iteration
            # Requests sent together arrive a few milliseconds apart: wait briefly to prefill them as one batch,
            # and while a burst keeps coming, up to burst_wait_s. A burst split in two costs its tail the first
            # prefill's time (an eager prefill of a few rows is launch-bound: ~0.2 s for a 7B on the H100).
            time.sleep(self.batch_wait_s)
            deadline, seen = time.monotonic() + self.burst_wait_s, self.inbox.qsize()
            while seen < len(self.free) and time.monotonic() < deadline:
                time.sleep(self.batch_wait_s)
                if self.inbox.qsize() == seen:
                    break
                seen = self.inbox.qsize()
        self.waiting.extend(self._drain_inbox())
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, reason="cancelled")
        for req in [r for r in self.running.values() if r.cancelled]:
            self._finish(req, reason="cancelled")
        queued = self._admit()
        by_adapter: dict[object, list[Request]] = {}
        for req in sorted(self.running.values(), key=lambda r: r.slot):
            if not req.last_queued:
                by_adapter.setdefault(req.adapter, []).append(req)
        for adapter, rows in by_adapter.items():
            step = self._decode(adapter, rows)
            if step is not None:
                queued.append(step)
        # The device now has the next steps queued: report the previous ones meanwhile.
        for step in self.inflight:
            self._resolve(step)
        self.inflight = queued
        if not self.async_scheduling:
            for step in self.inflight:
                self._resolve(step)
            self.inflight = []

    def _admit(self) -> list[_Step]:
        """Prefill waiting requests into free slots, a batch per adapter, within the prefill token budget. A
        request's sampling state is built before it takes a slot: one whose state cannot be built fails alone
        and holds nothing."""
        queued: list[_Step] = []
        batch: dict[object, list[Request]] = {}
        budget = self.max_prefill_tokens
        while self.waiting and self.free:
            req = self.waiting[0]
            n = len(req.prompt_ids)
            if n > budget and any(batch.values()):
                break
            self.waiting.popleft()
            try:
                req.row = RowState.create(req.params, req.prompt_ids, self.vocab, self.device)
            except Exception as e:
                self._fail(req, "building its sampling state", e)
                continue
            budget -= n
            req.slot = heapq.heappop(self.free)
            self.running[req.slot] = req
            batch.setdefault(req.adapter, []).append(req)
        self.stats["max_running"] = max(self.stats["max_running"], len(self.running))
        for adapter, reqs in batch.items():
            queued += self._prefill(adapter, reqs)
        return queued

    def _fail(self, req: Request, what: str, e: Exception) -> None:
        """One request failed on its own: one log line (no prompt text), an error event, its slot freed."""
        get_logger().error(f"request {req.id} failed {what}: {type(e).__name__}: {str(e)[:200]}")
        self._finish(req, error=f"generation failed: {type(e).__name__}")

    def _use_adapter(self, adapter) -> None:
        if adapter == self.active_adapter or not self.adapters:
            return
        base = self.model.base_model
        if adapter is BASE:
            base.disable_adapter_layers()
        else:
            base.enable_adapter_layers()
            try:
                self.model.set_adapter(adapter, inference_mode=True)
            except TypeError:  # peft < 0.15
                self.model.set_adapter(adapter)
        self.active_adapter = adapter

    def _mask(self, allowed: torch.Tensor):
        if self.float_mask:
            return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~allowed, torch.finfo(self.dtype).min
            )
        return allowed

    def _attention_backends(self):
        """SDPA without cuDNN's kernel on CUDA. cuDNN builds an execution plan for each new (batch, length)
        shape, and a server meets new shapes all the time. On the H100 the memory-efficient kernel decodes
        just as fast (GPU step 10.9 vs 10.8 ms at batch 64) and prefills a new shape just as fast (0.51 s);
        benchmarks/decode_profile.py compares the two."""
        if self.device.type != "cuda" or self.cudnn_attention:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])

    def _forward(self, ids, positions, slots, mask, kv_len, first_rows: int = 0) -> torch.Tensor:
        """Hidden states (B, T, H) of the decoder for `ids` at `positions`, reading/writing the rows' slots."""
        self.cache.slots, self.cache.positions, self.cache.kv_len = slots, positions, kv_len
        self.cache.first_rows = first_rows
        with self._attention_backends():
            out = self.decoder(
                input_ids=ids,
                position_ids=positions,
                attention_mask={"full_attention": mask, "sliding_attention": mask},
                use_cache=True,
                **{self.cache_kwarg: self.cache},
            )
        return out.last_hidden_state

    def _prefill(self, adapter, reqs: list[Request]) -> list[_Step]:
        """Prefill requests (running, in their slots) as one batch and queue each one's first token. When the
        batch's forward raises, each request is prefilled alone, so that a prompt that breaks the forward fails
        its own request only (the others' slots are simply written again)."""
        t = time.perf_counter()
        try:
            hidden, logits, slots = self._prefill_forward(adapter, reqs)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for req in reqs:
                self._finish(req, error="out of memory during prefill; send shorter or fewer prompts")
            return []
        except Exception as e:
            if len(reqs) == 1:
                self._fail(reqs[0], "in its prefill", e)
                return []
            return [step for r in reqs for step in self._prefill(adapter, [r])]
        failed, done = [], []
        for i, r in enumerate(reqs):
            r.cache_len = len(r.prompt_ids)
            if r.params.prompt_logprobs is not None:
                try:
                    r.emit(Event("prompt_logprobs", prompt_logprobs=self._prompt_logprobs(hidden[i], r)))
                except Exception as e:  # this request's own logprobs (or its consumer): it fails alone
                    failed.append((r, e))
                    continue
            if r.params.max_new_tokens <= 0:  # scoring the prompt only (echo with max_tokens 0)
                done.append(r)
        self.stats["prefill_tokens"] += sum(len(r.prompt_ids) for r in reqs)
        skip = {id(r) for r, _ in failed} | {id(r) for r in done}
        live = [i for i, r in enumerate(reqs) if id(r) not in skip]
        steps = []
        if len(live) < len(reqs) and live:
            live_t = to_device(live, self.device)
            logits, slots = logits.index_select(0, live_t), slots.index_select(0, live_t)
        if live:  # queued before any finish below moves a row's slot
            steps.append(self._queue_tokens(logits, [reqs[i] for i in live], slots))
        for r, e in failed:
            self._fail(r, "computing its prompt logprobs", e)
        for r in done:
            self._finish(r, reason="length")
        self.stats["prefill_batches"] += 1
        self.stats["prefill_seconds"] += time.perf_counter() - t
        return steps

    def _prefill_forward(self, adapter, reqs: list[Request]):
        """The prompts' hidden states (written into their slots' KV), last-token logits, and slots."""
        self._use_adapter(adapter)
        dev = self.device
        lens = [len(r.prompt_ids) for r in reqs]
        T = max(lens)
        pad = self.tokenizer.pad_token_id or 0
        ids = to_device([r.prompt_ids + [pad] * (T - len(r.prompt_ids)) for r in reqs], dev)
        positions = torch.arange(T, device=dev)[None].expand(len(reqs), T)
        slots = to_device([r.slot for r in reqs], dev)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        mask = self._mask(causal[None, None].expand(len(reqs), 1, T, T))
        hidden = self._forward(ids, positions, slots, mask, T)
        last = hidden[torch.arange(len(reqs), device=dev), to_device(lens, dev) - 1]
        return hidden, self.lm_head(last), slots

    def _prompt_logprobs(self, hidden: torch.Tensor, req: Request, chunk: int = 512) -> list:
        """Logprob of each prompt token given the ones before it (None for the first), and the top k."""
        ids = torch.tensor(req.prompt_ids, device=self.device)
        k = req.params.prompt_logprobs or 0
        out: list = [(None, None)]
        n = len(req.prompt_ids)
        for s in range(0, n - 1, chunk):
            e = min(n - 1, s + chunk)
            lp = self.lm_head(hidden[s:e]).float().log_softmax(dim=-1)
            tok = lp.gather(-1, ids[s + 1 : e + 1, None]).squeeze(-1).tolist()
            if k:
                tv, ti = lp.topk(k, dim=-1)
                tops = [list(zip(a, b)) for a, b in zip(ti.tolist(), tv.tolist())]
            else:
                tops = [[] for _ in tok]
            out += list(zip(tok, tops))
        return out

    def _decode(self, adapter, rows: list[Request]) -> _Step | None:
        self._use_adapter(adapter)
        n = len(rows)
        B = bucket(n, self.batch_sizes) if self.pad_batches else n
        kv_len = min(self.max_model_len, -(-(max(r.cache_len for r in rows) + 1) // KV_BUCKET) * KV_BUCKET)
        # Rows in slots 0..n-1 (the usual case: `_finish` keeps running requests packed at the front) read
        # the cache as a view; padding rows then use the free slots n..B-1, else the scratch slot. Only when
        # these rows are all that runs: another adapter's rows may sit in slots n..B-1.
        packed = len(self.running) == n and all(r.slot == i for i, r in enumerate(rows))
        first = B if self.fast_paths and packed else 0
        pos = [r.cache_len for r in rows] + [0] * (B - n)
        slots = [r.slot for r in rows] + (list(range(n, B)) if first else [self.scratch] * (B - n))
        dev = self.device
        pos_t = to_device(pos, dev)[:, None]
        slots_t = to_device(slots, dev)
        ids_t = self.slot_tokens[slots_t][:, None]  # padding rows read whatever their slot holds
        try:
            if self.use_graphs:
                logits = self._graph_step(adapter, B, kv_len, ids_t, pos_t, slots_t, first)
            else:
                logits = self._eager_step(ids_t, pos_t, slots_t, kv_len, first)
        except torch.OutOfMemoryError:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            for r in rows:
                self._finish(r, error="out of memory while generating")
            return None
        self.stats["steps"] += 1
        for r in rows:
            r.cache_len += 1
        return self._queue_tokens(logits[:n], rows, slots_t[:n])

    def _eager_step(self, ids, pos, slots, kv_len, first_rows: int = 0) -> torch.Tensor:
        allowed = torch.arange(kv_len, device=self.device)[None] <= pos  # (B, kv_len)
        hidden = self._forward(ids, pos, slots, self._mask(allowed[:, None, None, :]), kv_len, first_rows)
        return self.lm_head(hidden[:, -1]).float()

    def _graph_step(self, adapter, B, kv_len, ids, pos, slots, first_rows: int = 0) -> torch.Tensor:
        key = (adapter, B, kv_len, first_rows)
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self._capture(B, kv_len, first_rows)
            except Exception as e:  # a model or kernel that cannot be captured: fall back for good
                get_logger().warning(f"CUDA graphs off ({type(e).__name__}: {e}); decoding eagerly")
                self.use_graphs = False
                self.graphs.clear()
                return self._eager_step(ids, pos, slots, kv_len, first_rows)
            self.graphs[key] = g
        g.ids.copy_(ids)
        g.pos.copy_(pos)
        g.slots.copy_(slots)
        g.graph.replay()
        return g.logits

    def _capture(self, B, kv_len, first_rows: int = 0) -> _Graph:
        dev = self.device
        # Warm-up and capture write to slot positions: only the scratch slot may take them, whatever the mode.
        g = _Graph(
            ids=torch.zeros(B, 1, dtype=torch.long, device=dev),
            pos=torch.zeros(B, 1, dtype=torch.long, device=dev),
            slots=torch.full((B,), self.scratch, dtype=torch.long, device=dev),
        )
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (kernel selection, lazy init)
                self._eager_step(g.ids, g.pos, g.slots, kv_len, first_rows)
        torch.cuda.current_stream(dev).wait_stream(stream)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self.graph_pool):
            g.logits = self._eager_step(g.ids, g.pos, g.slots, kv_len, first_rows)
        self.graph_pool = g.graph.pool()
        return g

    def _queue_tokens(self, logits: torch.Tensor, rows: list[Request], slots: torch.Tensor) -> _Step:
        """Sample the next token of each row on the device, where the next step reads it, without waiting."""
        out = sample_async(logits, [r.row for r in rows])
        self.slot_tokens[slots] = out.tokens
        last = []
        for r in rows:
            r.inflight += 1
            # cache_len is where this token will be written; keep one position spare, as ever
            r.last_queued = (
                r.generated + r.inflight >= r.params.max_new_tokens or r.cache_len + 1 >= self.max_model_len
            )
            last.append(r.last_queued)
        return _Step(rows, out, last)

    def _resolve(self, step: _Step) -> None:
        """Read a queued step's tokens back, report them, and retire rows that are done."""
        out = step.out.result()
        reported = 0
        for i, r in enumerate(step.rows):
            r.inflight -= 1
            if r.done:  # stopped or cancelled after this step was queued: its token is dropped
                continue
            tok = out.tokens[i]
            r.generated += 1
            reported += 1
            is_stop = tok in self.eos_ids and not r.params.ignore_eos
            try:
                r.emit(Event("token", token=tok, logprob=out.logprobs[i], top=out.top[i], is_stop=is_stop))
            except Exception:  # its consumer is gone or broken: this request stops, the batch goes on
                r.cancelled = True
            if is_stop:
                self._finish(r, reason="stop")
            elif step.last[i]:
                self._finish(r, reason="length")
        self.stats["generated_tokens"] += reported

    def _finish(self, req: Request, reason: str | None = None, error: str | None = None) -> None:
        if req.slot >= 0 and self.running.get(req.slot) is req:
            del self.running[req.slot]
            freed = req.slot
            last = max(self.running, default=-1)
            if last > freed:  # keep running requests packed in the first slots (decode reads them as a view)
                moved = self.running.pop(last)
                # queued behind every step already launched, so it moves what they write too
                self.cache.move(last, freed, moved.cache_len)
                self.slot_tokens[freed] = self.slot_tokens[last]
                moved.slot, self.running[freed], freed = freed, moved, last
            heapq.heappush(self.free, freed)
        req.slot = -1
        req.done = True
        with self.lock:
            self.pending -= 1
        self.stats["requests"] += 1
        self.stats["cancelled"] += reason == "cancelled"
        with contextlib.suppress(Exception):  # a consumer that is gone (event loop closed) needs no answer
            req.emit(Event("error", message=error) if error else Event("done", finish_reason=reason))


@dataclass
class _Step:
    rows: list[Request]
    out: Pending
    last: list[bool]  # the row's last token (by length)


@dataclass
class _Graph:
    ids: torch.Tensor
    pos: torch.Tensor
    slots: torch.Tensor
    graph: object = None
    logits: torch.Tensor | None = None


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for a conversation under the tokenizer's chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def engine_from_args(base: str, args, cuda_graphs: bool = True) -> tuple[Engine, str]:
    """The engine `mhsft infer` and `mhsft deploy` share, from their common flags; returns it and its device."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quant = inference_quant(args, parse_adapters(args.adapters))
    m, tok, names = load_for_inference(base, args.adapters, args.torch_dtype, args.attn_impl, device,
                                       use_hf=args.use_hf, token=args.hub_token, quant=quant)  # fmt: skip
    if getattr(tok, "chat_template", None) is None:
        get_logger().info("the tokenizer has no chat template: chat requests will fail, completions work")
    batch = args.max_batch_size or (64 if device.startswith("cuda") else 8)
    engine = Engine(m, tok, names, max_batch_size=batch, max_model_len=args.max_model_len, cuda_graphs=cuda_graphs,
                    async_scheduling=getattr(args, "async_scheduling", True),
                    max_queue=getattr(args, "max_queue", 4096)).start()  # fmt: skip
    return engine, device
