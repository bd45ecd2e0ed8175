"""Leaves by path, and the matching of saved leaves to a target tree.

One vocabulary for checkpoints (:class:`fnn.Checkpointer`) and params files
(:func:`fnn.save_params`, :func:`fnn.load_params`):

* A leaf's **path** is its keys joined with ``/``, as
  ``jax.tree_util.keystr(path, simple=True, separator="/")`` prints it:
  ``0_dense/w`` in a params tree, ``params/0_dense/w`` or
  ``opt_state/0/mu/0_dense/w`` in a train state.
* A **mapping** renames saved paths into the target's: a dict whose keys are a
  saved path, a prefix of one (ending at a separator), or a compiled regular
  expression (``re.compile``) matched at the start of a path, and whose values
  are the new name (for a pattern, a template with ``\\1`` groups) or ``None``
  to leave that saved leaf out. The first entry that matches, in order, wins.
* **exclude** lists target paths (or prefixes, or patterns) that are not
  loaded: the target keeps its own values there, and saved leaves that would
  land there are left out.

Everything else must match one to one: :func:`match` raises one error that
lists every target leaf without a saved value, every saved leaf without a
place in the target and every shape or dtype that differs, never a silent
partial load.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Rule = str | re.Pattern


class Leaf(NamedTuple):
    """What is known of a leaf before its values are read."""

    shape: tuple[int, ...]
    dtype: str  # numpy's name, or "prng_key:<impl>" for a typed key


def is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array (or its abstract form)."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_impl(leaf: Any) -> str:
    """The PRNG implementation's name of a key array or of an abstract one."""
    if isinstance(leaf, jax.Array):
        return str(jax.random.key_impl(leaf))
    for name in ("threefry2x32", "rbg", "unsafe_rbg"):  # a ShapeDtypeStruct
        if jax.random.key(0, impl=name).dtype == leaf.dtype:
            return name
    raise ValueError(f"fnn: unknown PRNG key type {leaf.dtype}.")


def describe(leaf: Any) -> Leaf:
    """The :class:`Leaf` of an array, a scalar or a ``jax.ShapeDtypeStruct``."""
    if is_key(leaf):
        return Leaf(tuple(leaf.shape), f"prng_key:{key_impl(leaf)}")
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return Leaf(tuple(np.shape(leaf)), str(np.dtype(dtype)))


def paths_and_leaves(caller: str, tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)``; refuses keys that hold the separator."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = []
    for keys, _ in with_path:
        names = [jax.tree_util.keystr((k,), simple=True, separator="/") for k in keys]
        bad = [n for n in names if "/" in n or n == ""]
        if bad:
            raise ValueError(
                f"{caller}: the key {bad[0]!r} at {jax.tree_util.keystr(keys)} is "
                f"empty or holds '/', the separator of saved paths; rename it."
            )
        paths.append("/".join(names))
    return paths, [leaf for _, leaf in with_path], treedef


def nest(pairs: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict whose leaf at path ``a/b`` is ``pairs['a/b']``."""
    out: dict[str, Any] = {}
    for path, value in pairs.items():
        *parents, last = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out


def crc32(array: Any) -> int:
    """The CRC-32 of an array's bytes (C order), the checksum of saved arrays.

    Examples:
      >>> import numpy as np
      >>> from fnn.training.loading import crc32
      >>> crc32(np.zeros(3, np.float32)) == crc32(np.zeros(3, np.float32))
      True
      >>> crc32(np.zeros(3, np.float32)) == crc32(np.ones(3, np.float32))
      False
    """
    a = np.ascontiguousarray(np.asarray(array))
    return zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"")


def _rule_match(rule: Rule, name: str, sep: str) -> tuple[int, Any] | None:
    """``(matched length, match)`` when ``rule`` covers ``name`` or a prefix."""
    if isinstance(rule, re.Pattern):
        m = rule.match(name)
        if m is None or (m.end() < len(name) and name[m.end()] != sep):
            return None
        return m.end(), m
    if name == rule or name.startswith(rule + sep) or rule == "":
        return len(rule), None
    return None


def split_rename(name: str, mapping: Mapping[Rule, str | None], sep: str = "/") -> Any:
    """``(new head, rest of name)`` for the first entry of ``mapping`` that
    covers ``name``; ``None`` when it leaves ``name`` out, ``...`` when no
    entry matches."""
    for rule, new in mapping.items():
        found = _rule_match(rule, name, sep)
        if found is None:
            continue
        if new is None:
            return None
        end, m = found
        return (m.expand(new) if m is not None else new), name[end:].lstrip(sep)
    return ...


def rename(name: str, mapping: Mapping[Rule, str | None], sep: str = "/") -> Any:
    """``name`` under ``mapping``: the new name, ``None`` (left out), or ``...``
    when no entry matches.

    Examples:
      >>> import re
      >>> from fnn.training.loading import rename
      >>> rename("encoder/0_dense/w", {"encoder": "body"})
      'body/0_dense/w'
      >>> rename("layers.3.fc", {re.compile(r"layers\\.(\\d+)"): r"\\1_block"}, ".")
      '3_block.fc'
      >>> rename("head/w", {"head": None}) is None
      True
    """
    found = split_rename(name, mapping, sep)
    if not isinstance(found, tuple):
        return found
    return sep.join(p for p in found if p)


def excluded(path: str, exclude: Iterable[Rule], sep: str = "/") -> bool:
    """Whether ``path`` is covered by one of ``exclude``'s paths or patterns."""
    return any(_rule_match(rule, path, sep) is not None for rule in exclude)


def _listing(paths: list[str], limit: int = 40) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def match(
    caller: str,
    source_name: str,
    target: Mapping[str, Leaf],
    source: Mapping[str, Leaf],
    *,
    mapping: Mapping[Rule, str | None] | None = None,
    exclude: Iterable[Rule] = (),
    same_dtype: bool = True,
    origin: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Pairs every loaded target path with its saved name.

    Args:
      caller: the function, for messages (``"Checkpointer.restore"``).
      source_name: what the saved leaves are, for messages (``"the checkpoint
        for step 7 in /ckpt"``).
      target: the target's leaves by path.
      source: the saved leaves by name.
      mapping: renames of saved names (see the module docstring); names no
        entry matches keep their name.
      exclude: target paths not loaded.
      same_dtype: whether a dtype difference is an error (a checkpoint) or a
        cast (a params file).
      origin: where a saved name came from, shown in messages (the PyTorch
        key of a converted weight).

    Returns:
      ``{target path: saved name}`` for every target leaf that is loaded.

    Raises:
      ValueError: listing every target leaf without a saved value, every
        saved leaf without a place, every pair of differing shapes or dtypes
        and every target leaf two saved leaves map to.
    """
    exclude = tuple(exclude)
    pairs: dict[str, str] = {}
    unused, doubled, differ = [], [], []
    for name, leaf in source.items():
        path = rename(name, mapping or {})
        path = name if path is ... else path
        if path is None or excluded(path, exclude):
            continue
        shown = name if origin is None else f"{name} (from {origin[name]})"
        if path not in target:
            unused.append(shown if path == name else f"{shown} (as {path})")
            continue
        if path in pairs:
            doubled.append(f"{path} (from {pairs[path]} and {name})")
            continue
        pairs[path] = name
        want = target[path]
        key_mismatch = want.dtype.startswith("prng") != leaf.dtype.startswith("prng")
        if want.shape != leaf.shape or (
            (same_dtype or key_mismatch) and want.dtype != leaf.dtype
        ):
            at = path if origin is None else f"{path} (from {origin[name]})"
            differ.append(
                f"{at} (saved {leaf.dtype}{list(leaf.shape)}, target "
                f"{want.dtype}{list(want.shape)})"
            )
    missing = [p for p in target if p not in pairs and not excluded(p, exclude)]
    if missing or unused or doubled or differ:
        parts = [
            f"the target's {_listing(missing)} have no saved value" if missing else "",
            f"the saved {_listing(unused)} have no place in the target"
            if unused
            else "",
            f"the target's {_listing(doubled)} get two values" if doubled else "",
            f"{_listing(differ)} differ" if differ else "",
        ]
        raise ValueError(
            f"{caller}: {source_name} does not fit the target: "
            f"{'; '.join(p for p in parts if p)}. Rename saved paths with "
            f"mapping= and leave target paths out with exclude=."
        )
    return pairs
