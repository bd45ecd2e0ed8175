"""Tests of fnn.data: order from (key, epoch), coverage, padding masks, stacking."""

import jax
import numpy as np
import pytest

import fnn
from fnn import data

N = 23


def _arrays(n=N):
    return {"x": np.arange(n), "y": np.arange(n, dtype=np.float32).reshape(n, 1) * 2}


def _ids(batches):
    return [b["x"].tolist() for b in batches]


def test_order_is_determined_by_key_and_epoch():
    key = jax.random.key(4)
    a = _ids(data.batches(_arrays(), 5, key=key, epoch=3))
    assert a == _ids(data.batches(_arrays(), 5, key=key, epoch=3))
    assert a != _ids(data.batches(_arrays(), 5, key=key, epoch=4))
    assert a != _ids(data.batches(_arrays(), 5, key=jax.random.key(5), epoch=3))
    # the order is the permutation drawn from fold_in(key, epoch)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 3), N))
    assert sum(a, []) == perm[:20].tolist()


@pytest.mark.parametrize("remainder", ["drop", "pad", "keep"])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 23, 30])
def test_every_example_once_per_epoch(remainder, batch_size):
    bs = list(
        data.batches(_arrays(), batch_size, key=jax.random.key(0), remainder=remainder)
    )
    assert len(bs) == data.num_batches(N, batch_size, remainder)
    seen = []
    for b in bs:
        # rows stay aligned across leaves
        np.testing.assert_array_equal(b["y"][:, 0], 2 * b["x"].astype(np.float32))
        real = b["mask"] if remainder == "pad" else np.ones(len(b["x"]), bool)
        seen += b["x"][real].tolist()
        if remainder != "keep":
            assert len(b["x"]) == batch_size
    assert len(seen) == len(set(seen))
    if remainder == "drop":
        assert len(seen) == (N // batch_size) * batch_size
    else:
        assert sorted(seen) == list(range(N))


def test_pad_mask_marks_exactly_the_padding():
    bs = list(data.batches(_arrays(), 10, shuffle=False, remainder="pad"))
    assert [b["mask"].sum() for b in bs] == [10, 10, 3]
    assert all(b["mask"].dtype == bool and b["mask"].shape == (10,) for b in bs)
    np.testing.assert_array_equal(bs[-1]["mask"], np.arange(10) < 3)
    np.testing.assert_array_equal(bs[-1]["x"][:3], [20, 21, 22])
    # padding rows hold valid examples of the epoch (here its first rows)
    np.testing.assert_array_equal(bs[-1]["x"][3:], np.arange(7))
    # fewer examples than one batch
    (only,) = data.batches({"x": np.arange(3)}, 8, shuffle=False, remainder="pad")
    np.testing.assert_array_equal(only["mask"], np.arange(8) < 3)


def test_keep_gives_a_smaller_last_batch_and_jax_inputs_work():
    arrays = jax.tree.map(jax.numpy.asarray, _arrays())
    bs = list(data.batches(arrays, 10, shuffle=False, remainder="keep"))
    assert [len(b["x"]) for b in bs] == [10, 10, 3]
    assert isinstance(bs[0]["x"], np.ndarray)


def test_errors():
    with pytest.raises(ValueError, match="needs a key"):
        data.batches(_arrays(), 4)  # raised at the call, not at the first batch
    with pytest.raises(ValueError, match="batch_size to be a positive int"):
        next(data.batches(_arrays(), 0, shuffle=False))
    with pytest.raises(ValueError, match="remainder to be one of"):
        next(data.batches(_arrays(), 4, shuffle=False, remainder="wrap"))
    with pytest.raises(ValueError, match="share the leading size"):
        next(data.batches({"x": np.ones(3), "y": np.ones(4)}, 2, shuffle=False))
    with pytest.raises(ValueError, match="without a 'mask' key"):
        data.batches(
            {**_arrays(), "mask": np.ones(N)}, 4, shuffle=False, remainder="pad"
        )
    with pytest.raises(ValueError, match="dict of arrays"):
        next(data.batches((np.ones(3),), 2, shuffle=False, remainder="pad"))
    with pytest.raises(ValueError, match="k to be a positive int"):
        next(data.stack([], 0))
    with pytest.raises(ValueError, match="size to be a positive int"):
        next(data.prefetch_to_device([], 0))


def test_stream_continues_across_epochs_from_any_position():
    key = jax.random.key(0)
    arrays = _arrays()
    epochs = [list(data.batches(arrays, 4, key=key, epoch=e)) for e in range(3)]
    flat = [b for epoch in epochs for b in epoch]
    for start in (0, 3, len(epochs[0]) + 1):
        s = data.stream(arrays, 4, key=key, start=start)
        got = [next(s) for _ in range(len(flat) - start)]
        for a, b in zip(got, flat[start:]):
            np.testing.assert_array_equal(a["x"], b["x"])
    with pytest.raises(ValueError, match="give no batch"):
        next(data.stream(arrays, N + 1, shuffle=False))


def test_num_batches():
    assert data.num_batches(10, 3) == 3
    assert data.num_batches(10, 3, "pad") == data.num_batches(10, 3, "keep") == 4
    assert data.num_batches(9, 3, "pad") == 3
    assert data.num_batches(0, 3, "pad") == 0


def test_stack_groups_consecutive_batches_and_drops_the_tail():
    bs = list(data.batches(_arrays(), 2, shuffle=False))  # 11 batches
    stacked = list(data.stack(bs, 3))
    assert len(stacked) == 3
    assert stacked[1]["x"].shape == (3, 2)
    assert stacked[1]["y"].shape == (3, 2, 1)
    np.testing.assert_array_equal(stacked[1]["x"], np.arange(6, 12).reshape(3, 2))


@pytest.mark.parametrize("size", [1, 2, 5])
def test_prefetch_keeps_order_and_puts_on_device(size):
    bs = list(data.batches(_arrays(), 4, shuffle=False))
    out = list(data.prefetch_to_device(iter(bs), size))
    assert len(out) == len(bs)
    for host, dev in zip(bs, out):
        assert isinstance(dev["x"], jax.Array)
        np.testing.assert_array_equal(np.asarray(dev["x"]), host["x"])


def test_prefetch_runs_ahead_by_size_minus_one():
    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield {"x": np.full(2, i)}

    it = data.prefetch_to_device(source(), 3)
    first = next(it)
    assert int(first["x"][0]) == 0
    assert pulled == [0, 1, 2]  # two more batches already sent to the device


def test_data_is_reachable_from_fnn():
    assert fnn.data.batches is data.batches
