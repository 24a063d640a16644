"""Worker processes that tokenise documents for the shard writer: an order-preserving pool.

A spawn process pool (processes beat tiktoken's threads on this workload; see benchmarks/RESULTS.md,
"Data pipeline"); workers pack their tokens into uint16, so only compact arrays cross the process
boundary, and they exit when the parent dies, even by SIGKILL.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time

import numpy as np

from fgpt_jax.tokenizer import get_tokenizer


def pack(token_lists: list[list[int]], eot_id: int) -> np.ndarray:
    """Concatenate documents, each prefixed by <|endoftext|>, into one uint16 array."""
    total = sum(map(len, token_lists)) + len(token_lists)
    eot = (eot_id,)
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable((eot, t) for t in token_lists))
    return np.fromiter(flat, dtype=np.uint16, count=total)


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker process exit when its parent dies.

    A SIGKILLed parent runs no `finally` to shut the pool down, and a spawn worker waits forever on
    the task queue (it holds a writer end of that pipe itself, so it never sees EOF). Linux:
    PR_SET_PDEATHSIG makes the kernel SIGKILL us when the parent goes; elsewhere a daemon thread
    polls the parent id. Either way, a parent that died before this ran is caught by the first check."""
    watched = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            watched = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            watched = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not watched:

        def poll():
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=poll, name="parent watch", daemon=True).start()


def _worker_init(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, once
    _exit_with_parent(parent_pid)
    get_tokenizer()


def encode_pack(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 tokens of all texts, each prefixed by <|endoftext|>; per-document token counts)."""
    tok = get_tokenizer()
    lists = [tok.encode(t) for t in texts]
    lengths = np.fromiter((len(t) + 1 for t in lists), dtype=np.int64, count=len(lists))
    return pack(lists, tok.eot_id), lengths


class Tokeniser:
    """Order-preserving tokenisation: inline for one worker, a process pool otherwise."""

    def __init__(self, workers: int):
        # spawn, not fork: the parent runs datasets/pyarrow threads, which fork would copy mid-lock.
        # An executor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool here
        # instead of being respawned forever while the parent waits.
        self.pool = (
            concurrent.futures.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
            if workers > 1
            else None
        )

    def submit(self, texts: list[str]) -> concurrent.futures.Future:
        if self.pool:
            return self.pool.submit(encode_pack, texts)
        done = concurrent.futures.Future()
        done.set_result(encode_pack(texts))
        return done

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
