"""Ctrl-C during an Orbax save, without Orbax's false report of a failed save.

Orbax finishes a save in a thread of its own; a ``KeyboardInterrupt`` in the
main thread while it waits for that thread is logged as a failed save,
although the thread goes on and completes it. :class:`fnn.Checkpointer`
waits under :func:`interrupts_not_logged_as_failures`, which drops exactly
those records.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _NotAFailedSave(logging.Filter):
    """Drops the records that log a ``KeyboardInterrupt`` as an error.

    Orbax's ``wait_until_finished`` logs any exception raised while it waits
    for its finalize thread as ``Save Finalize thread (...) failed`` with a
    traceback. Ctrl-C lands there in the main thread, while the finalize
    thread goes on and completes the save: the report is false.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        return not (kind is not None and issubclass(kind, KeyboardInterrupt))


@contextlib.contextmanager
def interrupts_not_logged_as_failures() -> Iterator[None]:
    """Orbax logs through absl, whose records go to the ``absl`` logger."""
    logger, quiet = logging.getLogger("absl"), _NotAFailedSave()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
