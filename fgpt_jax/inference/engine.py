"""Continuous batching: concurrent requests decoded together in one jitted step over a fixed set of slots.

The server's engine (`python -m fgpt_jax.serve`). One thread owns the device state; callers `submit`
prompts from any thread and get their tokens through a listener as they are decoded.

Layout. One shared KV cache [L, max_batch, S, N, H] (`model.init_cache`), with one write `index` for
all rows and a first slot `start` per row; a row's positions are slot - start, so every row sees
exactly the positions it would see alone. Active rows are kept in rows [0, n) (a finished row is
filled by moving the last one into it), so a step runs on the smallest power-of-two prefix that holds
them: one request alone costs a batch-1 step, not a max_batch one.

Programs, all static-shaped, compiled once per bucket (`warmup` compiles them all up front):
  * `_admit`: prefill a joining prompt in its own cache (left-padded to a power-of-two bucket), sample
    its first token, copy its keys/values into a free row so that the prompt ends at the shared index;
  * `_step`: one token for every row of a prefix (per-row temperature/top-k/top-p/key, see
    row_sampling), stop tokens and max_tokens checked on the device;
  * `_shift`: roll every row along the slots when the index reaches the end of the cache (left, by the
    free room every live row has) or is too small for a joining prompt (right); `_release`: free a row.
S defaults to block_size + block_size // 4, so a left shift (a copy of the cache) happens at most
once per block_size // 4 steps. A request never holds more than block_size - 1 slots: its prompt is
cut to its last block_size - max_tokens tokens, as the Generator does.

Host loop. Steps are dispatched `lag` steps ahead of reading their tokens (JAX dispatch is async), so
the device never waits for the host's per-token work. Finished rows therefore run up to `lag` extra
steps; the device marks them inactive itself, so they cannot run past their budget or their context.

Contract (tested): a greedy request gives the same tokens alone or in a busy batch, and the same as
`Generator.generate`; a seeded sampled request the same tokens alone or in a batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fgpt_jax.inference.generator import bucket
from fgpt_jax.inference.row_sampling import sample_rows
from fgpt_jax.model import GPT, init_cache
from fgpt_jax.tokenizer import get_tokenizer

log = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The wait queue is full (the server answers 503)."""


class EngineClosed(RuntimeError):
    """The engine has stopped (closed, or a device error ended its loop)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 = greedy; top_k 0 and top_p 1 = no filter."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class Request:
    """One submitted generation. Read `tokens` (content tokens: stop tokens excluded),
    `generated` (every decoded token, a stop token included: the usage count) and `finish_reason`
    ("stop", "length", "cancelled" or "error") once `finished` is set."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        dropped: int,
        listener: Callable[[Request, int | None], None] | None,
    ):
        self.prompt, self.params, self.dropped_prompt_tokens = prompt, params, dropped
        self.listener = listener
        self.tokens: list[int] = []
        self.generated = 0
        self.stop_token: int | None = None  # the stop token that ended it (finish_reason "stop"), if any
        self.finish_reason: str | None = None
        self.finished = threading.Event()
        self.row: int | None = None
        self._engine: Engine | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop decoding this request and free its slot (safe from any thread, idempotent)."""
        if self._engine is not None and not self.finished.is_set():
            self._engine._commands.put(("cancel", self, reason))


def _init_state(config, batch: int, cache_len: int) -> dict:
    cache = init_cache(config, batch, cache_len)
    ints = lambda: jnp.zeros((batch,), jnp.int32)  # one buffer per field: each is donated on its own
    return dict(
        k=cache["k"],
        v=cache["v"],
        start=ints(),
        index=cache["index"],
        tok=ints(),
        key=jax.random.split(jax.random.key(0), batch),
        active=jnp.zeros((batch,), bool),
        count=ints(),
        max=ints(),
        temperature=jnp.zeros((batch,), jnp.float32),
        top_k=ints(),
        top_p=jnp.ones((batch,), jnp.float32),
    )


ROW_FIELDS = ("start", "tok", "key", "active", "count", "max", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _admit(graphdef, params, state, prompt_1P, p_len, row, key, temperature, top_k, top_p, max_tokens, stop_ids):
    """Prefill one left-padded prompt, sample its first token, install it in `row` ending at the index."""
    model = nnx.merge(graphdef, params)
    P = prompt_1P.shape[1]
    own = init_cache(model.config, 1, P, jnp.reshape(P - p_len, (1,)))
    logits_1PV, own = model.decode(prompt_1P, own)
    key, sub = jax.random.split(key)
    first = sample_rows(logits_1PV[:, -1], sub[None], temperature[None], top_k[None], top_p[None])[0]
    index = state["index"]
    s = dict(state)
    s["k"] = jax.lax.dynamic_update_slice(state["k"], own["k"], (0, row, index - P, 0, 0))
    s["v"] = jax.lax.dynamic_update_slice(state["v"], own["v"], (0, row, index - P, 0, 0))
    done = jnp.isin(first, stop_ids) | (max_tokens <= 1)
    for name, value in (
        ("start", index - p_len),
        ("tok", first),
        ("key", key),
        ("active", ~done),
        ("count", 1),
        ("max", max_tokens),
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
    ):
        s[name] = state[name].at[row].set(value)
    return s, first


@functools.partial(jax.jit, static_argnames=("graphdef", "rows"), donate_argnames=("state",))
def _step(graphdef, params, state, stop_ids, *, rows):
    """One token for each of the first `rows` rows; inactive rows compute but change nothing that matters."""
    b, B = rows, state["tok"].shape[0]
    index = state["index"]
    active_b = state["active"][:b]
    # An inactive row attends to its own slot only, at position 0: always in range, never all-masked.
    cache = {
        "k": state["k"][:, :b],
        "v": state["v"][:, :b],
        "index": index,
        "start": jnp.where(active_b, state["start"][:b], index),
    }
    logits_b1V, cache = nnx.merge(graphdef, params).decode(state["tok"][:b, None], cache)
    keys_b2 = jax.vmap(jax.random.split)(state["key"][:b])
    nxt_b = sample_rows(
        logits_b1V[:, 0], keys_b2[:, 1], state["temperature"][:b], state["top_k"][:b], state["top_p"][:b]
    )
    count_b = state["count"][:b] + active_b
    done_b = jnp.isin(nxt_b, stop_ids) | (count_b >= state["max"][:b])
    s = dict(state)
    if b == B:
        s["k"], s["v"] = cache["k"], cache["v"]
    else:  # write back only the new slot of these rows
        for name in ("k", "v"):
            new = jax.lax.dynamic_slice_in_dim(cache[name], index, 1, axis=2)
            s[name] = jax.lax.dynamic_update_slice(state[name], new, (0, 0, index, 0, 0))
    s["index"] = index + 1
    for name, value in (("tok", nxt_b), ("key", keys_b2[:, 0]), ("count", count_b), ("active", active_b & ~done_b)):
        s[name] = state[name].at[:b].set(value)
    return s, jnp.where(active_b, nxt_b, -1)


@functools.partial(jax.jit, donate_argnames=("state",))
def _shift(state, d):
    """Move every row `d` slots along the cache (d < 0: left). Wrapped-around slots lie outside every
    row's [start, index) window, so they are never attended before being overwritten."""
    s = dict(state)
    s["k"], s["v"] = jnp.roll(state["k"], d, axis=2), jnp.roll(state["v"], d, axis=2)
    s["start"], s["index"] = state["start"] + d, state["index"] + d
    return s


@functools.partial(jax.jit, donate_argnames=("state",))
def _release(state, row, last):
    """Free `row` by moving row `last` into it (keeps active rows contiguous); `last` goes inactive."""
    s = dict(state)
    for name in ("k", "v"):
        s[name] = state[name].at[:, row].set(state[name][:, last])
    for name in ROW_FIELDS:
        s[name] = state[name].at[row].set(state[name][last])
    s["active"] = s["active"].at[last].set(False)
    return s


class Engine:
    """Continuous-batching decoder over `max_batch` slots, run by its own thread (see module docstring)."""

    def __init__(
        self,
        model: GPT,
        max_batch: int = 8,
        max_queue: int = 64,
        cache_len: int | None = None,
        stop_ids: Sequence[int] | None = None,
        lag: int = 1,
    ):
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.config = model.config
        block = self.config.block_size
        self.cache_len = cache_len or block + max(block // 4, lag + 2)
        if max_batch < 1 or max_queue < 0 or lag < 0:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}, lag={lag}: must be >= 1, >= 0, >= 0")
        if self.cache_len < block + lag + 2:
            raise ValueError(f"cache_len={self.cache_len}: must be >= block_size + lag + 2 = {block + lag + 2}")
        self.max_batch, self.max_queue, self.lag = max_batch, max_queue, lag
        self.stop_ids = tuple(get_tokenizer().stop_ids if stop_ids is None else stop_ids)
        self._stop_arr = jnp.asarray(self.stop_ids or (-1,), jnp.int32)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = [None] * max_batch
        self._starts = [0] * max_batch
        self._n = 0
        self._index = 0
        self._pending: collections.deque = collections.deque()
        self._state = _init_state(self.config, max_batch, self.cache_len)
        self.error: BaseException | None = None
        self.peak_active = 0  # the most requests decoded together so far (for /health and tests)
        self.finished = collections.Counter()  # requests finished, by finish_reason
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fgpt-engine", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        listener: Callable[[Request, int | None], None] | None = None,
    ) -> Request:
        """Queue a generation. `listener(request, token)` is called on the engine thread with each
        content token, then once with None when the request finishes. Raises ValueError for a bad
        request, EngineBusy when the queue is full, EngineClosed when the engine has stopped."""
        block = self.config.block_size
        if not 1 <= params.max_tokens < block:
            raise ValueError(f"max_tokens {params.max_tokens}: must be in [1, {block - 1}] for a context of {block}")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt: must hold at least one token")
        if any(not 0 <= t < self.config.vocab_size for t in prompt):
            raise ValueError(f"prompt: token ids must be in [0, {self.config.vocab_size})")
        keep = block - params.max_tokens
        req = Request(prompt[-keep:], params, max(len(prompt) - keep, 0), listener)
        if self._closed or self.error is not None:
            raise EngineClosed("the engine has stopped" + (f": {self.error}" if self.error else ""))
        if self.pending_count() >= self.max_batch + self.max_queue:
            raise EngineBusy(f"{self.max_batch} requests running and {self.max_queue} waiting; try again later")
        req._engine = self
        self._commands.put(("submit", req))
        return req

    def generate(self, prompt: Sequence[int], params: SamplingParams, timeout: float | None = None) -> Request:
        """Submit and wait until finished (for scripts and tests)."""
        req = self.submit(prompt, params)
        if not req.finished.wait(timeout):
            req.cancel()
            raise TimeoutError(f"request not finished after {timeout} s")
        return req

    def pending_count(self) -> int:
        """Requests submitted and not finished (running or waiting), as last seen by the engine thread."""
        return self._n + len(self._waiting) + self._commands.qsize()

    def active_count(self) -> int:
        return self._n

    def warmup(self) -> None:
        """Compile every program (each decode prefix and prompt bucket) on a scratch state, so the first
        requests do not wait for compilation. Safe while requests are running."""
        block = self.config.block_size
        state = _init_state(self.config, self.max_batch, self.cache_len)
        state = _shift(state, jnp.int32(block))  # room for the longest prompt bucket
        for P in sorted({bucket(n, block, smallest=16) for n in range(1, block)}):
            state, _ = self._admit_call(state, [0] * P, 0, SamplingParams(max_tokens=1))
        for b in sorted({bucket(n, self.max_batch, smallest=1) for n in range(1, self.max_batch + 1)}):
            state, emit = _step(self.graphdef, self.params, state, self._stop_arr, rows=b)
        state = _release(state, jnp.int32(0), jnp.int32(0))
        jax.block_until_ready((state, emit))

    def close(self, timeout: float = 10.0) -> None:
        """Finish every request with "cancelled" and stop the thread."""
        if not self._closed:
            self._closed = True
            self._commands.put(("close",))
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- engine thread ----
    def _admit_call(self, state, prompt, row, params: SamplingParams):
        P = bucket(len(prompt), self.config.block_size, smallest=16)
        rows = np.zeros((1, P), np.int32)
        rows[0, P - len(prompt) :] = prompt
        return _admit(
            self.graphdef,
            self.params,
            state,
            jnp.asarray(rows),
            jnp.int32(len(prompt)),
            jnp.int32(row),
            jax.random.key(params.seed),
            jnp.float32(params.temperature),
            jnp.int32(params.top_k),
            jnp.float32(params.top_p),
            jnp.int32(params.max_tokens),
            self._stop_arr,
        )

    def _run(self) -> None:
        try:
            while True:
                idle = self._n == 0 and not self._pending and not self._waiting
                if not self._drain_commands(block=idle):
                    break
                while self._waiting and self._n < self.max_batch:
                    self._admit(self._waiting.popleft())
                if self._n:
                    self._dispatch_step()
                while self._pending and (len(self._pending) > self.lag or self._n == 0):
                    self._deliver(self._pending.popleft())
        except BaseException as e:  # a device error: fail every request, refuse new ones
            log.exception("engine stopped")
            self.error = e
        for req in [r for r in self._rows if r is not None] + list(self._waiting):
            self._finish(req, "error" if self.error else "cancelled")
        self._waiting.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "submit":
                self._finish(command[1], "error" if self.error else "cancelled")

    def _drain_commands(self, block: bool) -> bool:
        while True:
            try:
                command = self._commands.get(timeout=None) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if command[0] == "close":
                return False
            if command[0] == "submit":
                self._waiting.append(command[1])
            elif command[0] == "cancel":
                req, reason = command[1], command[2]
                if req.finished.is_set():
                    continue
                if req in self._waiting:
                    self._waiting.remove(req)
                self._finish(req, reason)

    def _admit(self, req: Request) -> None:
        P = bucket(len(req.prompt), self.config.block_size, smallest=16)
        if self._index < P:  # the prompt must end at the shared index: make room on the left
            self._state = _shift(self._state, jnp.int32(P - self._index))
            self._starts = [s + P - self._index for s in self._starts]
            self._index = P
        row = self._n
        self._rows[row], req.row = req, row
        self._starts[row] = self._index - len(req.prompt)
        self._n += 1
        self.peak_active = max(self.peak_active, self._n)
        self._state, first = self._admit_call(self._state, req.prompt, row, req.params)
        self._pending.append(("first", req, first))

    def _dispatch_step(self) -> None:
        if self._index >= self.cache_len:  # no slot left: shift left by the room every live row has
            block = self.config.block_size
            live = [self._starts[r] for r in range(self._n) if self._index - self._starts[r] < block]
            d = min(live) if live else self._index - 1
            self._state = _shift(self._state, jnp.int32(-d))
            self._starts = [s - d for s in self._starts]
            self._index -= d
        b = bucket(self._n, self.max_batch, smallest=1)
        self._state, emit = _step(self.graphdef, self.params, self._state, self._stop_arr, rows=b)
        self._index += 1
        self._pending.append(("step", tuple(self._rows[:b]), emit))

    def _deliver(self, item) -> None:
        kind, who, arr = item
        values = np.asarray(arr).reshape(-1).tolist()  # the host sync, `lag` steps behind the device
        for req, tok in zip((who,) if kind == "first" else who, values):
            if req is None or tok < 0 or req.finished.is_set():
                continue
            req.generated += 1
            if tok in self.stop_ids:
                req.stop_token = tok
                self._finish(req, "stop")
                continue
            req.tokens.append(tok)
            self._notify(req, tok)
            if req.generated >= req.params.max_tokens:
                self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        if req.finished.is_set():
            return
        row = req.row
        if row is not None and self._rows[row] is req:
            last = self._n - 1
            if not self.error:
                self._state = _release(self._state, jnp.int32(row), jnp.int32(last))
            self._rows[row], self._starts[row] = self._rows[last], self._starts[last]
            if self._rows[row] is not None:
                self._rows[row].row = row
            self._rows[last] = None
            self._n -= 1
        req.row = None
        req.finish_reason = reason
        self.finished[reason] += 1
        req.finished.set()
        self._notify(req, None)

    @staticmethod
    def _notify(req: Request, tok: int | None) -> None:
        if req.listener is not None:
            try:
                req.listener(req, tok)
            except Exception:  # a listener's bug must not stop the engine
                log.exception("request listener failed")
