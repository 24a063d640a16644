"""Loaders (grain): random token windows, rows of a fixed table, fixed validation batches."""

import json

import numpy as np
import pytest

import fgpt_jax.data.loader as loader_mod
from fgpt_jax.data.loader import RowLoader, Rows, WindowLoader, val_rows, val_windows
from fgpt_jax.data.shards import ShardError, ShardSet

T = 15  # windows of 16 tokens
N = 3 * 1000 + 7  # token value == stream position, so a window is identified by its first token


@pytest.fixture
def shards():
    stream = np.arange(N, dtype=np.uint16)
    # Unequal shards so some windows cross shard boundaries.
    parts = [stream[:1000], stream[1000:1003], stream[1003:]]
    return ShardSet(path="mem", split="train", manifest={}, arrays=parts, files=[])


def _starts(batch):
    if hasattr(batch, "mask"):
        assert batch.mask.shape == (batch.tokens.shape[0], T) and (batch.mask == 1).all()
        batch = batch.tokens
    assert batch.dtype == np.int32 and batch.shape[1] == T + 1
    # Every row is a contiguous run of the stream: gather across shards is exact.
    np.testing.assert_array_equal(batch - batch[:, :1], np.broadcast_to(np.arange(T + 1), batch.shape))
    return batch[:, 0].tolist()


def test_gather_matches_stream(shards):
    starts = np.array([0, 990, 999, 1000, 1002, N - T - 1])
    np.testing.assert_array_equal(shards.gather(starts, T + 1), starts[:, None] + np.arange(T + 1))
    with pytest.raises(IndexError):
        shards.gather(np.array([N - T]), T + 1)


def test_deterministic_and_seed_dependent(shards):
    a = WindowLoader(shards, T, 8, seed=3)
    b = WindowLoader(shards, T, 8, seed=3)
    c = WindowLoader(shards, T, 8, seed=4)
    batches_a = [next(a).tokens for _ in range(5)]
    for k, x in enumerate(batches_a):
        np.testing.assert_array_equal(x, next(b).tokens)
        np.testing.assert_array_equal(x, a.batch(k).tokens)  # the iterator is the pure function of (seed, step)
    assert any(not np.array_equal(x, next(c).tokens) for x in batches_a)


@pytest.mark.parametrize("table", [True, False], ids=["numpy-table", "grain-index_shuffle"])
def test_each_epoch_is_a_permutation_of_shifted_windows(shards, monkeypatch, table):
    if not table:
        monkeypatch.setattr(loader_mod, "TABLE_MAX_ITEMS", 0)
    s = WindowLoader(shards, T, 8, seed=1, prefetch=0)
    W = s.windows_per_epoch
    assert W == (N - T) // (T + 1)
    offsets = set()
    for epoch in range(3):
        starts = s.window_starts(np.arange(epoch * W, (epoch + 1) * W)).tolist()
        o = s.epoch_offset(epoch)
        assert 0 <= o <= T
        assert len(set(starts)) == W  # no window twice in an epoch
        assert sorted(starts) == [o + j * (T + 1) for j in range(W)]  # every window of the epoch once
        offsets.add(o)
    assert len(offsets) > 1  # boundaries move between epochs
    # Batches that straddle an epoch boundary take the tail of one epoch and the head of the next.
    steps = -(-2 * W // 8)
    seen = [x for k in range(steps) for x in _starts(s.batch(k))]
    assert seen[:W] == s.window_starts(np.arange(W)).tolist()


def test_resume_from_saved_state(shards):
    ref = WindowLoader(shards, T, 8, seed=7)
    expected = [next(ref).tokens for _ in range(12)]
    a = WindowLoader(shards, T, 8, seed=7, prefetch=4)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.get_state()))  # goes into a checkpoint as JSON
    assert state["step"] == 5 and len(json.dumps(state)) < 400
    b = WindowLoader(shards, T, 8, seed=7, prefetch=2)
    b.set_state(state)
    for k in range(5, 12):
        np.testing.assert_array_equal(next(b).tokens, expected[k])
    with pytest.raises(ValueError, match="seed"):
        WindowLoader(shards, T, 8, seed=8).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        WindowLoader(shards, T, 16, seed=7).set_state(state)


def test_process_slices_partition_the_global_batch(shards):
    full = WindowLoader(shards, T, 12, seed=5)
    procs = [WindowLoader(shards, T, 12, seed=5, process_index=p, process_count=4) for p in range(4)]
    for _ in range(4):
        g = next(full).tokens
        parts = [next(p).tokens for p in procs]
        assert all(x.shape == (3, T + 1) for x in parts)
        np.testing.assert_array_equal(np.concatenate(parts), g)
        starts = [set(_starts(x)) for x in parts]
        assert all(not (starts[i] & starts[j]) for i in range(4) for j in range(i + 1, 4))
    # Restoring on a different process count continues the same global batches.
    state = full.get_state()
    p1 = WindowLoader(shards, T, 12, seed=5, process_index=1, process_count=2)
    p1.set_state(state)
    np.testing.assert_array_equal(next(p1).tokens, next(full).tokens[6:])


def test_bad_arguments(shards):
    with pytest.raises(ValueError, match="must be positive and divisible by process_count 4"):
        WindowLoader(shards, T, 10, process_count=4)
    with pytest.raises(ValueError, match="too few"):
        WindowLoader(shards, N, 4)


def test_out_of_vocabulary_token_stops_with_file_and_position():
    """Issue 13.6: a corrupt id trained on until the loss went NaN; now the batch that reads it fails,
    naming the shard file and the token's position in it, also through grain's prefetch threads."""
    stream = np.arange(N, dtype=np.uint16) % 1000
    stream[2500] = 60_000  # in the third shard, which starts at 1003
    parts = [stream[:1000], stream[1000:1003], stream[1003:]]
    bad = ShardSet(
        path="corpus", split="train", manifest={}, arrays=parts, files=["a.npy", "b.npy", "c.npy"], vocab_size=50_261
    )
    for prefetch in (0, 2):
        loader = WindowLoader(bad, T, 8, seed=0, prefetch=prefetch)
        read = 0
        with pytest.raises(
            ShardError,
            match=r"^c\.npy: token 60000 at position 1497 is not below the vocabulary "
            r"size 50261 \(corrupt shard",
        ):
            for _ in range(loader.windows_per_epoch // 8 + 1):  # one epoch covers every position
                next(loader)
                read += 1
        assert read < loader.windows_per_epoch // 8 + 1
    with pytest.raises(ShardError, match="c.npy: token 60000 at position 1497"):
        val_windows(bad, T, 8, num_windows=10**6)
    stream[2500] = 50_260  # the last id is fine
    assert len(val_windows(bad, T, 8, num_windows=10**6)) > 0


def test_val_windows_fixed_and_disjoint(shards):
    a = [b.tokens for b in val_windows(shards, T, 8, num_windows=50)]
    b = [b.tokens for b in val_windows(shards, T, 8, num_windows=50)]
    assert len(a) == 6 and all(x.shape == (8, T + 1) for x in a)  # 50 rounded down to whole batches
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    starts = [s for x in a for s in _starts(x)]
    assert len(set(starts)) == 48 and all(s % (T + 1) == 0 for s in starts)  # non-overlapping
    assert max(starts) > N // 2  # spread over the split, not only its head
    capped = val_windows(shards, T, 8, num_windows=10**6)
    assert sum(len(x.tokens) for x in capped) == (N // (T + 1)) // 8 * 8
    halves = [val_windows(shards, T, 8, 50, process_index=p, process_count=2) for p in range(2)]
    for k in range(len(a)):
        np.testing.assert_array_equal(np.concatenate([halves[0][k].tokens, halves[1][k].tokens]), a[k])


def test_first_row_continues_another_loaders_stream(shards):
    """A loader started at `first_row` reads exactly the rows its source would have read next,
    whatever its own batch size (the warm-restart contract)."""
    src = WindowLoader(shards, T, 8, seed=2)
    for _ in range(3):
        next(src)
    later = [next(src).tokens for _ in range(3)]  # rows 24..47 of the stream
    cont = WindowLoader(shards, T, 4, seed=2, first_row=src.rows_read(3))
    got = np.concatenate([next(cont).tokens for _ in range(6)])
    np.testing.assert_array_equal(got, np.concatenate(later))
    state = cont.get_state()
    assert state["first_row"] == 24
    with pytest.raises(ValueError, match="first_row"):
        WindowLoader(shards, T, 4, seed=2).set_state(state)


# -- RowLoader (rows of a fixed table: SFT) -----------------------------------------------------
def _split(n_rows: int, T: int = 7) -> Rows:
    # Row r holds r everywhere, so a batch names its rows.
    tokens = np.repeat(np.arange(n_rows, dtype=np.int32)[:, None], T + 1, 1)
    return Rows(tokens=tokens, mask=(tokens[:, 1:] % 2).astype(np.float32), num_records=n_rows)


def test_row_loader_deterministic_and_each_epoch_a_permutation():
    split = _split(10)
    a, b, c = RowLoader(split, 4, seed=3), RowLoader(split, 4, seed=3), RowLoader(split, 4, seed=4)
    batches = [next(a) for _ in range(10)]  # 40 rows = 4 epochs
    for k, (x, m) in enumerate(batches):
        assert x.shape == (4, 8) and x.dtype == np.int32 and m.shape == (4, 7) and m.dtype == np.float32
        np.testing.assert_array_equal(m, (x[:, 1:] % 2).astype(np.float32))
        np.testing.assert_array_equal(x, next(b)[0])
        np.testing.assert_array_equal(x, a.batch(k)[0])
    rows = np.concatenate([x[:, 0] for x, _ in batches])
    epochs = rows.reshape(4, 10)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(10))
    assert len({tuple(e) for e in epochs}) > 1  # a fresh permutation each epoch
    assert any(not np.array_equal(x, next(c)[0]) for x, _ in batches)


def test_row_loader_fewer_rows_than_batch_wraps():
    s = RowLoader(_split(3), 8, seed=0, prefetch=0)
    rows = np.concatenate([next(s)[0][:, 0] for _ in range(3)])  # 24 rows = 8 epochs of 3
    for e in rows.reshape(8, 3):
        assert sorted(e.tolist()) == [0, 1, 2]


def test_row_loader_resume_is_exact_and_refuses_other_data():
    split = _split(13)
    straight = RowLoader(split, 4, seed=1)
    ref = [next(straight)[0] for _ in range(9)]
    first = RowLoader(split, 4, seed=1)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state["step"] == 5
    resumed = RowLoader(split, 4, seed=1)
    resumed.set_state(state)
    for k in range(5, 9):
        np.testing.assert_array_equal(next(resumed)[0], ref[k])
    other = _split(13)
    other.mask[0, 0] = 1 - other.mask[0, 0]  # same shape, different content
    for loader in (
        RowLoader(other, 4, seed=1),
        RowLoader(_split(14), 4, seed=1),
        RowLoader(split, 4, seed=2),
        RowLoader(split, 8, seed=1),
    ):
        with pytest.raises(ValueError, match="chat data state"):
            loader.set_state(state)


def test_row_loader_process_slices_make_the_global_batch():
    split = _split(11)
    full = RowLoader(split, 6, seed=2)
    parts = [RowLoader(split, 6, seed=2, process_index=p, process_count=3) for p in range(3)]
    for _ in range(4):
        x, m = next(full)
        xs = [next(p) for p in parts]
        assert all(px.shape == (2, 8) for px, _ in xs)
        np.testing.assert_array_equal(np.concatenate([px for px, _ in xs]), x)
        np.testing.assert_array_equal(np.concatenate([pm for _, pm in xs]), m)
    with pytest.raises(ValueError):
        RowLoader(split, 5, process_count=2)
    with pytest.raises(ValueError, match="no rows"):
        RowLoader(_split(0), 4)


def test_val_rows_fixed_shape_zero_mask_padding(tok):
    split = _split(10)
    batches = val_rows(split, 4, 50256)
    assert len(batches) == 3 and all(x.shape == (4, 8) and m.shape == (4, 7) for x, m in batches)
    x = np.concatenate([b[0] for b in batches])
    m = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(x[:10], split.tokens)
    np.testing.assert_array_equal(m[:10], split.mask)
    assert (x[10:] == tok.eot_id).all() and (m[10:] == 0).all()
    halves = [val_rows(split, 4, 50256, process_index=p, process_count=2) for p in range(2)]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][k][0], halves[1][k][0]]), batches[k][0])
    assert val_rows(_split(0), 4, 50256) == []
