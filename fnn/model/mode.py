"""The train/eval switch shared by Dropout and BatchNorm."""

from __future__ import annotations

import jax

from fnn.model.core import fail
from fnn.model.place import in_train_step


def is_training(
    key: jax.Array | None, train: bool | None, desc: str = "a layer"
) -> bool:
    """The train/eval switch shared by Dropout and BatchNorm.

    ``train`` (an apply keyword) decides when given; otherwise a layer trains
    when it is given a ``key``. So passing a key turns on training behaviour
    everywhere in a network, and ``train=False`` turns it off.

    Inside the loss function of a training step (:func:`fnn.make_train_step`)
    neither a key nor ``train=`` is an error: the loss forgot to pass the
    step's key on, and the layer would silently train in evaluation mode.

    Args:
      key: the ``key`` apply was given.
      train: the ``train`` apply was given (``None`` when not given).
      desc: the layer, as errors print it (``'Dropout(0.5)'``).

    Returns:
      Whether the layer trains.

    Raises:
      ShapeError: inside a training step's loss function, for ``key=None``
        without ``train=``, naming ``desc``, its place and the fix.

    Examples:
      >>> import jax
      >>> from fnn.model.mode import is_training
      >>> is_training(None, None), is_training(jax.random.key(0), None)
      (False, True)
      >>> is_training(jax.random.key(0), False)
      False
    """
    if train is not None:
        return bool(train)
    if key is None and in_train_step():
        fail(
            desc,
            "applied with key=None and no train= inside the loss function of a "
            "training step (fnn.make_train_step), so it would train in "
            "evaluation mode; pass key=key to apply in your loss function, or "
            "train=False to apply it in evaluation mode on purpose.",
        )
    return key is not None
