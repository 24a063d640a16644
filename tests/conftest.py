"""Shared test setup: CPU only, no network, and one tiny model built once per session."""

import atexit
import os
import shutil
import signal
import tempfile
import threading

# Before jax is imported anywhere: tests run on CPU and never reach a hub.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The bundled sample corpus is tokenised once per session into a private cache, never into ~/.cache;
# subprocesses started by tests inherit it. Removed when the process that made it exits.
os.environ["FGPT_JAX_CACHE"] = tempfile.mkdtemp(prefix="fgpt-jax-test-cache-")
atexit.register(shutil.rmtree, os.environ["FGPT_JAX_CACHE"], True)
# Many tests start the CLIs in subprocesses on the same tiny configs, each compiling the same XLA
# programs: JAX's persistent compilation cache compiles each once. One private directory per test
# session, made by the first process (pytest, or pytest-xdist's controller before it starts its
# workers) and inherited by the workers and the subprocesses. Only a test speed-up: a cached
# executable is the same program.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fgpt-jax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Two pytest-xdist workers, plus the CLIs they start, share as many cores: each process computes on
# one thread (XLA's CPU backend otherwise gives each its own pool of all cores' threads, which then
# contend). Threading only, not a program's operations: every comparison keeps its tolerance. Tests
# that need several devices append their flag to this one; the CLIs and benchmarks outside the tests
# run at XLA's defaults. (Optimization level 0, which compiles faster, was tried and left out: the
# trained-run tests computed slower by more than the compile-heavy ones gained.)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()

# Tests stop CLI subprocesses with Ctrl-C (SIGINT), as a terminal does its foreground job. A shell
# without job control starts background jobs (`python -m pytest -q &`, some CI harnesses) with SIGINT
# and SIGQUIT ignored, and every child inherits that: the CLIs would then, rightly for a background
# job, ignore the test's Ctrl-C and never exit. The test processes take the foreground state.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    from fgpt_jax.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    from fgpt_jax.model import GPTConfig

    return GPTConfig.preset("tiny", block_size=32)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from flax import nnx

    from fgpt_jax.model import GPT

    return GPT(tiny_config, rngs=nnx.Rngs(0))
