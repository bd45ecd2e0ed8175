"""Starting many processes: ``jax.distributed.initialize`` from arguments or the
environment, so one script runs on one machine or many. Nothing home-made: the
coordinator, heartbeats and collectives are JAX's own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

ENV_COORDINATOR = "FNN_COORDINATOR"
ENV_NUM_PROCESSES = "FNN_NUM_PROCESSES"
ENV_PROCESS_ID = "FNN_PROCESS_ID"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 15,
    shutdown_timeout_seconds: int = 300,
) -> None:
    """Joins this process to a multi-process JAX job (``jax.distributed``).

    Call it once per process, before anything else touches JAX devices. Each
    argument left ``None`` is read from the environment, first fnn's
    variables ``FNN_COORDINATOR`` (``host:port`` of process 0),
    ``FNN_NUM_PROCESSES`` and ``FNN_PROCESS_ID``, then JAX's own
    (``JAX_COORDINATOR_ADDRESS``, or the cluster detection of
    ``jax.distributed.initialize`` for Slurm, Open MPI, Cloud TPU, ...).

    Args:
      coordinator_address: ``"host:port"`` of process 0, which runs the
        coordination service; every process passes the same value.
      num_processes: the number of processes in the job.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: the local devices this process uses (all by default).
      initialization_timeout: seconds to wait for every process to join
        before failing.
      heartbeat_timeout_seconds: seconds without a heartbeat after which a
        process is taken for dead; the survivors then abort (exit status 134,
        after JAX logs ``The following tasks are unhealthy (stopped sending
        heartbeats)``) instead of waiting in a collective. The default, 15 s,
        bounds that wait (JAX's own default is 100 s); raise it on clusters
        where a host can stall for longer without being dead.
      shutdown_timeout_seconds: seconds to wait for every process at shutdown.

    Raises:
      ValueError: for a ``FNN_NUM_PROCESSES`` or ``FNN_PROCESS_ID`` that is not
        an integer.
      RuntimeError: from JAX when the processes cannot meet in time.

    Examples:
      Two processes on one machine (run each line in its own shell)::

        FNN_COORDINATOR=127.0.0.1:12345 FNN_NUM_PROCESSES=2 FNN_PROCESS_ID=0 \\
            python train.py
        FNN_COORDINATOR=127.0.0.1:12345 FNN_NUM_PROCESSES=2 FNN_PROCESS_ID=1 \\
            python train.py

      where ``train.py`` starts with ``fnn.initialize()``. A single process
      needs no call at all:

      >>> import fnn
      >>> fnn.initialize.__name__
      'initialize'
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        shutdown_timeout_seconds=shutdown_timeout_seconds,
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"initialize: expected an integer in ${name}, got {value!r}."
        ) from None
