"""Checkpoints: exact round trip, a failed or interrupted save never shadows the last good one,
and restoring into another model shape names the parameters that differ."""

import errno

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from fgpt_jax.checkpoint import CheckpointError, Checkpoints, load_model, save_model
from fgpt_jax.config import Config, save_config
from fgpt_jax.model import GPT, GPTConfig
from fgpt_jax.optim import OptimConfig, make_optimizer
from fgpt_jax.train.step import init_train_state

CFG = GPTConfig.preset("tiny", n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=512)


def _state(cfg=CFG, seed=0):
    tx = make_optimizer(OptimConfig(), 10)
    return init_train_state(GPT(cfg, rngs=nnx.Rngs(seed)), tx, seed)


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_roundtrip_and_load_model(tmp_path):
    state = _state()
    ck = Checkpoints(tmp_path / "checkpoints")
    ck.save(7, state, {"step": 7}, val_loss=3.5)
    ck.close()
    ck = Checkpoints(tmp_path / "checkpoints")
    restored, data = ck.restore(7, _abstract(state))
    ck.close()
    assert data == {"step": 7}
    assert _equal(restored, state) and int(restored.step) == 0
    save_config(Config(model=CFG), tmp_path / "config.json")
    model, cfg = load_model(tmp_path)
    assert cfg.model == CFG
    assert _equal(nnx.state(model, nnx.Param), state.params)


def test_keep_last_and_best(tmp_path):
    state = _state()
    ck = Checkpoints(tmp_path / "c", keep_last=2)
    for step, val in [(1, 2.0), (2, 3.0), (3, None), (4, 4.0), (5, 5.0)]:
        ck.save(step, state, {}, val_loss=val)
    ck.poll(wait=True)
    assert ck.steps() == [1, 4, 5]  # the best val loss (step 1) survives the last-2 policy
    ck.close()


def test_interrupted_save_is_never_restored(tmp_path):
    state = _state()
    ck = Checkpoints(tmp_path / "checkpoints")
    ck.save(1, state, {})
    ck.close()
    # What a crash mid-save leaves behind: orbax's temporary directory, half written.
    tmp = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000000000"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "garbage").write_bytes(b"\0" * 10)
    save_config(Config(model=CFG), tmp_path / "config.json")
    ck = Checkpoints(tmp_path / "checkpoints")
    assert ck.steps() == [1] and ck.latest_step() == 1
    ck.close()
    model, _ = load_model(tmp_path)
    assert _equal(nnx.state(model, nnx.Param), state.params)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk while saving: the save fails loudly and the previous checkpoint stays restorable."""
    state = _state()
    ck = Checkpoints(tmp_path / "checkpoints", keep_last=1)
    ck.save(1, state, {"step": 1})
    ck.poll(wait=True)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full)
    later = state.replace(step=jnp.ones((), jnp.int32))
    with pytest.raises(Exception, match="No space left"):
        ck.save(2, later, {"step": 2})
        ck.poll(wait=True)
    monkeypatch.undo()
    ck2 = Checkpoints(tmp_path / "checkpoints")
    assert ck2.steps() == [1]
    restored, data = ck2.restore(1, _abstract(state))
    ck2.close()
    assert data == {"step": 1} and _equal(restored.params, state.params)


def test_restore_into_other_shape_names_parameters(tmp_path):
    ck = Checkpoints(tmp_path / "checkpoints")
    ck.save(1, _state(), {})
    ck.poll(wait=True)
    wider = _state(GPTConfig.preset("tiny", n_layer=1, n_embd=64, n_head=2, block_size=16, vocab_size=512))
    with pytest.raises(CheckpointError) as e:
        ck.restore(1, _abstract(wider))
    msg = str(e.value)
    assert (
        "does not fit this model config" in msg
        and "h/0/attn/c_attn/kernel: checkpoint (32, 96) vs model (64, 192)" in msg
    )
    deeper = _state(GPTConfig.preset("tiny", n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=512))
    with pytest.raises(CheckpointError, match="h/1/.*checkpoint missing vs model"):
        ck.restore(1, _abstract(deeper))
    ck.close()


def test_load_model_errors(tmp_path):
    save_config(Config(model=CFG), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path)
    ck = Checkpoints(tmp_path / "checkpoints")
    ck.save(3, _state(), {})
    ck.close()
    with pytest.raises(CheckpointError, match=r"--step 5: not in .* \(available: 3\)"):
        load_model(tmp_path, step=5)


def test_save_model_params_only(tmp_path):
    model = GPT(CFG, rngs=nnx.Rngs(3))
    save_model(tmp_path / "run", model, Config(model=CFG), step=5, meta={"source": "test"})
    loaded, cfg = load_model(tmp_path / "run")
    assert cfg.model == CFG
    assert _equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        save_model(tmp_path / "run", model, Config(model=CFG))


def test_readers_leave_a_save_in_progress_alone(tmp_path):
    """Evaluating a run while it trains must not clean up the trainer's unfinished save."""
    state = _state()
    ck = Checkpoints(tmp_path / "checkpoints")
    ck.save(1, state, {})
    ck.close()
    save_config(Config(model=CFG), tmp_path / "config.json")
    in_flight = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000000000"
    in_flight.mkdir()
    load_model(tmp_path)
    from fgpt_jax.rundir import RunDir

    assert RunDir(tmp_path).checkpoint_steps() == [1]
    assert in_flight.is_dir()
