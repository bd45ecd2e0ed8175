"""Batches from in-memory arrays: shuffling, padding with a mask, prefetching.

The order of an epoch depends only on ``(key, epoch)``: the permutation is
``jax.random.permutation(jax.random.fold_in(key, epoch), n)``, so a run
resumed at epoch ``e`` sees exactly the batches it would have seen. Slicing
happens in numpy on the host; :func:`prefetch_to_device` overlaps the transfer
to the device with the computation.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from fnn.model.options import choice, integer, positive_int
from fnn.training.accumulate import leading_size

_REMAINDERS = ("drop", "pad", "keep")


def num_batches(n: int, batch_size: int, remainder: str = "drop") -> int:
    """How many batches :func:`batches` yields for ``n`` examples.

    Args:
      n: the number of examples.
      batch_size: examples per batch.
      remainder: ``"drop"`` (floor), or ``"pad"`` / ``"keep"`` (ceiling).

    Returns:
      The number of batches per epoch.

    Raises:
      ValueError: for a non-positive ``batch_size``, a negative ``n`` or an
        unknown ``remainder``.

    Examples:
      >>> import fnn
      >>> fnn.data.num_batches(10, 4), fnn.data.num_batches(10, 4, "pad")
      (2, 3)
    """
    _check(n, batch_size, remainder)
    return n // batch_size if remainder == "drop" else -(-n // batch_size)


def _check(n: int, batch_size: int, remainder: str) -> None:
    positive_int("batches", "batch_size", batch_size)
    if n < 0:
        raise ValueError(f"batches: the number of examples must be >= 0, got {n!r}.")
    choice("batches", "remainder", remainder, _REMAINDERS)


def batches(
    arrays: Any,
    batch_size: int,
    *,
    key: jax.Array | None = None,
    epoch: int = 0,
    shuffle: bool = True,
    remainder: str = "drop",
) -> Iterator[Any]:
    """Yields batches of one epoch over a pytree of equal-length arrays.

    Args:
      arrays: a pytree (usually a dict) of numpy or jax arrays sharing the
        leading size ``n``; they are copied to the host once.
      batch_size: examples per batch.
      key: a ``jax.random.key``; required when ``shuffle`` is true.
      epoch: the epoch number; the order is a permutation drawn from
        ``jax.random.fold_in(key, epoch)``.
      shuffle: whether to permute the examples.
      remainder: what to do with the last ``n % batch_size`` examples:
        ``"drop"`` them (every batch full: one compiled shape), ``"keep"`` a
        smaller last batch (a second compiled shape), or ``"pad"`` the last
        batch to ``batch_size`` by repeating examples of the epoch. With
        ``"pad"``, ``arrays`` must be a dict without a ``"mask"`` key, and
        every batch gains ``batch["mask"]``, a bool array of shape
        ``(batch_size,)`` that is ``False`` exactly on the padding rows; a
        loss that applies it (``fnn.losses.sum_and_weight``) gives exact
        means.

    Returns:
      An iterator over pytrees of the structure of ``arrays`` holding numpy
      arrays with leading size ``batch_size`` (or less for a kept remainder).

    Raises:
      ValueError: at the call (not at the first batch) for a bad
        ``batch_size`` or ``remainder``, a missing key,
        arrays of different leading sizes, or ``"pad"`` with non-dict arrays.

    Examples:
      >>> import jax, numpy as np, fnn
      >>> data = {"x": np.arange(5)}
      >>> [b["x"].tolist() for b in fnn.data.batches(data, 2, shuffle=False)]
      [[0, 1], [2, 3]]
      >>> last = list(fnn.data.batches(data, 2, shuffle=False, remainder="pad"))[-1]
      >>> last["x"].tolist(), last["mask"].tolist()
      ([4, 0], [True, False])
      >>> key = jax.random.key(0)
      >>> a = [b["x"].tolist() for b in fnn.data.batches(data, 5, key=key)]
      >>> a == [b["x"].tolist() for b in fnn.data.batches(data, 5, key=key)]
      True
    """
    n = leading_size(arrays, "arrays")
    _check(n, batch_size, remainder)
    if shuffle and key is None:
        raise ValueError(
            "batches: shuffle=True needs a key, e.g. key=jax.random.key(0); "
            "or pass shuffle=False."
        )
    if remainder == "pad" and (not isinstance(arrays, dict) or "mask" in arrays):
        raise ValueError(
            "batches: remainder='pad' needs a dict of arrays without a 'mask' key, "
            "since each batch gains batch['mask'] marking the real rows."
        )
    host = jax.tree.map(np.asarray, arrays)
    if shuffle:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    else:
        order = np.arange(n)
    return _epoch(host, order, batch_size, remainder)


def _epoch(host: Any, order: np.ndarray, batch_size: int, remainder: str):
    n = len(order)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        real = len(idx)
        if real < batch_size and remainder == "drop":
            return
        if remainder == "pad":
            # fill with the epoch's first rows (valid values, masked out)
            idx = np.concatenate([idx, np.resize(order, batch_size - real)])
        batch = jax.tree.map(lambda x, idx=idx: np.take(x, idx, axis=0), host)
        if remainder == "pad":
            batch["mask"] = np.arange(batch_size) < real
        yield batch


def stream(
    arrays: Any,
    batch_size: int,
    *,
    key: jax.Array | None = None,
    shuffle: bool = True,
    remainder: str = "drop",
    start: int = 0,
) -> Iterator[Any]:
    """Batches of epoch after epoch, endlessly, from the ``start``-th batch.

    Epoch ``e`` is :func:`batches` with ``epoch=e``; the stream starts at
    batch ``start % per_epoch`` of epoch ``start // per_epoch``. This is how
    :func:`fnn.fit` resumes exactly: the position in the stream is the number
    of steps taken.

    Raises:
      ValueError: as :func:`batches`, or when an epoch has no batch.

    Examples:
      >>> import numpy as np, fnn
      >>> s = fnn.data.stream({"x": np.arange(5)}, 2, shuffle=False, start=1)
      >>> [next(s)["x"].tolist() for _ in range(3)]
      [[2, 3], [0, 1], [2, 3]]
    """
    n = leading_size(arrays, "arrays")
    per_epoch = num_batches(n, batch_size, remainder)
    if per_epoch == 0:
        raise ValueError(
            f"stream: {n} examples give no batch of {batch_size} with "
            f"remainder={remainder!r}; use a smaller batch_size."
        )
    epoch, skip = divmod(integer("stream", "start", start, minimum=0), per_epoch)
    while True:
        it = batches(
            arrays,
            batch_size,
            key=key,
            epoch=epoch,
            shuffle=shuffle,
            remainder=remainder,
        )
        yield from itertools.islice(it, skip, None)
        epoch, skip = epoch + 1, 0


def stack(batches: Iterable[Any], k: int) -> Iterator[Any]:
    """Groups ``k`` consecutive batches into one with a leading axis ``k``.

    This feeds ``make_train_step(..., steps_per_call=k)``. A final group of
    fewer than ``k`` batches is dropped; choose ``k`` dividing
    :func:`num_batches` to use every batch.

    Args:
      batches: an iterable of batches of the same structure and shapes.
      k: batches per group.

    Yields:
      Pytrees of numpy arrays of shape ``(k, batch_size, ...)``.

    Raises:
      ValueError: for a non-positive ``k``.

    Examples:
      >>> import numpy as np, fnn
      >>> bs = fnn.data.batches({"x": np.arange(12)}, 2, shuffle=False)
      >>> [b["x"].shape for b in fnn.data.stack(bs, 3)]
      [(3, 2), (3, 2)]
    """
    k = positive_int("stack", "k", k)
    it = iter(batches)
    while group := list(itertools.islice(it, k)):
        if len(group) < k:
            return
        yield jax.tree.map(lambda *xs: np.stack(xs), *group)


def prefetch_to_device(
    iterator: Iterable[Any], size: int = 2, sharding: Any = None
) -> Iterator[Any]:
    """Keeps ``size`` batches in flight to the device ahead of the consumer.

    ``jax.device_put`` is asynchronous, so while the step runs on batch ``i``
    the next ``size - 1`` batches are already being copied.

    Args:
      iterator: an iterable of pytrees of host arrays.
      size: how many batches to keep on the device (``>= 1``).
      sharding: passed to ``jax.device_put`` (e.g. a ``NamedSharding`` that
        splits the batch over devices); ``None`` means the default device.

    Yields:
      The same batches, as device arrays, in order.

    Raises:
      ValueError: for ``size < 1``.

    Examples:
      >>> import numpy as np, fnn
      >>> bs = fnn.data.batches({"x": np.arange(6)}, 2, shuffle=False)
      >>> [type(b["x"]).__name__ for b in fnn.data.prefetch_to_device(bs)]
      ['ArrayImpl', 'ArrayImpl', 'ArrayImpl']
    """
    size = positive_int("prefetch_to_device", "size", size)
    queue: collections.deque = collections.deque()
    it = iter(iterator)
    for batch in it:
        queue.append(jax.device_put(batch, sharding))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
