"""The files of a checkpoint directory: which steps are complete, the verified
metadata file, the arrays' records, clean-up that a crash cannot leave half done.

A checkpoint for step ``s`` is the directory ``<directory>/<s>`` that Orbax
renames into place once every file is written. It is *complete* when it holds
Orbax's commit record (``_CHECKPOINT_METADATA``), the arrays' item (``tree``
with its ``_METADATA`` and OCDBT manifest) and fnn's metadata (``meta``);
anything less (a clean-up killed half way, a copy cut short) is never listed.

Removing a checkpoint first renames it to ``<directory>/.deleting-<s>-<id>``
(one atomic step) and only then deletes its files, so a kill during clean-up
leaves a directory that is not a step, removed by the next clean-up.
Checkpoints found damaged are moved, not deleted, to ``<directory>/damaged/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from fnn.training.loading import Leaf, crc32, is_key

MARKERS = ("_CHECKPOINT_METADATA", "tree/_METADATA", "tree/manifest.ocdbt")
META_FILE = "meta/metadata"  # Orbax's JsonSave file in the "meta" item
DELETING = ".deleting-"
DAMAGED = "damaged"
FORMAT = 2  # 2: leaf paths with "/", checksums; 1 (fnn 0.2): no checksums


class CorruptCheckpointError(ValueError):
    """A checkpoint's files do not hold what was saved.

    Raised when an array's checksum, the metadata's checksum or the files
    themselves do not verify; the message names the step, the leaf path and
    the file. ``fit`` catches it to resume from an older checkpoint.
    """


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, str(int(step)))


def missing_part(path: str) -> str | None:
    """The first part a step directory lacks, or ``None`` when complete."""
    for marker in (*MARKERS, META_FILE):
        if not os.path.isfile(os.path.join(path, marker)):
            return marker
    return None


def step_names(directory: str) -> dict[int, str]:
    """Every directory named like a step, complete or not: ``{step: path}``."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(path):
            out[int(name)] = path
    return out


def complete_steps(directory: str) -> list[int]:
    """The steps whose directories are complete, in increasing order."""
    found = step_names(directory)
    return sorted(s for s, path in found.items() if missing_part(path) is None)


def _canonical(content: Any) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def meta_document(content: dict[str, Any]) -> dict[str, Any]:
    """What is written as the metadata file: the content and its checksum."""
    return {"content": content, "crc32": zlib.crc32(_canonical(content))}


def read_meta(caller: str, directory: str, step: int) -> dict[str, Any]:
    """The verified metadata of ``step``: ``{"metadata", "leaves", ...}``.

    Raises:
      CorruptCheckpointError: when the file is not JSON or its checksum
        differs; the message names the file.
    """
    path = os.path.join(step_dir(directory, step), META_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(
            f"{caller}: the metadata file {path} of the checkpoint for step {step} "
            f"is not valid JSON ({e}); the file is damaged."
        ) from None
    if not isinstance(document, dict):
        document = {"content": None, "crc32": None}
    if "content" not in document and "leaves" in document:  # format 1
        return _from_format_1(document)
    content = document.get("content")
    if (
        not isinstance(content, dict)
        or document.get("crc32") != zlib.crc32(_canonical(content))
        or not {"metadata", "leaves"} <= set(content)
    ):
        raise CorruptCheckpointError(
            f"{caller}: the metadata file {path} of the checkpoint for step {step} "
            f"does not match its checksum; the file is damaged."
        )
    return content


def _from_format_1(document: dict[str, Any]) -> dict[str, Any]:
    """Metadata written by fnn 0.2: paths from ``entries``, no checksums."""
    leaves = []
    for record in document["leaves"]:
        entries = record["entries"]
        dtype = record["dtype"]
        if dtype == "prng_key":
            dtype = f"prng_key:{record['impl']}"
        path = "" if entries == ["value"] and record["path"] == "" else None
        leaves.append(
            {
                "path": "/".join(entries) if path is None else path,
                "shape": record["shape"],
                "dtype": dtype,
            }
        )
    return {"format": 1, "metadata": document["metadata"], "leaves": leaves}


def remove(directory: str, path: str) -> None:
    """Deletes ``path`` (a step directory) by renaming it first."""
    name = os.path.basename(path.rstrip(os.sep))
    doomed = os.path.join(directory, f"{DELETING}{name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(directory: str) -> None:
    """Finishes deletions a crash interrupted."""
    for name in os.listdir(directory):
        if name.startswith(DELETING):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def clean_up(directory: str, max_to_keep: int | None) -> bool:
    """Removes complete steps beyond the ``max_to_keep`` newest, and
    incomplete step directories older than the oldest kept one (remains of
    an interrupted clean-up). Returns whether it removed anything."""
    steps = complete_steps(directory)
    keep = steps if max_to_keep is None else steps[-max_to_keep:]
    if not keep:
        return False
    doomed = [p for s, p in step_names(directory).items() if s < keep[0]]
    for path in doomed:
        remove(directory, path)
    return bool(doomed)


def set_aside(directory: str, step: int) -> str:
    """Moves the step's directory to ``damaged/<step>``; returns the new path."""
    os.makedirs(os.path.join(directory, DAMAGED), exist_ok=True)
    target = os.path.join(directory, DAMAGED, str(int(step)))
    n = 0
    while os.path.exists(target):
        n += 1
        target = os.path.join(directory, DAMAGED, f"{int(step)}.{n}")
    os.rename(step_dir(directory, step), target)
    return target


def files_of(item: str, storage_name: str) -> list[str]:
    """The files under ``item`` (the ``tree`` directory) holding an array.

    Read from the OCDBT index with ``tensorstore.ocdbt.dump``: small arrays
    sit inside the index's own node file, large ones in data files. Returns
    ``[item]`` when the index cannot be read.
    """
    try:
        import tensorstore as ts

        kv = ts.KvStore.open(f"file://{item}/").result()
        root = ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]
        found: set[str] = set()
        _walk(ts, kv, root, f"{storage_name}/".encode(), found)
        return sorted(os.path.join(item, f) for f in found) or [item]
    except Exception:  # a damaged index: name the directory
        return [item]


def _location_file(location: str) -> str:
    """``'value:ocdbt.process_0/:d/9f2c:0:151'`` -> ``'ocdbt.process_0/d/9f2c'``."""
    _, base, rest = location.split(":", 2)
    return base + rest.split(":")[0]


def _walk(ts: Any, kv: Any, location: str, prefix: bytes, found: set[str]) -> None:
    node = ts.ocdbt.dump(kv, location).result()
    for entry in node["entries"]:
        key = entry.get("key", b"")
        children = [v for v in entry.values() if str(v).startswith("btreenode:")]
        for child in children:
            _walk(ts, kv, child, prefix, found)
        key = bytes(key)
        meta = key.rsplit(b"/", 1)[-1].startswith(b".") or key.endswith(b".json")
        if children or meta or not key.startswith(prefix):
            continue
        if "indirect_value" in entry:
            found.add(_location_file(entry["indirect_value"]))
        else:
            found.add(_location_file(location))


# --- the arrays: how a leaf is stored, read back and checked -----------------


def storable(leaf: Any) -> Any:
    """What Orbax writes for a leaf: a key's raw data, an array as it is."""
    if is_key(leaf):
        return jax.random.key_data(leaf)
    return leaf if isinstance(leaf, jax.Array | np.ndarray) else np.asarray(leaf)


def checksum(value: Any) -> int | None:
    """The CRC-32 of an array's bytes; None when this process cannot see all of
    it (an array sharded over several processes)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return None
    return crc32(value)


def storage(path: str) -> list[str]:
    """The nested-dict keys Orbax stores a leaf under (a bare array: value)."""
    return path.split("/") if path else ["value"]


def leaf_of(record: dict) -> Leaf:
    return Leaf(tuple(record["shape"]), record["dtype"])


def abstract_leaf(record: dict) -> jax.ShapeDtypeStruct:
    """The ``jax.ShapeDtypeStruct`` of a saved leaf (a key's own dtype)."""
    dtype = record["dtype"]
    if dtype.startswith("prng_key"):
        dtype = jax.random.key(0, impl=dtype.split(":")[1]).dtype
    return jax.ShapeDtypeStruct(tuple(record["shape"]), dtype)


def restore_args(leaf: Leaf, target: Any) -> tuple[Any, Any]:
    """``(abstract, Orbax restore args)`` for a saved leaf, placed like
    ``target`` (no target: the default device; a NumPy target: NumPy)."""
    shape, dtype = leaf.shape, leaf.dtype
    if dtype.startswith("prng_key"):
        key = jax.random.key(0, impl=dtype.split(":")[1])
        raw = jax.eval_shape(jax.random.key_data, key)
        shape, dtype = (*shape, *raw.shape), raw.dtype
    sharding = getattr(target, "sharding", None)
    if target is None:
        sharding = SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, NamedSharding) and len(shape) > len(sharding.spec):
        spec = P(*sharding.spec, *[None] * (len(shape) - len(sharding.spec)))
        sharding = NamedSharding(sharding.mesh, spec)
    abstract = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
    if sharding is None:
        return abstract, ocp.RestoreArgs(restore_type=np.ndarray, dtype=abstract.dtype)
    return abstract, ocp.ArrayRestoreArgs(
        sharding=sharding, global_shape=shape, dtype=abstract.dtype
    )


def finish(value: Any, record: dict, target: Any) -> Any:
    """Rewraps a key; gives a Python scalar target's type back."""
    if record["dtype"].startswith("prng_key"):
        return jax.random.wrap_key_data(value, impl=record["dtype"].split(":")[1])
    if isinstance(target, bool | int | float) and not isinstance(
        target, jax.Array | np.ndarray
    ):
        return type(target)(np.asarray(value).item())
    return value


def select(caller: str, leaves: list, path: str | None, where: str) -> dict:
    """The saved records under ``path``, by their path relative to it."""
    out = {}
    for record in leaves:
        full = record["path"]
        if not path:
            name = full
        elif full == path:
            name = ""
        elif full.startswith(path + "/"):
            name = full[len(path) + 1 :]
        else:
            continue
        out[name] = {**record, "full": full}
    if not out:
        tops = sorted({r["path"].split("/")[0] for r in leaves})
        raise ValueError(
            f"{caller}: {where} has nothing under {path!r}; its top-level names "
            f"are {tops!r}."
        )
    return out


def read_error(where: str, item: str, error: Exception, paths: dict) -> Exception:
    """The :class:`CorruptCheckpointError` for an error of Orbax's read, with
    the leaf and the file tensorstore names when it names them."""
    text = str(error).split(" [tensorstore_spec")[0]
    damaged = [f for f in re.findall(r'local file "([^"]+)"', text) if f[-1] != "/"]
    key = re.search(r'Error reading "([^"/]+)/', text)
    leaf = paths.get(key.group(1)) if key else None
    at = f" at {leaf}" if leaf is not None else ""
    place = damaged[-1] if damaged else item
    detail = text.split(f'"{place}": ', 1)[-1] if damaged else text[:400]
    return CorruptCheckpointError(
        f"Checkpointer.restore: {where} is damaged: reading the array{at} failed "
        f"in {place} ({type(error).__name__}: {detail})."
    )


def check_array(where: str, item: str, path: str, value: Any, expected, crc) -> None:
    """Raises :class:`CorruptCheckpointError` when a restored array does not
    have its saved shape, dtype and CRC-32 (``crc`` None: not checked)."""
    if not isinstance(value, jax.Array | np.ndarray):
        raise CorruptCheckpointError(
            f"Checkpointer.restore: {where} is damaged: the array at {path} was "
            f"not read (Orbax returned a {type(value).__name__}); see {item}."
        )
    if (value.shape, value.dtype) != (expected.shape, expected.dtype):
        raise CorruptCheckpointError(
            f"Checkpointer.restore: {where} is damaged: the array at {path} was "
            f"read as {value.dtype}{list(value.shape)}, saved as "
            f"{expected.dtype}{list(expected.shape)}; see {item}."
        )
    got = checksum(value)
    if crc is not None and got is not None and got != crc:
        found = files_of(item, ".".join(storage(path)))
        raise CorruptCheckpointError(
            f"Checkpointer.restore: {where} is damaged: the array at {path} does "
            f"not match its checksum (CRC-32 {got:#010x}, saved {crc:#010x}); it "
            f"is stored in {', '.join(found)}."
        )
