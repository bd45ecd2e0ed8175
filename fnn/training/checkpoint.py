"""Verified checkpoints of a whole training state, on Orbax.

:class:`Checkpointer` saves any pytree of arrays (a :class:`fnn.TrainState`:
step, params, optimizer state, running state and PRNG key) together with a small
JSON-able ``metadata`` dict (where the data stream stood, the history so far)
under ``directory/<step>/``. It is a thin layer over
``orbax.checkpoint.CheckpointManager`` that adds what a training loop needs:

* every array's CRC-32 (of the host copy's bytes) and the metadata's are saved
  and verified on restore, so a flipped bit is an error naming the step, the
  leaf and the file, never silently wrong values;
* only complete checkpoints are listed (see :mod:`fnn.training.checkpoint_files`),
  and ``max_to_keep`` clean-up renames before it deletes, so a crash at any
  moment leaves nothing half deleted that could be chosen;
* Ctrl-C while a save is being finished waits for that save (which Orbax
  completes in a thread of its own), removes the steps beyond ``max_to_keep``
  and then raises the ``KeyboardInterrupt``, without Orbax's report of a
  failed save, which it is not;
* typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and
  rewrapped on restore;
* restore takes a target (the whole tree, or with ``path``, ``mapping`` and
  ``exclude`` a part of it) or none, and lists every leaf that does not fit.

Nothing is pickled: arrays go to Orbax's tensorstore format, metadata to JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from fnn.training import checkpoint_files as files
from fnn.training.checkpoint_files import CorruptCheckpointError
from fnn.training.interrupts import interrupts_not_logged_as_failures
from fnn.training.loading import (
    Rule,
    describe,
    excluded,
    match,
    nest,
    paths_and_leaves,
    rename,
)

__all__ = ["Checkpointer", "CorruptCheckpointError"]


class Checkpointer:
    """Saves and restores a training state and its metadata under a directory.

    Each checkpoint is a directory ``<directory>/<step>`` holding the tree's
    arrays (Orbax's tensorstore format) and a JSON file with the metadata and
    each leaf's path, shape, dtype and CRC-32. Restores verify every array
    read and the metadata file; a difference raises
    :attr:`Checkpointer.CorruptError` (a ``ValueError``) naming the step,
    the leaf path and the file. Only complete checkpoints are listed, and only
    the ``max_to_keep`` most recent are kept (older ones are removed once a
    newer one is complete, at the next save, :meth:`wait` or :meth:`close`).
    Saving is asynchronous (arrays are copied off the device and checksummed
    before :meth:`save` returns, files are written in the background);
    :meth:`wait`, :meth:`restore` and :meth:`close` wait for pending writes.
    Use it as a context manager, or call :meth:`close`.

    Leaves are named by their path, the keys joined with ``/``
    (``params/0_dense/w``, ``opt_state/0/mu/0_dense/w``), as
    ``jax.tree_util.keystr(path, simple=True, separator="/")`` prints them.

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

    CorruptError = CorruptCheckpointError

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
        self.max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # fnn removes old steps itself, renaming first
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._async = async_save
        self._in_flight = False  # a save whose finalize thread may still run
        self._main = jax.process_index() == 0
        if self._main:
            files.remove_leftovers(self.directory)

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
          ValueError: when a checkpoint for ``step`` already exists, or a key
            of ``tree`` holds ``/``.
        """
        paths, leaves, _ = paths_and_leaves("Checkpointer.save", tree)
        stored = [files.storable(leaf) for leaf in leaves]
        records = [
            {"path": p, "shape": list(d.shape), "dtype": d.dtype, "crc32": None}
            for p, d in zip(paths, map(describe, leaves))
        ]
        for record, value in zip(records, stored):
            record["crc32"] = files.checksum(value)
        content = {"format": files.FORMAT, "metadata": dict(metadata or {})}
        content["leaves"] = records
        try:
            document = files.meta_document(content)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"Checkpointer.save: metadata must be JSON-able (dicts, lists, str, "
                f"numbers, bool, None): {e}."
            ) from None
        step = int(step)
        self._finish_saves()
        self._clean_up()
        if step in self.all_steps():
            raise ValueError(
                f"Checkpointer.save: {self.directory} already holds a checkpoint for "
                f"step {step}."
            )
        leftover = files.step_names(self.directory).get(step)
        if leftover is not None and self._main:  # an incomplete one: garbage
            files.remove(self.directory, leftover)
            self._manager.reload()
        arrays = nest({"/".join(files.storage(p)): v for p, v in zip(paths, stored)})
        self._manager.save(
            step,
            args=ocp.args.Composite(
                tree=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(document)
            ),
            force=True,
        )
        self._in_flight = self._async

    def latest_step(self) -> int | None:
        """The step of the most recent complete checkpoint, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The steps of all complete checkpoints, in increasing order.

        Waits for pending saves first. A checkpoint whose directory lacks a
        part (a clean-up or a copy interrupted) is not listed.
        """
        self._finish_saves()
        return files.complete_steps(self.directory)

    def _step(self, step: int | None, caller: str) -> int:
        self._finish_saves()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"Checkpointer.{caller}: no checkpoint in {self.directory}."
                )
            return steps[-1]
        if int(step) not in steps:
            path = files.step_dir(self.directory, step)
            lacks = files.missing_part(path) if os.path.isdir(path) else None
            why = f" (its directory lacks {lacks}: incomplete)" if lacks else ""
            raise FileNotFoundError(
                f"Checkpointer.{caller}: no checkpoint for step {step} in "
                f"{self.directory}{why}; it holds steps {steps!r}."
            )
        return int(step)

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The metadata saved with ``step`` (the latest by default), verified.

        Raises:
          FileNotFoundError: when there is no such checkpoint.
          Checkpointer.CorruptError: when the metadata file is damaged.
        """
        step = self._step(step, "metadata")
        return files.read_meta("Checkpointer.metadata", self.directory, step)[
            "metadata"
        ]

    def structure(self, step: int | None = None) -> dict[str, Any]:
        """The saved tree's structure: nested dicts of ``jax.ShapeDtypeStruct``.

        Reads only the metadata file (verified), no array.

        Examples:
          >>> import tempfile, jax.numpy as jnp, fnn
          >>> with fnn.Checkpointer(tempfile.mkdtemp()) as ckpt:
          ...     ckpt.save(1, {"params": {"w": jnp.ones((2, 3))}})
          ...     ckpt.structure()
          {'params': {'w': ShapeDtypeStruct(shape=(2, 3), dtype=float32)}}
        """
        step = self._step(step, "structure")
        meta = files.read_meta("Checkpointer.structure", self.directory, step)
        return nest({r["path"]: files.abstract_leaf(r) for r in meta["leaves"]})

    def restore(
        self,
        target: Any = None,
        step: int | None = None,
        *,
        path: str | None = None,
        mapping: Mapping[Rule, str | None] | None = None,
        exclude: Iterable[Rule] = (),
    ) -> tuple[Any, dict]:
        """Restores the checkpoint for ``step`` (the latest by default), verified.

        Args:
          target: a pytree with the structure, shapes and dtypes to restore
            into (e.g. a freshly created ``TrainState``, or its abstract form
            from ``jax.eval_shape``, which allocates nothing); its arrays'
            shardings say where the restored arrays go. Its values are used
            only at paths left out with ``exclude``. ``None`` restores the
            saved tree (under ``path``) as nested dicts of arrays.
          step: which checkpoint; ``None`` means the latest.
          path: restore only the saved sub-tree at this path (``"params"``,
            ``"params/encoder"``); its leaves' paths are taken relative to it.
          mapping: renames of saved paths into the target's (exact paths,
            prefixes, or ``re.compile`` patterns; ``None`` leaves a saved leaf
            out), e.g. ``{"2_dense": "head"}``.
          exclude: target paths (or prefixes, or patterns) not restored: the
            target keeps its values there (a new head), and saved leaves that
            map there are left out.

        Returns:
          ``(tree, metadata)``: the restored tree, in ``target``'s structure,
          and the saved metadata dict.

        Raises:
          FileNotFoundError: when there is no such checkpoint.
          ValueError: when ``target`` does not fit; the message lists every
            target leaf without a saved value, every saved leaf without a
            place, and every differing shape or dtype, by path.
          Checkpointer.CorruptError: when an array or the metadata does not
            match its checksum, or the files cannot be read; the message names
            the step, the leaf path and the file.

        Examples:
          >>> import tempfile, jax, jax.numpy as jnp, fnn
          >>> state = {"params": {"0_dense": {"w": jnp.ones((2, 3))},
          ...                     "1_dense": {"w": jnp.ones((3, 4))}},
          ...          "step": jnp.array(5)}
          >>> new = {"0_dense": {"w": jnp.zeros((2, 3))},
          ...        "1_dense": {"w": jnp.zeros((3, 9))}}  # a new head
          >>> with fnn.Checkpointer(tempfile.mkdtemp()) as ckpt:
          ...     ckpt.save(1, state)
          ...     params, _ = ckpt.restore(new, path="params", exclude=["1_dense"])
          >>> float(params["0_dense"]["w"][0, 0]), float(params["1_dense"]["w"][0, 0])
          (1.0, 0.0)
        """
        step = self._step(step, "restore")
        caller = "Checkpointer.restore"
        meta = files.read_meta(caller, self.directory, step)
        where = f"the checkpoint for step {step} in {self.directory}"
        records = files.select(caller, meta["leaves"], path, where)
        saved = {name: files.leaf_of(r) for name, r in records.items()}
        if target is None:
            pairs = {}
            for name in saved:
                new = rename(name, mapping or {})
                new = name if new is ... else new
                if new is not None and not excluded(new, exclude):
                    pairs[new] = name
            values = self._read(step, where, records, pairs, dict.fromkeys(pairs))
            tree = values[""] if list(values) == [""] else nest(values)
            return tree, meta["metadata"]
        paths, leaves, treedef = paths_and_leaves(caller, target)
        targets = dict(zip(paths, leaves))
        wanted = {p: describe(leaf) for p, leaf in targets.items()}
        under = where if path is None else f"{where} (under {path!r})"
        pairs = match(caller, under, wanted, saved, mapping=mapping, exclude=exclude)
        values = self._read(step, where, records, pairs, targets)
        out = [values.get(p, leaf) for p, leaf in zip(paths, leaves)]
        return jax.tree_util.tree_unflatten(treedef, out), meta["metadata"]

    def _read(self, step, where, records, pairs, targets) -> dict[str, Any]:
        """Reads the saved leaves ``pairs`` names and verifies each checksum."""
        if not pairs:
            return {}
        item = os.path.join(files.step_dir(self.directory, step), "tree")
        wanted = {records[name]["full"]: new for new, name in pairs.items()}
        abstract, args = {}, {}
        for full, new in wanted.items():
            leaf = files.leaf_of(records[pairs[new]])
            key = "/".join(files.storage(full))
            abstract[key], args[key] = files.restore_args(leaf, targets[new])
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    tree=ocp.args.PyTreeRestore(
                        item=nest(abstract),
                        restore_args=nest(args),
                        partial_restore=True,
                    )
                ),
            ).tree
        except Exception as e:
            names = {".".join(files.storage(full)): full for full in wanted}
            raise files.read_error(where, item, e, names) from e
        values = {}
        for full, new in wanted.items():
            record = records[pairs[new]]
            value = restored
            for key in files.storage(full):
                value = value[key]
            expected = abstract["/".join(files.storage(full))]
            files.check_array(where, item, full, value, expected, record.get("crc32"))
            values[new] = files.finish(value, record, targets[new])
        return values

    def verify(self, step: int | None = None) -> None:
        """Reads every array of ``step`` (the latest by default) and checks it.

        Raises:
          FileNotFoundError: when there is no such checkpoint.
          Checkpointer.CorruptError: as :meth:`restore`.
        """
        self.restore(None, step)

    def set_aside(self, step: int) -> str:
        """Moves the checkpoint for ``step`` to ``directory/damaged/``.

        It is then no longer listed, and its step can be saved again; its
        files are kept for inspection. Returns the new path.
        """
        self._finish_saves()
        new = files.set_aside(self.directory, step) if self._main else ""
        self._manager.reload()
        return new

    def _clean_up(self) -> None:
        """Removes complete checkpoints beyond ``max_to_keep`` and incomplete
        step directories older than the oldest kept one."""
        if self._main and files.clean_up(self.directory, self.max_to_keep):
            self._manager.reload()

    def _finish_saves(self) -> None:
        """Waits for the pending save; Ctrl-C meanwhile still completes it.

        Orbax finishes a save (the rename that makes its step directory
        complete) in a thread of its own, which a ``KeyboardInterrupt`` in
        the main thread does not stop; an interrupted ``Thread.join`` may
        even report that thread finished while it runs on. So on Ctrl-C this
        polls Orbax until the save is no longer in progress (a second Ctrl-C
        stops the wait; the next save, wait or close then cleans up), reloads
        the steps from the directory, removes those beyond ``max_to_keep``
        and raises the ``KeyboardInterrupt``. The save is then complete or
        absent, never listed half written.
        """
        try:
            with interrupts_not_logged_as_failures():
                self._manager.wait_until_finished()
        except KeyboardInterrupt:
            if self._in_flight:  # its finalize thread clears the flag at its end
                while self._manager.is_saving_in_progress():
                    time.sleep(0.005)
            self._in_flight = False
            self._manager.reload()
            self._clean_up()
            raise
        self._in_flight = False

    def wait(self) -> None:
        """Blocks until every pending save is complete on disk."""
        self._finish_saves()
        self._clean_up()

    def close(self) -> None:
        """Waits for pending saves, removes old ones, releases Orbax's resources."""
        self.wait()
        self._manager.close()
