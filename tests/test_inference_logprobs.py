"""`/v1/completions` with `echo`, `logprobs`, token-id prompts and `max_tokens` 0 (fgpt_jax.inference.logprobs),
and lm-evaluation-harness's `local-completions` model against `python -m fgpt_jax.serve`'s app: the same
numbers as the in-process harness (fgpt_jax.eval.harness) on the real task files of tests/data/harness.

The server runs in this process (uvicorn on a free port, in a thread) over a random tiny GPT whose
padded vocabulary rows hold the import fill, as an imported GPT-2's do, so scores must use exactly the
50,261 rows its export keeps. Its context (64) is shorter than most of the tasks' requests, so the
cropping of long requests and the rolling windows are compared too.
"""

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from flax import nnx

from fgpt_jax.eval import Loaded
from fgpt_jax.eval.harness import evaluate_harness
from fgpt_jax.hf.weights import vocab_fill
from fgpt_jax.inference.engine import Engine, SamplingParams
from fgpt_jax.inference.generator import Generator
from fgpt_jax.inference.server import create_app
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.tokenizer import N_VOCAB, get_tokenizer

HARNESS = Path(__file__).parent / "data" / "harness"
BLOCK = 64
TEXT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.fixture(scope="module")
def model():
    cfg = GPTConfig.preset("tiny", block_size=BLOCK)
    m = GPT(cfg, rngs=nnx.Rngs(3))
    w = np.array(m.wte.embedding[...])
    w[N_VOCAB:] = vocab_fill(w)
    m.wte.embedding[...] = w
    return m


@pytest.fixture(scope="module")
def engine(model):
    with Engine(model, max_batch=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    """The app on a free local port (uvicorn in a thread); the base URL of /v1/completions."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", False), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    server.should_exit = True
    thread.join(10)


def post(url, **body):
    r = httpx.post(url, json=body, timeout=120)
    return r.status_code, r.json()


def reference_logprobs(model, ids):
    """log-softmax of a plain forward pass over the exported rows, float64: [len(ids) - 1] and the rows."""
    logits = np.asarray(model(np.asarray([ids], np.int32))[0, :, :N_VOCAB], np.float64)
    lse = logits.max(-1, keepdims=True) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lp = logits - lse
    return np.array([lp[i, ids[i + 1]] for i in range(len(ids) - 1)]), lp


def test_echo_logprobs_are_the_models_and_openai_shaped(url, model):
    tok = get_tokenizer()
    ids = tok.encode(TEXT)
    code, r = post(url, prompt=TEXT, echo=True, logprobs=3, max_tokens=1, temperature=0)
    assert code == 200
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    ref, rows = reference_logprobs(model, ids)
    # every prompt token, then the new one; the first prompt token has nothing before it
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], ref, rtol=1e-5, atol=1e-5)
    assert lp["tokens"][: len(ids)] == [tok.decode([t]) for t in ids]
    # the new token is the argmax after the prompt (greedy), its log-prob the top-1 bit for bit
    new = int(np.argmax(rows[-1]))
    assert lp["tokens"][-1] == tok.decode([new]) and choice["text"] == TEXT + tok.decode([new])
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    for top, i in zip(lp["top_logprobs"][1:], range(len(ids))):  # the 3 most likely, most likely first
        values = list(top.values())
        assert len(top) == 3 and values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, np.sort(rows[i])[::-1][:3], rtol=1e-5, atol=1e-5)
    assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids) + 1)]
    assert choice["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}


def test_token_id_prompts_equal_text_prompts_and_max_tokens_0_scores_only(url):
    tok = get_tokenizer()
    texts = [TEXT, "Once upon a time"]
    ids = [tok.encode(t) for t in texts]
    _, by_text = post(url, prompt=texts, echo=True, logprobs=1, max_tokens=0)
    _, by_ids = post(url, prompt=ids, echo=True, logprobs=1, max_tokens=0)
    _, one = post(url, prompt=ids[1], echo=True, logprobs=1, max_tokens=0)  # a flat list of ids: one prompt
    assert [c["text"] for c in by_text["choices"]] == texts  # the prompt only: nothing generated
    assert [c["logprobs"] for c in by_ids["choices"]] == [c["logprobs"] for c in by_text["choices"]]
    assert one["choices"][0]["logprobs"] == by_ids["choices"][1]["logprobs"]
    assert [len(c["logprobs"]["tokens"]) for c in by_ids["choices"]] == [len(i) for i in ids]
    assert by_ids["usage"]["completion_tokens"] == 0
    _, plain = post(url, prompt=TEXT, max_tokens=0)  # no echo: empty text, no log-probs
    assert plain["choices"][0]["text"] == "" and plain["choices"][0]["logprobs"] is None
    _, echo = post(url, prompt=TEXT, max_tokens=0, echo=True)  # echo alone: the prompt, no log-probs
    assert echo["choices"][0]["text"] == TEXT and echo["choices"][0]["logprobs"] is None
    _, echo = post(url, prompt=ids[0], max_tokens=1, echo=True, temperature=0)  # and its greedy next token
    text = echo["choices"][0]["text"]
    assert text.startswith(TEXT) and len(text) > len(TEXT) and echo["usage"]["completion_tokens"] == 1


def test_generated_tokens_get_logprobs(url, model, engine):
    """Through the engine (several new tokens): the greedy text of the engine, each token's log-prob as a
    forward pass over prompt + completion gives it, without and with echo."""
    tok = get_tokenizer()
    ids = tok.encode(TEXT)
    want = engine.generate(ids, SamplingParams(max_tokens=6, temperature=0), timeout=120).tokens
    _, r = post(url, prompt=ids, logprobs=2, max_tokens=6, temperature=0)
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == tok.decode(want) and lp["tokens"] == [tok.decode([t]) for t in want]
    ref, _ = reference_logprobs(model, ids + want)
    np.testing.assert_allclose(lp["token_logprobs"], ref[-6:], rtol=1e-5, atol=1e-5)
    assert all(v == max(top.values()) for v, top in zip(lp["token_logprobs"], lp["top_logprobs"]))  # greedy
    assert lp["text_offset"][0] == 0
    _, e = post(url, prompt=ids, echo=True, logprobs=0, max_tokens=6, temperature=0)
    lp = e["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids) + 6
    np.testing.assert_allclose(lp["token_logprobs"][1:], ref, rtol=1e-5, atol=1e-5)
    assert all(top == {} for top in lp["top_logprobs"][1:])  # logprobs 0: no alternatives
    # sampled (seeded): the same text as without logprobs
    _, a = post(url, prompt=TEXT, max_tokens=5, temperature=0.9, seed=7)
    _, b = post(url, prompt=TEXT, max_tokens=5, temperature=0.9, seed=7, logprobs=1, n=2)
    assert b["choices"][0]["text"] == a["choices"][0]["text"] and len(b["choices"]) == 2


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (dict(prompt=[1, N_VOCAB], echo=True, max_tokens=0), 400, "prompt.1"),  # past the tokenizer's ids
        (dict(prompt=[[5, 6], [-1]], echo=True, max_tokens=0), 400, "prompt.1.0"),
        (dict(prompt=[[]], max_tokens=1), 422, "prompt.0"),
        (dict(prompt="x", logprobs=21), 422, "logprobs"),  # above the documented 20
        (dict(prompt="x", logprobs=-1), 422, "logprobs"),
        (dict(prompt=list(range(BLOCK + 2)), echo=True, max_tokens=0), 400, "prompt"),  # past the context
        (dict(prompt=list(range(BLOCK)), logprobs=1, max_tokens=5, temperature=0), 400, "prompt"),
        (dict(prompt="x", echo=True, stream=True), 400, "stream"),
        (dict(prompt="x", max_tokens=-1), 422, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, body, status, param):
    code, r = post(url, **body)
    assert code == status and r["error"]["param"] == param and r["error"]["message"], r
    if body.get("prompt") == list(range(BLOCK + 2)):
        assert r["error"]["code"] == "context_length_exceeded"
    code, ok = post(url, prompt=TEXT, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert code == 200 and ok["choices"][0]["logprobs"]["tokens"]


def test_a_prompt_that_fills_the_context_is_scored_whole(url, model):
    """The scorer's window is block_size + 1 tokens (the last is only a target): such a prompt is scored
    whole, and its next token (max_tokens 1, greedy) is read from its last block_size tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50000, BLOCK + 1).tolist()
    ref, rows = reference_logprobs(model, ids[:BLOCK])
    ref = np.r_[ref, rows[-1, ids[BLOCK]]]
    for max_tokens in (0, 1):
        code, r = post(url, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0)
        assert code == 200
        lp = r["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == BLOCK + 1 + max_tokens
        np.testing.assert_allclose(lp["token_logprobs"][1 : BLOCK + 1], ref, rtol=1e-5, atol=1e-5)
    _, rows = reference_logprobs(model, ids[1:])
    assert lp["tokens"][-1] == get_tokenizer().decode([int(np.argmax(rows[-1]))])
    code, r = post(url, prompt=ids + [5], echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert code == 400 and r["error"]["code"] == "context_length_exceeded"


# ---- lm-evaluation-harness over HTTP ----


@pytest.fixture(scope="module")
def tasks_env(tmp_path_factory):
    """As in test_eval_harness.py: task data relative to tests/data/harness, a private datasets cache."""
    import datasets

    cache = tmp_path_factory.mktemp("hf-datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(HARNESS)
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield HARNESS


@pytest.mark.slow
def test_lm_eval_local_completions_gives_the_in_process_numbers(tasks_env, url, model, tmp_path_factory):
    """`lm_eval --model local-completions` against the server (max_length = block_size + 2, as documented):
    the four request shapes of the local tasks (2-shot multiple choice longer than the context, an empty
    context, documents in several rolling windows, generation cut at stop strings) give the in-process
    harness's samples and metrics."""
    pytest.importorskip("transformers")  # lm-eval's API client tokenises with the export's tokenizer files
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fgpt_jax.hf import to_hf

    tasks = ["arc_easy_local", "arc_easy_noctx", "shakespeare_rolling", "qa_wikidata_gen"]
    tok = get_tokenizer()
    prompts = [json.loads(line)["context"] for line in (HARNESS / "qa_wikidata_12.jsonl").read_text().splitlines()]
    # Stop strings the random model really writes (its 3rd and 5th greedy tokens), so `until` cuts.
    graphdef, params = nnx.split(model, nnx.Param)
    first = Generator(graphdef, params, stop_ids=()).generate([tok.encode(p) for p in prompts[:2]], 8, temperature=0)
    gen_kwargs = {"until": [tok.decode(first[0][2:3]), tok.decode(first[1][4:5]), "\n"], "max_gen_toks": 8}
    common = dict(num_fewshot=2, log_samples=True, bootstrap_iters=0, gen_kwargs=gen_kwargs)
    ours = evaluate_harness(Loaded.of(model), tasks, include_path=HARNESS, batch_size=8, **common)
    hf_dir = to_hf(model, model.config, tmp_path_factory.mktemp("export") / "hf")
    t0 = time.perf_counter()
    theirs = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={url},model=tiny,tokenizer={hf_dir},tokenizer_backend=huggingface,"
        f"max_length={BLOCK + 2},num_concurrent=1,max_retries=1",
        batch_size=16,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(HARNESS), include_defaults=False),
        **common,
    )
    print(f"local-completions: {time.perf_counter() - t0:.1f} s")
    for task in tasks:
        mine = {s["doc_id"]: s for s in ours["samples"][task]}
        ref = {s["doc_id"]: s for s in theirs["samples"][task]}
        assert mine.keys() == ref.keys() and mine
        for d in ref:
            assert mine[d]["arguments"] == ref[d]["arguments"], (task, d)
            for a, b in zip(mine[d]["resps"], ref[d]["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):
                    assert a == b, (task, d)
                elif isinstance(b, tuple | list):
                    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-4) and a[1] == b[1], (task, d, a, b)
                else:
                    assert a == pytest.approx(b, rel=1e-5, abs=1e-4), (task, d)
        for key, value in theirs["results"][task].items():
            if key.endswith(("acc,none", "acc_norm,none", "exact_match,none")):
                assert ours["results"][task][key] == value, (task, key)
            elif isinstance(value, float) and ("perplexity" in key or key.startswith("bits_per_byte")):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    # What was exercised: requests cropped, documents in several windows, generations cut by a stop string.
    arc = [tok.encode(c + x) for s in ours["samples"]["arc_easy_local"] for c, x in s["arguments"]]
    assert sum(len(ids) > BLOCK + 1 for ids in arc) > len(arc) // 2
    docs = [tok.encode(s["arguments"][0][0]) for s in ours["samples"]["shakespeare_rolling"]]
    assert sum(len(ids) > BLOCK for ids in docs) >= 3
    gens = [s["resps"][0][0] for s in theirs["samples"]["qa_wikidata_gen"]]
    assert any(gens) and any(len(tok.encode(g)) < 8 for g in gens)
