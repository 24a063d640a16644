"""DPO: the loss against a float64 reference, its gradient against finite differences, zero gradient on
masked tokens, and preference tuning through the trainer: SFT -> DPO on the real pairs,
exact resume after SIGTERM, the chat CLI on the result."""

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hostdevices import device_flags

from fgpt_jax import optim
from fgpt_jax import sharding as shd
from fgpt_jax.checkpoint import load_model
from fgpt_jax.config import ConfigError, DPOConfig, apply_overrides, load_config, resolve_config
from fgpt_jax.data import PreferenceBatch
from fgpt_jax.data.loader import Rows
from fgpt_jax.data.preferences import build_preference_data, load_pairs, val_pairs
from fgpt_jax.data.sources import DataError
from fgpt_jax.eval.dpo import REFERENCE_FILE, dpo_eval_step, read_reference, row_logps
from fgpt_jax.loss import DPO_METRICS, dpo_losses, dpo_objective, sequence_logps
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.optim import OptimConfig
from fgpt_jax.train import TrainingError, train
from fgpt_jax.train.step import init_train_state, make_train_step

# End to end (trained runs, subprocesses, servers): the full suite runs it, the fast lane does not.
pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
DEMO = DATA / "dpo_en_demo_first120.json"
LN2 = math.log(2.0)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- the loss --------------------------------------------------------------------------------------
def _reference_losses(pc, pr, rc, rr, beta, eps, kind):
    """DPO / cDPO / IPO in float64 numpy, written from the papers' formulas."""
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
    if kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    return loss, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("beta,eps,kind", [(0.1, 0.0, "sigmoid"), (0.5, 0.2, "sigmoid"), (0.1, 0.0, "ipo")])
def test_dpo_losses_match_the_formulas(beta, eps, kind):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.uniform(-300, -20, 64).astype(np.float32) for _ in range(4))
    got = dpo_losses(pc, pr, rc, rr, beta, eps, kind)
    for g, want in zip(got, _reference_losses(pc, pr, rc, rr, beta, eps, kind)):
        np.testing.assert_allclose(np.asarray(g), want, rtol=2e-5, atol=2e-5)
    same = dpo_losses(pc, pr, pc, pr, beta, eps, kind)  # policy = reference
    want0 = LN2 if kind == "sigmoid" else 1 / (4 * beta**2)
    np.testing.assert_allclose(np.asarray(same[0]), want0, rtol=1e-6)
    assert not np.asarray(same[1]).any() and not np.asarray(same[2]).any()


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer GPT and a batch of 3 real pairs (and one padding pair), T = 32."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    data = build_preference_data(
        load_pairs(str(DEMO), limit=12), 32, max_prompt_tokens=12, max_response_tokens=16, truncate=True, val_fraction=0
    )
    assert data.train.num_records >= 3
    rows = Rows(data.train.tokens[:6], data.train.mask[:6], 3)
    mesh = shd.make_mesh()
    eval_step = dpo_eval_step(graphdef, DPOConfig(beta=0.1), mesh)
    logps = row_logps(eval_step, params, rows, 4, mesh)  # the reference pass of a DPO run
    (batch,) = val_pairs(rows, logps, batch_pairs=4, pad_id=50256)
    return graphdef, params, batch, eval_step


def _mean_loss(graphdef, objective, params, batch):
    loss_sum, count, metric_sums = objective.sums(nnx.merge(graphdef, params), batch)
    return loss_sum / count, count, metric_sums


def test_loss_is_ln2_and_rewards_zero_when_policy_is_reference(tiny):
    """Scored by the program validation runs (as the reference was): exactly; by the train step's
    objective (another XLA program): up to float rounding."""
    graphdef, params, batch, eval_step = tiny
    loss_sum, count, sums, logps = eval_step(params, batch)
    assert float(count) == 3  # the padding pair counts for nothing
    assert float(loss_sum) / 3 == pytest.approx(LN2, rel=1e-7)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert float(sums[k]) == 0.0, k
    np.testing.assert_array_equal(np.asarray(logps), np.asarray(batch.ref_logp))
    assert float(sums["logps/chosen"]) / 3 < -10  # summed over each reply's tokens
    loss, _, sums = _mean_loss(graphdef, dpo_objective(0.1), params, batch)
    assert float(loss) == pytest.approx(LN2, abs=1e-6) and abs(float(sums["rewards/margin"])) < 1e-4


def test_loss_gradient_matches_the_analytic_one():
    """d loss / d log pi in float32 against the closed form in float64 (the chain rule's first link)."""
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.uniform(-60, -20, 16).astype(np.float32) for _ in range(4))
    for beta, eps, kind in ((0.5, 0.2, "sigmoid"), (0.1, 0.0, "ipo")):
        gc, gr = jax.grad(lambda a, b: jnp.sum(dpo_losses(a, b, rc, rr, beta, eps, kind)[0]), argnums=(0, 1))(pc, pr)
        h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
        sig = lambda x: 1 / (1 + np.exp(-x))
        if kind == "ipo":
            want = 2 * (h - 1 / (2 * beta))
        else:
            want = -beta * (1 - eps) * sig(-beta * h) + beta * eps * sig(beta * h)
        np.testing.assert_allclose(np.asarray(gc), want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gr), -want, rtol=1e-4, atol=1e-6)


def test_gradient_equals_finite_differences(tiny):
    """Through the whole tiny model: central differences along the gradient and along random unit
    directions over all parameters (eps 0.3 moves each parameter by ~2e-4: a step large enough for
    float32 on a loss whose log-probs are sums over many tokens, small enough to stay linear)."""
    graphdef, params, batch, _ = tiny
    # Move the reference away from the policy so every pair has its own, non-symmetric loss.
    shift = jnp.asarray([0.0, 0.0, 3.0, -2.0, -1.0, 1.5, 0.0, 0.0], jnp.float32)
    batch = batch._replace(ref_logp=batch.ref_logp + shift)
    leaves, treedef = jax.tree.flatten(params)
    unit = lambda tree: jax.tree.map(lambda x: x / optax.tree.norm(tree), tree)
    for objective in (dpo_objective(0.5, label_smoothing=0.1), dpo_objective(0.1, loss_type="ipo")):
        f = jax.jit(lambda p: _mean_loss(graphdef, objective, p, batch)[0])
        grads = jax.grad(f)(params)
        keys = jax.random.split(jax.random.key(0), 2 * len(leaves)).reshape(2, len(leaves))
        directions = [unit(grads)] + [
            unit(jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)]))
            for ks in keys
        ]
        for i, u in enumerate(directions):
            eps = 1e-3 if i == 0 else 0.3  # along the gradient the loss moves fast: stay in its linear range
            fd = (
                f(jax.tree.map(lambda p, d: p + eps * d, params, u))
                - f(jax.tree.map(lambda p, d: p - eps * d, params, u))
            ) / (2 * eps)
            analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(u)))
            assert float(fd) == pytest.approx(float(analytic), rel=1e-2 if i == 0 else 4e-2), (objective, i)


def test_masked_tokens_get_zero_gradient(tiny):
    """Prompt and padding positions (mask 0) get no gradient, every reply token does."""
    graphdef, params, batch, _ = tiny
    logits = nnx.merge(graphdef, params)(batch.tokens[:, :-1])
    ref = batch.ref_logp.reshape(-1, 2) + jnp.asarray([[1.0, -1.0]])

    def loss(logits):
        logps = sequence_logps(logits, batch.tokens, batch.mask).reshape(-1, 2)
        return jnp.sum(dpo_losses(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], 0.1)[0][:3])

    per_position = np.abs(np.asarray(jax.grad(loss)(logits))).sum(-1)
    mask = np.asarray(batch.mask)
    assert (mask == 0).sum() > 50 and (per_position[mask == 0] == 0).all()
    assert (per_position[:6][mask[:6] == 1] > 0).all()


def _sgd_steps(tiny, accum, steps=2):
    graphdef, params, batch, _ = tiny
    ocfg = OptimConfig(name="adamw", warmup_steps=1)
    tx = optax.sgd(1.0)  # the update is the gradient: accumulation must give the same one
    state = init_train_state(nnx.merge(graphdef, jax.tree.map(jnp.array, params)), tx, 0)  # the step donates it
    step = make_train_step(
        graphdef, tx, functools.partial(optim.learning_rates, ocfg, 10), objective=dpo_objective(0.1)
    )
    shift = jnp.asarray([0.0, 0.0, 3.0, -2.0, -1.0, 1.5, 0.0, 0.0], jnp.float32)
    b = PreferenceBatch(
        *(jnp.asarray(x).reshape(accum, -1, *x.shape[1:]) for x in (batch.tokens, batch.mask, batch.ref_logp + shift))
    )
    out = []
    for _ in range(steps):
        state, m = step(state, b)
        out.append({k: float(v) for k, v in m.items()})
    return state, out


def test_train_step_accumulation_equals_one_batch(tiny):
    """2 micro-batches of 2 pairs (one of them padding) == one batch of 4: same metrics, same update."""
    s1, m1 = _sgd_steps(tiny, 1)
    s2, m2 = _sgd_steps(tiny, 2)
    for a, b in zip(m1, m2):
        assert set(a) >= {"train/loss", "grad_norm", *DPO_METRICS}
        assert a["train/loss"] == a["dpo/loss"]
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


# -- through the trainer: SFT -> DPO on the real pairs ----------------------------------------------
MODEL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=64"]
DPO = [
    f"data.path={DEMO}",
    "data.max_prompt_tokens=32",
    "data.max_response_tokens=32",
    "data.val_fraction=0.2",
    "train.batch_size=8",
    "train.log_every=5",
    "train.ckpt_every=0",
    "train.sample_tokens=4",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny model, instruction-tuned: DPO's starting point. Its base is a random initialisation saved
    as a run (what `init_from` reads), not a pretraining run: 20 pretraining steps cost this file 15-20 s
    of the suite and change nothing DPO is tested for."""
    from fgpt_jax.checkpoint import save_model

    base, sft = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("sft")
    cfg = apply_overrides(load_config("tiny"), MODEL)
    save_model(base, GPT(cfg.model, rngs=nnx.Rngs(0)), cfg)
    train(
        resolve_config(
            "sft",
            [
                f"init_from={base}",
                f"data.path={DATA / 'instruction-examples.json'}",
                "data.max_prompt_tokens=0",
                "data.max_response_tokens=0",
                "train.steps=30",
                "train.batch_size=8",
                "train.eval_every=0",
                "train.ckpt_every=0",
                "train.sample_tokens=4",
                "optim.lr=2e-3",
                "optim.warmup_steps=2",
            ],
        ),
        sft,
    )
    return sft


def dpo_config(sft, *extra):
    return resolve_config("dpo", [f"init_from={sft}", *DPO, *extra])


@pytest.fixture(scope="module")
def dpo_run(sft_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("dpo")
    per_step = {}
    last = train(
        dpo_config(sft_run, "train.steps=40", "train.eval_every=20"),
        run,
        on_step=lambda step, values: per_step.__setitem__(step, values),
    )
    return run, last, per_step


def test_dpo_run_learns_the_preferences(dpo_run, sft_run):
    run, last, per_step = dpo_run
    rows = read_metrics(run)
    val = {r["step"]: r for r in rows if "val/dpo/loss" in r}
    assert sorted(val) == [0, 20, 40]
    # step 0, policy = reference: scored by the same program as the reference, so exactly
    assert val[0]["val/dpo/loss"] == val[0]["val/loss"] == pytest.approx(LN2, rel=1e-7)
    assert all(val[0][f"val/rewards/{k}"] == 0 for k in ("chosen", "rejected", "margin", "accuracy"))
    # step 1's train metrics are taken before its update, by the train step's own program: ln 2 up to rounding
    assert per_step[1]["train/loss"] == pytest.approx(LN2, abs=1e-5) and abs(per_step[1]["rewards/margin"]) < 1e-3
    accuracy = np.mean([per_step[s]["rewards/accuracy"] for s in range(21, 41)])
    assert accuracy > 0.8, accuracy  # well above chance on the pairs it trains on
    assert val[40]["val/rewards/margin"] > 0, val[40]  # and it generalises to held-out pairs
    logged = [r for r in rows if "train/loss" in r]
    assert {
        "dpo/loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "tokens_per_sec",
    } <= set(logged[-1])
    assert all(r["dpo/loss"] == r["train/loss"] for r in logged)
    assert last["step"] == 40 and last["val/rewards/margin"] == val[40]["val/rewards/margin"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"{p}{k}" for p in ("", "val/") for k in DPO_METRICS} <= tags
    # the reference: scored once at the start, stored with the run
    arrays, meta = read_reference(run / REFERENCE_FILE)
    log = (run / "train.log").read_text()
    pairs = {k: int(log.split(f"{k}_pairs ")[1].split(",")[0]) for k in ("train", "val")}
    assert sorted(a.shape[0] for a in arrays.values()) == sorted(2 * n for n in pairs.values())
    assert meta == {"init_from": str(sft_run), "step": 30}
    assert log.count("rows scored with") == 2 and "40 steps x 8 pairs" in log
    assert load_config_of(run).data.format == "preference"


def load_config_of(run):
    from fgpt_jax.config import load_run_config

    return load_run_config(run)


def _dpo_values(run):
    """Every logged number but timings and text, by step."""
    values: dict = {}
    for r in read_metrics(run):
        timing_or_text = ("tokens_per_sec", "mfu", "samples")
        values.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in timing_or_text})
    return values


SHORT = [
    "data.limit=48",
    "train.batch_size=4",
    "train.steps=6",
    "train.eval_every=3",
    "train.ckpt_every=3",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def straight(sft_run, tmp_path_factory):
    """6 DPO steps on 48 records, uninterrupted: what the resumed and the 2-device runs must reproduce."""
    run = tmp_path_factory.mktemp("straight")
    train(dpo_config(sft_run, *SHORT), run)
    return run


def test_sigterm_then_resume_is_exact(sft_run, straight, tmp_path):
    """As for pretraining: stop by SIGTERM, resume, and every number and parameter matches the straight
    run; the reference log-probs are read back, not scored again."""
    cfg = dpo_config(sft_run, *SHORT)
    run = tmp_path / "stopped"

    def sigterm_at_2(step, _):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    partial = train(cfg, run, on_step=sigterm_at_2)
    assert partial["stopped_by_signal"] == signal.SIGTERM and 2 <= partial["step"] < 6
    reference = (run / REFERENCE_FILE).read_bytes()
    train(cfg, run, resume=True)
    assert _dpo_values(run) == _dpo_values(straight)
    for a, b in zip(
        jax.tree.leaves(nnx.state(load_model(straight)[0], nnx.Param)),
        jax.tree.leaves(nnx.state(load_model(run)[0], nnx.Param)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (run / REFERENCE_FILE).read_bytes() == reference
    log = (run / "train.log").read_text()
    assert log.count("rows scored with") == 2 and log.count(f"rows read from {run / REFERENCE_FILE}") == 2


# -- the reference file on --resume: one line naming it and what to do ------------------------------
def _copy_run(run, to):
    import shutil

    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def _files(run):
    """Every file's bytes but the writer lock's (RUN/.lock, taken before any check: it holds the pid)."""
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def _rewrite_reference(run, change_arrays=None, change_meta=None):
    """Rewrite RUN/reference_logps.npz through numpy, its arrays or meta changed."""
    path = run / REFERENCE_FILE
    with np.load(path) as z:
        items = {k: z[k] for k in z.files}
    meta = json.loads(str(items.pop("meta")))
    arrays = {k: v.copy() for k, v in items.items()}
    if change_arrays:
        change_arrays(arrays)
    if change_meta:
        meta = change_meta(meta)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def test_cli_resume_with_a_truncated_reference_file_is_one_line(straight, tmp_path):
    run = _copy_run(straight, tmp_path / "run")
    ref = run / REFERENCE_FILE
    ref.write_bytes(ref.read_bytes()[: ref.stat().st_size // 2])
    before = _files(run)
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.train", "--run", str(run), "--resume", "--config.train.steps=8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith(f"error: {ref}: unreadable (") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "delete it and resume again" in r.stderr and f"{sft_step_of(straight)}" in r.stderr, r.stderr
    assert _files(run) == before  # nothing written


def sft_step_of(run):
    return read_reference(run / REFERENCE_FILE)[1]["step"]


def _shift_train_rows(arrays):
    key = max(arrays, key=lambda k: arrays[k].shape[0])  # the train rows: the larger table
    arrays[key] = arrays[key] + np.float32(0.5)


def _nan(arrays):
    key = next(iter(arrays))
    arrays[key][3] = np.nan


@pytest.mark.parametrize(
    "change_arrays,change_meta,match",
    [
        # other numbers for the train rows than the run trained with
        (_shift_train_rows, None, r"its log-probs of the \d+ train rows differ from the ones this run trained with"),
        (_nan, None, r"holds 1 non-finite log-prob \(NaN or inf\)"),
        # scored with another checkpoint of init_from than the run's reference model
        (
            None,
            lambda m: {**m, "step": 20},
            r"scored with init_from .* step 20, but this run's reference is .* step 30",
        ),
        (None, lambda m: {**m, "init_from": "/elsewhere/sft"}, r"scored with init_from /elsewhere/sft step 30"),
    ],
)
def test_resume_refuses_a_reference_file_that_does_not_belong(straight, tmp_path, change_arrays, change_meta, match):
    run = _copy_run(straight, tmp_path / "run")
    _rewrite_reference(run, change_arrays, change_meta)
    before = _files(run)
    cfg = dataclasses.replace(load_config_of(run), train=dataclasses.replace(load_config_of(run).train, steps=8))
    with pytest.raises(DataError, match=match) as e:
        train(cfg, run, resume=True)
    msg = str(e.value)
    assert msg.startswith(f"{run / REFERENCE_FILE}: ") and "\n" not in msg, msg
    assert "delete it and resume again" in msg, msg  # the fix
    assert _files(run) == before  # nothing written


def test_resume_after_deleting_the_reference_scores_it_again(straight, tmp_path):
    """The fix the errors give: without the file, --resume scores the reference again with the run's
    reference model (the checkpoint records which), gets the same numbers and continues."""
    run = _copy_run(straight, tmp_path / "run")
    original = read_reference(run / REFERENCE_FILE)
    (run / REFERENCE_FILE).unlink()
    cfg = load_config_of(run)
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=7)), run, resume=True)
    arrays, meta = read_reference(run / REFERENCE_FILE)
    assert meta == original[1] and arrays.keys() == original[0].keys()
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], original[0][k])
    assert read_metrics(run)[-1]["step"] == 7


def test_dpo_needs_a_starting_run_and_checks_its_knobs(tmp_path):
    cfg = apply_overrides(load_config("tiny"), ["data.format=preference", f"data.path={DEMO}"])
    with pytest.raises(TrainingError, match=r"data.format=preference \(DPO\): set init_from=RUN_DIR"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(ConfigError, match=r"DPOConfig: beta=0.0 must be a finite number > 0"):
        apply_overrides(load_config("dpo"), ["dpo.beta=0"])
    with pytest.raises(ConfigError, match="label_smoothing applies to loss 'sigmoid' only"):
        apply_overrides(load_config("dpo"), ["dpo.loss=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"--config.dpo.loss=hinge: expected one of sigmoid, ipo"):
        apply_overrides(load_config("dpo"), ["dpo.loss=hinge"])


def test_cli_bad_preference_file_is_one_line(sft_run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {"prompt": "Q", "chosen": "A", "rejected": "B"},
                {"conversations": [{"from": "human", "value": "Q"}], "rejected": {"from": "gpt", "value": "A"}},
            ]
        )
    )
    run = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.train",
            "--config",
            "dpo",
            f"--config.init_from={sft_run}",
            f"--config.data.path={bad}",
            "--run",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr == f"error: {bad}: record 1: missing 'chosen'\n", r.stderr[-2000:]
    assert not run.exists()


def test_chat_takes_the_dpo_run_as_instruction_tuned(dpo_run):
    run = dpo_run[0]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.chat",
            "--run",
            str(run),
            "--prompt",
            "Hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]  # no "not instruction-tuned" note


@pytest.mark.slow
def test_two_devices_and_accumulation_match_one_batch(sft_run, straight, tmp_path):
    """Pairs split over 2 devices and 2 micro-batches (their reference log-probs with them) give the
    numbers of one device and one batch."""
    two = tmp_path / "two"
    overrides = [f"init_from={sft_run}", *DPO, *SHORT, "train.grad_accum=2"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgpt_jax.train",
            "--config",
            "dpo",
            "--run",
            str(two),
            *[f"--config.{o}" for o in overrides],
        ],
        env=dict(os.environ, XLA_FLAGS=device_flags(2)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 x 2 pairs x 2 x 64), 2 device(s)" in (two / "train.log").read_text()
    a, b = _dpo_values(straight), _dpo_values(two)
    assert sorted(a) == sorted(b) == list(range(7)) and "val/rewards/margin" in a[6] and "rewards/margin" in a[6]
    for step in a:
        for k, v in a[step].items():
            if k != "step":
                assert b[step][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (step, k)
