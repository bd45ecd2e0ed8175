"""Checkpoints of a whole training state, on Orbax.

:class:`Checkpointer` saves any pytree of arrays (a :class:`fnn.TrainState`:
step, params, optimizer state, running state and PRNG key) together with a small
JSON-able ``metadata`` dict (where the data stream stood, the history so far)
under ``directory/<step>/``. It is a thin layer over
``orbax.checkpoint.CheckpointManager`` that adds what a training loop needs:

* typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and
  rewrapped with the target's implementation on restore;
* the saved tree's leaf paths, shapes and dtypes are recorded, so a restore into
  a structure that does not match fails with a ``ValueError`` that names the
  first differing path (or the leaf and both shapes) instead of an error from
  deep inside Orbax;
* writes are atomic: Orbax writes into a temporary directory and renames it when
  complete, so a checkpoint half-written by a crash is never taken as the latest.

Nothing is pickled: arrays go to Orbax's tensorstore format, metadata to JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["Checkpointer"]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(leaf: Any) -> str:
    """The PRNG implementation's name of a key array or of an abstract one."""
    if isinstance(leaf, jax.Array):
        return str(jax.random.key_impl(leaf))
    for name in ("threefry2x32", "rbg", "unsafe_rbg"):  # a ShapeDtypeStruct
        if jax.random.key(0, impl=name).dtype == leaf.dtype:
            return name
    raise ValueError(f"Checkpointer: unknown PRNG key type {leaf.dtype}.")


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _entry_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _describe_leaves(tree: Any) -> tuple[list[dict[str, Any]], list[Any], Any]:
    """Returns ``(records, leaves, treedef)``; a record is path, shape, dtype."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    records, leaves = [], []
    for path, leaf in with_path:
        record = {"path": jax.tree_util.keystr(path), "entries": []}
        record["entries"] = [_entry_name(e) for e in path] or ["value"]
        if _is_key(leaf):
            record.update(
                shape=list(leaf.shape),
                dtype="prng_key",
                impl=_key_impl(leaf),
            )
        else:
            record.update(shape=list(np.shape(leaf)), dtype=str(_dtype(leaf)))
        records.append(record)
        leaves.append(leaf)
    return records, leaves, treedef


def _nest(records: list[dict[str, Any]], values: list[Any]) -> dict[str, Any]:
    """Builds the nested dict of string keys that Orbax stores."""
    nested: dict[str, Any] = {}
    for record, value in zip(records, values):
        *parents, last = record["entries"]
        node = nested
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or last in node:
            raise ValueError(
                f"Checkpointer: the leaf at {record['path']} has the same storage "
                f"name as another leaf; rename one of the keys."
            )
        node[last] = value
    return nested


def _unnest(nested: dict[str, Any], records: list[dict[str, Any]]) -> list[Any]:
    values = []
    for record in records:
        node = nested
        for name in record["entries"]:
            node = node[name]
        values.append(node)
    return values


def _to_storable(leaf: Any) -> Any:
    if _is_key(leaf):
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array | np.ndarray) else np.asarray(leaf)


def _abstract(leaf: Any) -> Any:
    """What Orbax should restore for a target leaf (raw data for a key)."""
    sharding = getattr(leaf, "sharding", None)
    if _is_key(leaf):
        raw = jax.eval_shape(jax.random.key_data, leaf)
        if isinstance(sharding, NamedSharding):  # the key's spec, and the key data
            spec = P(*sharding.spec, *[None] * (raw.ndim - len(sharding.spec)))
            sharding = NamedSharding(sharding.mesh, spec)
        return jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(leaf), _dtype(leaf), sharding=sharding)


def _check_match(where: str, saved: list[dict], wanted: list[dict]) -> None:
    saved_paths = [r["path"] for r in saved]
    wanted_paths = [r["path"] for r in wanted]
    if saved_paths != wanted_paths:
        saved_set, wanted_set = set(saved_paths), set(wanted_paths)
        for path in wanted_paths:
            if path not in saved_set:
                raise ValueError(
                    f"{where} does not match the target structure: the target has "
                    f"a leaf at {path} that the checkpoint lacks."
                )
        for path in saved_paths:
            if path not in wanted_set:
                raise ValueError(
                    f"{where} does not match the target structure: the checkpoint "
                    f"has a leaf at {path} that the target lacks."
                )
        first = next(a for a, b in zip(wanted_paths, saved_paths) if a != b)
        raise ValueError(
            f"{where} does not match the target structure: the leaves are in a "
            f"different order, first at {first}."
        )
    for s, w in zip(saved, wanted):
        if s["shape"] != w["shape"] or s["dtype"] != w["dtype"]:
            raise ValueError(
                f"{where} does not match the target at {w['path']}: the checkpoint "
                f"has shape {tuple(s['shape'])!r} and dtype {s['dtype']}, the "
                f"target has shape {tuple(w['shape'])!r} and dtype {w['dtype']}."
            )
        if s.get("impl") != w.get("impl"):
            raise ValueError(
                f"{where} does not match the target at {w['path']}: the checkpoint "
                f"holds a {s.get('impl')!r} PRNG key, the target a {w.get('impl')!r}."
            )


class Checkpointer:
    """Saves and restores a training state and its metadata under a directory.

    Each checkpoint is a directory ``<directory>/<step>`` holding the tree's
    arrays (Orbax's tensorstore format) and a JSON file with the metadata and
    the tree's leaf paths, shapes and dtypes. Only the ``max_to_keep`` most
    recent checkpoints are kept. Saving is asynchronous (arrays are copied off
    the device before :meth:`save` returns, files are written in the
    background); :meth:`wait`, :meth:`restore` and :meth:`close` wait for
    pending writes. Use it as a context manager, or call :meth:`close`.

    Args:
      directory: where checkpoints live; created if missing. Relative paths are
        made absolute (Orbax requires it).
      max_to_keep: how many of the latest checkpoints to keep; ``None`` keeps all.
      async_save: write files in a background thread (the default); ``False``
        makes :meth:`save` return only once the checkpoint is complete on disk.

    Raises:
      ValueError: for a ``max_to_keep`` that is not a positive integer or None.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, fnn
      >>> tree = {"w": jnp.ones((2, 3)), "key": jax.random.key(0)}
      >>> with fnn.Checkpointer(tempfile.mkdtemp()) as ckpt:
      ...     ckpt.save(10, tree, metadata={"epoch": 1})
      ...     restored, meta = ckpt.restore(tree)
      ...     ckpt.latest_step()
      10
      >>> restored["w"].shape, meta
      ((2, 3), {'epoch': 1})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        if max_to_keep is not None and (
            not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(
                f"Checkpointer: expected max_to_keep to be a positive int or "
                f"None, got {max_to_keep!r}."
            )
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r})"

    def save(self, step: int, tree: Any, *, metadata: Mapping | None = None) -> None:
        """Saves ``tree`` and ``metadata`` as the checkpoint for ``step``.

        Args:
          step: a non-negative integer naming the checkpoint; a later step
            counts as more recent.
          tree: a pytree of arrays (typed PRNG keys included).
          metadata: a JSON-able dict restored alongside the tree.

        Raises:
          TypeError: when ``metadata`` cannot be written as JSON.
          ValueError: when a checkpoint for ``step`` already exists.
        """
        records, leaves, _ = _describe_leaves(tree)
        meta = {"metadata": dict(metadata or {}), "leaves": records}
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(
                f"Checkpointer.save: metadata must be JSON-able (dicts, lists, str, "
                f"numbers, bool, None): {e}."
            ) from None
        step = int(step)
        if step in self._manager.all_steps():
            raise ValueError(
                f"Checkpointer.save: {self.directory} already holds a checkpoint for "
                f"step {step}."
            )
        arrays = _nest(records, [_to_storable(leaf) for leaf in leaves])
        self._manager.save(
            step,
            args=ocp.args.Composite(
                tree=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the most recent complete checkpoint, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all complete checkpoints, in increasing order."""
        return sorted(self._manager.all_steps())

    def _step(self, step: int | None, caller: str) -> int:
        self._manager.wait_until_finished()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"Checkpointer.{caller}: no checkpoint in {self.directory}."
                )
        elif int(step) not in self._manager.all_steps():
            raise FileNotFoundError(
                f"Checkpointer.{caller}: no checkpoint for step {step} in "
                f"{self.directory}; it holds steps {self.all_steps()!r}."
            )
        return int(step)

    def _read_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return restored.meta

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The metadata saved with ``step`` (the latest by default).

        Raises:
          FileNotFoundError: when there is no such checkpoint.
        """
        return self._read_meta(self._step(step, "metadata"))["metadata"]

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the checkpoint for ``step`` (the latest by default).

        Args:
          target: a pytree with the structure, shapes and dtypes of the saved
            tree (e.g. a freshly created ``TrainState``, or its abstract form
            from ``jax.eval_shape``, which allocates nothing); its arrays'
            shardings say where the restored arrays go. Its values are not
            used.
          step: which checkpoint; ``None`` means the latest.

        Returns:
          ``(tree, metadata)``: the saved tree, in ``target``'s structure, and
          the saved metadata dict.

        Raises:
          FileNotFoundError: when there is no such checkpoint.
          ValueError: when ``target`` does not match the saved tree; the message
            names the first differing leaf path, or the leaf and both shapes.
        """
        step = self._step(step, "restore")
        meta = self._read_meta(step)
        records, leaves, treedef = _describe_leaves(target)
        where = f"The checkpoint for step {step} in {self.directory}"
        _check_match(where, meta["leaves"], records)
        abstract = _nest(records, [_abstract(leaf) for leaf in leaves])
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(tree=ocp.args.StandardRestore(abstract)),
        )
        values = _unnest(restored.tree, records)
        out = []
        for record, leaf, value in zip(records, leaves, values):
            if _is_key(leaf):
                value = jax.random.wrap_key_data(value, impl=record["impl"])
            elif isinstance(leaf, bool | int | float) and not isinstance(
                leaf, jax.Array | np.ndarray
            ):
                value = type(leaf)(np.asarray(value).item())
            out.append(value)
        tree = jax.tree_util.tree_unflatten(treedef, out)
        return tree, meta["metadata"]

    def wait(self) -> None:
        """Blocks until every pending save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
