"""scripts/gpu/: the GPU check's headline plan end to end in --smoke mode on CPU (every section, tiny shapes),
so the command a GPU session runs cannot rot; the memory estimate the micro-batch comes from, against XLA's
own accounting; the cuDNN self-test's verdict; the time budget; the wheel install; the PyTorch peer's model
against ours on the same weights."""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
sys.path.insert(1, str(ROOT / "scripts"))
import check  # noqa: E402
import plan  # noqa: E402
import probe  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _check(*args, timeout=120):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu" / "check.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# -- the headline plan, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_smoke")
    out, work = tmp / "out", tmp / "work"
    args = ["--plan", "headline", "--smoke", "--out", str(out), "--workdir", str(work)]
    args += ["--assets", str(tmp / "no-assets"), "--budget", "1800"]
    r = _check(*args, timeout=1900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (out / "headline.md").read_text()
    data = json.loads((out / "headline.json").read_text())
    return {"r": r, "out": out, "work": work, "report": report, "data": data}


@pytest.mark.slow
def test_smoke_runs_the_plan_in_order_with_budgets(smoke):
    r, out, report = smoke["r"], smoke["out"], smoke["report"]
    assert sorted(p.name for p in out.iterdir()) == ["headline.json", "headline.log", "headline.md"]
    assert report in r.stdout  # printed too: the device returns the end of the output
    # The plan's order with each section's budget, printed before anything runs and again in the report.
    titles = [s.title for s in plan.HEADLINE]
    assert [s.key for s in plan.HEADLINE] == ["env", "gpt2", "peer", "run", "fgpt"]
    t = 0
    for i, s in enumerate(plan.HEADLINE, 1):
        row = f"| {i} | {s.title} | {s.budget_s} | {t} | {t + s.budget_s} |"
        assert row in r.stdout.split("# fgpt-jax GPU check")[0] and row in report
        t += s.budget_s
    assert t == plan.total_budget("headline") == 480
    headings = [line[3:] for line in report.splitlines() if line.startswith("## ")]
    assert headings == [*titles, "Summary"]
    for s in plan.HEADLINE:
        assert re.search(rf"## {re.escape(s.title)}\n\nGPU budget {s.budget_s} s; \d+ s[.;]", report), s.title
    for bad in ("failed (rc=", "Traceback", "; not run: ", "**Did not fit**", "cut at", "section raised"):
        assert bad not in report, bad
    assert "Did not fit: nothing (every section ran to its end)." in report
    # The checkout's sources were staged and imported, configs included.
    assert f"| fgpt_jax imported from | {smoke['work'] / 'src' / 'fgpt_jax'} |" in report


@pytest.mark.slow
def test_smoke_reports_the_attention_path(smoke):
    report, data = smoke["report"], smoke["data"]
    att = data["sections"][plan.HEADLINE[0].title]["attention"]
    # On CPU cuDNN cannot run: the fallback is taken, with the warning, and every later section says so.
    assert [(c["head_dim"], c["padded_to"]) for c in att["cases"]] == [(64, 64), (52, 56)]
    assert att["path"] == "xla" and not att["passed"] and "cuDNN is not detected" in att["reasons"][-1]
    assert "**Warning: the cuDNN attention self-test failed; every later section runs with XLA attention" in report
    for s in plan.HEADLINE[1:]:
        block = report.split(f"## {s.title}\n")[1].split("\n## ")[0]
        assert "attention: xla (cuDNN self-test failed; fallback, see (a))." in block, s.title
    assert "--config.model.attention=xla" in report  # the real switch, passed to the training CLI


@pytest.mark.slow
def test_smoke_measures_every_section(smoke):
    data, results = smoke["data"], smoke["data"]["results"]
    sec = data["sections"]
    rows = sec[plan.HEADLINE[1].title]["rows"]  # (b): AdamW then Muon at the one micro-batch
    assert [(x["optimizer"], x["micro_batch"]) for x in rows] == [("adamw", 2), ("muon", 2)]
    assert all(x["tokens_per_sec"] > 0 and x["compile_s"] > 0 and x["xla_gb"] > 0 for x in rows)
    env = sec[plan.HEADLINE[0].title]
    assert env["micro_batches"]["gpt2"]["micro_batch"] in plan.MICRO_BATCHES  # the estimate ran against memory
    peer = sec[plan.HEADLINE[2].title]
    if HAS_TORCH:  # (c): the torch peer's rows at the same shape, and the ratio
        assert [(x["optimizer"], x["micro_batch"]) for x in peer["rows"]] == [("adamw", 2), ("muon", 2)]
        assert all(x["tokens_per_sec"] > 0 for x in peer["rows"]) and results["peer_adamw"]["ratio"] > 0
        assert "| adamw | 2 |" in smoke["report"].split("## (c)")[1]
    else:
        assert peer == {"skipped": "skipped: torch is not installed here"}
    # (d): the training CLI reused (b)'s step program, the loss fell, the checkpoint came back whole.
    assert results["run_cache_hit"] is True and results["val_falling"] is True
    after = sec[plan.HEADLINE[3].title]["after_run"]
    assert [c["ok"] for c in after["checks"]] == [True] * 4, after["checks"]
    assert after["hellaswag"]["items"] == 8 and 0 <= after["hellaswag"]["acc"] <= 1
    assert [d["batch"] for d in after["decode"]] == [1] and after["decode"][0]["tokens_per_sec"] > 0
    fgpt = sec[plan.HEADLINE[4].title]["rows"]  # (e): FGPT's stand-in (head_dim 52) with scan
    assert [(x["variant"], x["scan_layers"]) for x in fgpt] == [("scan", True)] and fgpt[0]["tokens_per_sec"] > 0


# -- the memory estimate --------------------------------------------------------------------------------


def _xla_bytes(overrides, mb, optimizer):
    import jax

    from fgpt_jax import sharding as shd
    from fgpt_jax.config import apply_overrides, load_config
    from fgpt_jax.data import Batch
    from fgpt_jax.train.step import build_setup

    cfg = apply_overrides(
        load_config("gpt2_124m"),
        [*overrides, "model.dtype=float32", "model.attention=xla", f"train.batch_size={mb}", "train.grad_accum=1"]
        + [f"optim.name={optimizer}"],
    )
    setup = build_setup(cfg, shd.make_mesh())
    T = cfg.model.block_size
    batch = Batch(jax.ShapeDtypeStruct((1, mb, T + 1), np.int32), jax.ShapeDtypeStruct((1, mb, T), np.float32))
    m = setup.train_step.lower(setup.abstract_state, batch).compile().memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return total, cfg.model


@pytest.mark.parametrize(
    "overrides,mb,optimizer",
    [
        # activations dominate (small vocabulary)
        (
            ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.block_size=128", "model.vocab_size=512"],
            8,
            "adamw",
        ),  # noqa: E501
        # the float32 logits over GPT-2's 50,304 tokens dominate; Muon's smaller state
        (["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=128"], 4, "muon"),
    ],
)
@pytest.mark.slow
def test_memory_estimate_matches_xla(overrides, mb, optimizer):
    """plan.train_memory against XLA's own accounting of the compiled train step (arguments + outputs -
    donated aliases + temporaries), on CPU in float32 (XLA:CPU computes bf16 in float32 anyway)."""
    xla, model = _xla_bytes(overrides, mb, optimizer)
    est = plan.train_memory(model, mb, optimizer=optimizer, attention="xla").total
    assert 0.8 < est / xla < 1.25, (est / 2**20, xla / 2**20)


def test_choose_micro_batch_fits_and_is_the_largest():
    from fgpt_jax.config import load_config

    gpt2, fgpt = load_config("gpt2_124m").model, load_config("fgpt").model
    est = lambda m, mb, **k: plan.train_memory(m, mb, **k).total  # noqa: E731
    # Affine in the micro-batch: per-sequence memory on top of the fixed parameter/optimizer state.
    assert est(gpt2, 24) - est(gpt2, 16) == est(gpt2, 16) - est(gpt2, 8) > 0
    assert est(gpt2, 8, optimizer="muon") < est(gpt2, 8)  # momentum only, for the hidden matrices
    assert est(gpt2, 8, attention="xla") > est(gpt2, 8)  # XLA keeps the T x T scores, cuDNN does not
    assert plan.train_memory(gpt2, 8).params == 4 * gpt2.num_params() == 4 * 124_475_904
    h100, h200 = int(0.75 * 79.6 * 2**30), int(0.75 * 140.4 * 2**30)  # JAX's default 75% of the card
    for model, device, optimizer, expected in [
        (gpt2, h200, "adamw", 64),  # build-nanogpt's micro-batch: the cap
        (gpt2, h100, "adamw", 32),
        (fgpt, h200, "muon", 32),
        (fgpt, h100, "muon", 16),
    ]:
        mb, e = plan.choose_micro_batch(model, device, optimizer=optimizer)
        assert mb == expected and e.total <= plan.HEADROOM * device
        if mb < 64:  # the next one would not have fitted
            assert est(model, 2 * mb, optimizer=optimizer) > plan.HEADROOM * device
    assert plan.choose_micro_batch(gpt2, 2**30)[0] == 1  # nothing fits: the smallest, not an error


# -- the cuDNN self-test's verdict ------------------------------------------------------------------------


def _case(cudnn, xla=1e-2, **extra):
    rel = lambda v: dict.fromkeys(("out", "dq", "dk", "dv"), v) if isinstance(v, float) else v  # noqa: E731
    return {
        "heads": 12,
        "head_dim": 64,
        "padded_to": 64,
        "shape": "4x1024",
        "finite": True,
        "cudnn_rel": rel(cudnn),
    } | {
        "xla_bf16_rel": rel(xla),
        **extra,
    }


def test_attention_verdict():
    ok = probe.attention_verdict([_case(1.2e-2), _case(2e-2)])
    assert ok == {"path": "cudnn", "passed": True, "reasons": []}
    bad_grad = probe.attention_verdict([_case({"out": 1e-2, "dq": 1e-2, "dk": 0.3, "dv": 1e-2})])
    assert bad_grad["path"] == "xla" and bad_grad["reasons"] == [
        "head_dim 64 (padded to 64): dk relative error 3.00e-01 > 2.20e-02 (2x XLA bf16's + 0.002)"
    ]
    nan = probe.attention_verdict([_case(float("nan"))])
    assert nan["path"] == "xla" and len(nan["reasons"]) == 4
    inf = probe.attention_verdict([_case(1e-2, finite=False)])
    assert inf["reasons"] == ["head_dim 64 (padded to 64): cuDNN gave non-finite values"]
    err = probe.attention_verdict([{"head_dim": 52, "padded_to": 56, "error": "XlaRuntimeError: no kernel"}])
    assert err["reasons"] == ["head_dim 52 (padded to 56): cuDNN did not run: XlaRuntimeError: no kernel"]
    assert probe.attention_verdict([])["path"] == "xla"  # nothing tested: never trust cuDNN blindly


# -- plans, budgets, arguments ---------------------------------------------------------------------------


def test_plans_and_the_readme_budget_table_agree():
    import sections

    readme = (ROOT / "scripts" / "gpu" / "README.md").read_text()
    for secs in plan.PLANS.values():
        for s in secs:
            assert callable(getattr(sections, f"section_{s.key}")), s.key
            assert 0 < s.min_s <= s.budget_s
        assert [s.key for s in secs][0] == "env"  # every later section needs its verdict and micro-batches
    for s in plan.HEADLINE:  # scripts/gpu/README.md's budget table states the same seconds
        assert re.search(rf"\| {re.escape(s.title)} \| \*\*{s.budget_s}\*\* \|", readme), s.title
    assert f"**{plan.total_budget('headline')}**" in readme


@pytest.mark.parametrize(
    "args,message",
    [
        (["--plan", "all"], "error: argument --plan: invalid choice: 'all' (choose from "),  # quoting varies
        (["--budget", "10"], "error: argument --budget: expected an integer in [30, 3600], got '10'"),
        (["--sections", "env,gpu"], "error: argument --sections: expected section keys from "),
        (["--sections", "optim"], "error: --sections optim: not in plan headline (env, gpt2, peer, run, fgpt)"),
        (["--books", "/no/such/book.txt"], "error: --books /no/such/book.txt: not a file"),
    ],
)
def test_bad_arguments_one_line(tmp_path, args, message):
    r = _check("--out", str(tmp_path), *args)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line == message or (message.endswith("from ") and line.startswith(message))
    assert not list(tmp_path.iterdir())  # nothing written before the checks pass


def _args(tmp_path, *extra):
    a = check.parser().parse_args(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), *extra])
    a.budget, a.name = a.budget or plan.total_budget(a.plan), "t"
    return argparse.Namespace(**vars(a))


@pytest.mark.slow
def test_section_deadline_cuts_and_budget_refuses(tmp_path):
    c = check.Check(_args(tmp_path, "--wheels", str(tmp_path / "none")))
    ran = c.proc("echo", ["echo", "hello"])
    assert ran["rc"] == 0 and ran["tail"] == "hello"
    c.current = {"title": "t"}
    c.section_deadline = time.monotonic() + 8
    t0 = time.monotonic()
    cut = c.proc("sleep", ["sleep", "60"])  # killed at the section's deadline, not after 60 s
    assert cut["rc"] == "cut" and time.monotonic() - t0 < 30 and c.current["cut"]
    assert c.failed(cut).startswith("cut at the section's deadline")
    c.section_deadline = time.monotonic() + 2  # too little left to start anything
    assert c.proc("echo", ["echo", "hello"])["skipped"].startswith("not run")
    c.log.close()


def test_what_does_not_fit_is_reported_not_run(tmp_path):
    c = check.Check(_args(tmp_path, "--wheels", str(tmp_path / "none")))
    c.deadline = time.monotonic() + 3  # less than any section's minimum: nothing starts
    c.run_plan()
    c.log.close()
    report = (tmp_path / "out" / "t.md").read_text()
    for s in plan.HEADLINE:
        assert "**Did not fit**: not run: " in report.split(f"## {s.title}")[1].split("## ")[0]
    assert "Did not fit: " + "; ".join(s.title for s in plan.HEADLINE) + "." in report
    assert "(rc=" not in (tmp_path / "out" / "t.log").read_text()  # no subprocess was started


def _wheel(directory: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (PEP 427): one module and its dist-info."""
    path = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VALUE = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return path


def test_wheels_are_installed_for_the_subprocesses(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_probe_pkg", "1.2.3")
    c = check.Check(_args(tmp_path, "--wheels", str(wheels)))
    r = c.python("import", ["-c", "import gpucheck_probe_pkg as p; print(p.VALUE, p.__file__)"])
    c.log.close()
    assert r["rc"] == 0, r["out"]
    value, where = r["out"].split()
    assert value == "1.2.3" and where.startswith(str(tmp_path / "work" / "site"))
    assert any(n.startswith("Installed gpucheck_probe_pkg 1.2.3 into ") for n in c.setup_notes)


# -- the PyTorch peer ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_peer_is_our_model_and_our_optimizer_split():
    """The peer's GPT-2, given our parameters, computes our loss (float32, CPU): the same architecture, so
    its tokens/s compares like with like. Its Muon parameters are exactly the ones optim.py labels muon."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import torch_peer
    from flax import nnx

    from fgpt_jax.model import GPT, GPTConfig, param_name
    from fgpt_jax.optim import param_labels

    cfg = GPTConfig.preset("fgpt", n_layer=2, n_embd=104, n_head=2, block_size=32, attention="xla")  # head_dim 52
    model = GPT(cfg, rngs=nnx.Rngs(3))
    params = nnx.state(model, nnx.Param)
    flat = {param_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    tm = torch_peer.build_model(cfg)
    assert sum(p.numel() for p in tm.parameters()) == cfg.num_params()

    def ours(name: str) -> str:  # torch's dotted names -> our paths (Linear weights are (out, in))
        name = name.replace(".", "/").replace("/weight", "/kernel")
        name = re.sub(r"(ln_\d|ln_f)/kernel", r"\1/scale", name)
        return name.replace("wte/kernel", "wte/embedding").replace("wpe/kernel", "wpe/embedding")

    state = {}
    for n, _ in tm.named_parameters():
        v = flat[ours(n)]
        linear = n.endswith("weight") and v.ndim == 2 and not n.startswith(("wte", "wpe"))
        state[n] = torch.from_numpy(np.array(v.T if linear else v))
    tm.load_state_dict(state, strict=False)  # lm_head.weight is wte.weight (tied)
    assert set(map(ours, torch_peer.hidden_matrices(tm))) == {
        param_name(p) for p, lab in jax.tree_util.tree_flatten_with_path(param_labels(params))[0] if lab == "muon"
    }
    tokens = np.random.default_rng(0).integers(0, 50257, (3, cfg.block_size + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with jax.default_matmul_precision("float32"):
        ref = float(optax.softmax_cross_entropy_with_integer_labels(model(jnp.asarray(x)), jnp.asarray(y)).mean())
    with torch.no_grad():
        got = float(tm(torch.from_numpy(x), torch.from_numpy(y)))
    assert abs(got - ref) < 1e-4 * ref, (got, ref)
