"""What the example scripts share: their common flags, picture paths, digits data.

Private to ``examples/``: a script imports it with ``from _common import ...``,
which works because Python puts the running script's folder on ``sys.path``.
Only plumbing lives here; each example keeps its model and training loop in
view, since an example is there to be read.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def make_parser(
    doc: str, quick: str, *, out: str = ".", seed: bool = True
) -> argparse.ArgumentParser:
    """A parser with the flags the examples share: ``--quick``, ``--out``, ``--seed``.

    Args:
      doc: the script's docstring; its first line describes the script.
      quick: the help text for ``--quick`` (what the quick run does).
      out: the default of ``--out``: ``"."`` (a directory, resolved with
        ``output_path``) or a ``.png`` file name.
      seed: whether to add ``--seed`` (an int, default 0).

    Returns:
      An ``argparse.ArgumentParser``; the script adds its own flags to it.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    where = "a .png file or a directory" if out == "." else "where to save the PNG"
    parser.add_argument("--out", default=out, help=where)
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    return parser


def output_path(out: str, default: str) -> str:
    """``out`` itself if it names a ``.png`` file, else ``out/default``.

    Makes the folder the returned path is in.
    """
    path = out if out.endswith(".png") else os.path.join(out, default)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return path


def digits_split(*, images: bool = False, stratify: bool = True):
    """scikit-learn's bundled 8x8 digits (no download), split 75/25 with seed 0.

    Args:
      images: ``x`` as images of shape ``(n, 8, 8)``; else rows ``(n, 64)``.
      stratify: keep each digit's share equal in both parts.

    Returns:
      ``(x_train, x_test, y_train, y_test)``: raw pixel values 0 to 16 (float64)
      and integer labels (int32), 1,347 training and 450 test examples.
    """
    digits = load_digits()
    x = digits.images if images else digits.data
    y = digits.target.astype(np.int32)
    return train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y if stratify else None
    )
