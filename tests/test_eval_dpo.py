"""`python -m fgpt_jax.eval dpo`: the trainer's val metrics by default, any preference file with --data
(recomputed here with transformers from the runs' Hugging Face exports), one-line errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from fgpt_jax import sharding as shd
from fgpt_jax.checkpoint import save_model
from fgpt_jax.config import DPOConfig, apply_overrides, load_config, resolve_config
from fgpt_jax.data.preferences import Pair, build_preference_data
from fgpt_jax.data.sources import DataError
from fgpt_jax.eval.dpo import REFERENCE_FILE, Reference, read_reference
from fgpt_jax.model import GPT
from fgpt_jax.train import train

# End to end (trained runs, subprocesses, servers): the full suite runs it, the fast lane does not.
pytestmark = pytest.mark.slow

DEMO = Path(__file__).parent / "data" / "dpo_en_demo_first120.json"
MODEL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=64"]
SHORT = [
    ("What is 2 + 2?", "4.", "I am not sure, maybe 5."),
    ("Say hello.", "Hello!", "No."),
    ("Name a colour.", "Blue.", "Sure! I'd be happy to help. A colour is a property of light."),
    ("Capital of France?", "Paris.", "London."),
    ("Is water wet?", "Yes, in the everyday sense.", "Cheese."),
    ("Count to three.", "1, 2, 3.", "3, 2, 1."),
    ("Spell cat.", "C-A-T.", "K-A-T."),
    ("Is the sky green?", "No, it is usually blue.", "Yes."),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny model saved untrained (the reference) and 4 DPO steps from it."""
    base, dpo = tmp_path_factory.mktemp("base") / "run", tmp_path_factory.mktemp("dpo")
    cfg = apply_overrides(load_config("tiny"), MODEL)
    save_model(base, GPT(cfg.model, rngs=nnx.Rngs(0)), cfg)
    last = train(
        resolve_config(
            "dpo",
            [
                f"init_from={base}",
                f"data.path={DEMO}",
                "data.limit=60",
                "data.max_prompt_tokens=32",
                "data.max_response_tokens=32",
                "data.val_fraction=0.3",
                "dpo.beta=0.5",
                "train.steps=4",
                "train.batch_size=4",
                "train.eval_every=4",
                "train.log_every=1",
                "train.ckpt_every=0",
                "train.sample_tokens=2",
                "optim.lr=3e-3",
                "optim.warmup_steps=1",
            ],
        ),
        dpo,
    )
    return base, dpo, last


LONG = ("Tell me a story.", "Once " * 80, "Twice " * 80)  # longer than the 64-token context: skipped


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "conversations": [{"from": "human", "value": q}],
                    "chosen": {"from": "gpt", "value": c},
                    "rejected": {"from": "gpt", "value": r},
                }
            )
            + "\n"
            for q, c, r in SHORT + [LONG]
        )
    )
    return path


def _eval(*args):
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.eval", "dpo", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r


def test_default_is_the_trainers_val_metrics(runs, pairs_file):
    base, dpo, last = runs
    r = _eval("--run", dpo, "--ref", base)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["task"] == "dpo" and out["step"] == 4 and out["ref_step"] == 0 and out["beta"] == 0.5
    keys = (
        "dpo/loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    )
    for k in keys:  # the same batches, the same program
        assert out[k] == pytest.approx(last[f"val/{k}"], rel=1e-6, abs=1e-7), k
    assert out["rewards/margin"] != 0 and out["pairs"] > 5
    assert out["loaded"] == 60 and out["data"] == str(DEMO)
    saved = json.loads((dpo / "eval.jsonl").read_text().splitlines()[-1])
    assert saved["dpo/loss"] == out["dpo/loss"]
    same = json.loads(_eval("--run", base, "--ref", base, "--data", pairs_file, "--limit", 5).stdout.splitlines()[-1])
    assert same["pairs"] == 5 and same["rewards/margin"] == same["rewards/accuracy"] == 0  # policy = reference
    assert same["dpo/loss"] == pytest.approx(math.log(2), rel=1e-7)


def test_data_file_matches_transformers(runs, pairs_file, tmp_path):
    """The numbers a user would get from the two runs' Hugging Face exports with transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fgpt_jax.checkpoint import load_model
    from fgpt_jax.hf import to_hf

    base, dpo, _ = runs
    r = _eval("--run", dpo, "--ref", base, "--data", pairs_file, "--batch-size", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["pairs"] == len(SHORT) and out["dropped_too_long"] == 1 and out["seq_len"] == 64

    logps = {}
    for name, run in (("ref", base), ("policy", dpo)):
        model, cfg = load_model(run)
        hf_dir = to_hf(model, cfg, tmp_path / f"hf-{name}")
        m = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        end = tok.convert_tokens_to_ids("<|end|>")
        values = []
        for q, *replies in SHORT:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
            )
            prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
            for reply in replies:
                ids = prompt + tok(reply)["input_ids"] + [end]
                with torch.no_grad():
                    logits = m(torch.tensor([ids])).logits[0].double()
                lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                values.append(float(lp[len(prompt) - 1 :].sum()))  # the reply's tokens and its <|end|>
        logps[name] = np.asarray(values).reshape(-1, 2)
    beta = out["beta"]
    chosen = beta * (logps["policy"][:, 0] - logps["ref"][:, 0])
    rejected = beta * (logps["policy"][:, 1] - logps["ref"][:, 1])
    want = {
        "dpo/loss": np.mean(np.logaddexp(0.0, -(chosen - rejected))),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).mean(),
        "logps/chosen": logps["policy"][:, 0].mean(),
        "logps/rejected": logps["policy"][:, 1].mean(),
    }
    for k, v in want.items():
        assert out[k] == pytest.approx(v, rel=1e-4, abs=2e-4), (k, out[k], v)


def test_bad_input_is_one_line(runs, tmp_path):
    base, dpo, _ = runs
    r = _eval("--run", dpo)
    assert r.returncode == 2 and "--ref" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _eval("--run", dpo, "--ref", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {tmp_path / 'nope'}") and r.stderr.count("\n") == 1
    r = _eval("--run", base, "--ref", base)  # a pretrained run has no preference pairs of its own
    assert r.returncode == 2 and r.stderr == (
        f"error: --run {base}: trained on tokens data, not preference pairs; pass --data FILE\n"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                    "chosen": "B",
                    "rejected": "C",
                }
            ]
        )
    )
    r = _eval("--run", dpo, "--ref", base, "--data", bad)
    assert (
        r.returncode == 2
        and r.stderr.startswith(f"error: {bad}: record 0: the conversation must end with a user turn")
        and r.stderr.count("\n") == 1
    )
    r = subprocess.run(
        [sys.executable, "-m", "fgpt_jax.eval", "val", "--run", str(dpo)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "fgpt_jax.eval dpo --run" in r.stderr and r.stderr.count("\n") == 1


def test_reference_is_scored_once_and_read_back(runs, tmp_path):
    base, _, _ = runs
    mesh = shd.make_mesh()
    rows = build_preference_data([Pair((("user", q),), c, r) for q, c, r in SHORT], 64, val_fraction=0).train
    ref = Reference(tmp_path, str(base), DPOConfig(), mesh, batch_pairs=3, reuse=True)  # nothing to reuse yet
    logps = ref(rows)
    assert logps.shape == (16,) and (logps < 0).all() and "16 rows scored with" in ref.notes[-1]
    assert not (tmp_path / REFERENCE_FILE).exists()  # nothing is written before save()
    ref.release()
    ref.save()
    arrays, meta = read_reference(tmp_path / REFERENCE_FILE)
    assert meta == {"init_from": str(base), "step": 0} and list(arrays) == [rows.content_hash]
    np.testing.assert_array_equal(arrays[rows.content_hash], logps)
    saved = (tmp_path / REFERENCE_FILE).read_bytes()
    # The file names its source model: another init_from is refused (the fix: delete it, score again)
    with pytest.raises(DataError) as e:
        Reference(tmp_path, str(tmp_path / "gone"), DPOConfig(), mesh, 3, reuse=True)
    assert str(e.value) == (
        f"{tmp_path / REFERENCE_FILE}: scored with init_from {base} step 0, but this run's reference is init_from "
        f"{tmp_path / 'gone'} step 0; delete it and resume again: the reference is then scored again with "
        f"init_from {tmp_path / 'gone'} step 0"
    )
    again = Reference(tmp_path, str(base), DPOConfig(), mesh, 3, reuse=True)
    np.testing.assert_array_equal(again(rows), logps)
    assert "log-probs of 16 rows read from" in again.notes[-1]
    again.save()
    assert (tmp_path / REFERENCE_FILE).read_bytes() == saved  # nothing new: not rewritten
    fresh = Reference(tmp_path, str(base), DPOConfig(), mesh, 3, reuse=False)  # a fresh start scores again
    np.testing.assert_array_equal(fresh(rows), logps)
    (tmp_path / REFERENCE_FILE).write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"reference_logps.npz: unreadable \(.*\); delete it and resume again"):
        Reference(tmp_path, str(base), DPOConfig(), mesh, 3, reuse=True)
