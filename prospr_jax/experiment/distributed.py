"""Running on every local device and on many hosts: the runner's devices, processes and their roles.

One process (the default) uses every local device: batches are sharded over a ``'data'`` mesh axis,
parameters and optimiser state replicated (:mod:`prospr_jax._src.sharding`); ``--num-devices N``
uses the first N. Many processes use JAX's own multi-controller runtime: every process runs the same
command with ``--coordinator-address HOST:PORT --num-processes N --process-id I`` (passed to
``jax.distributed.initialize``), or ``--distributed`` alone where JAX finds these by itself (TPU
pods, SLURM, Open MPI). Every process then loads only its rows of each global batch (the same global
batch as a single-process run: the order and augmentation are functions of the seed and the step),
writes its part of each checkpoint (orbax, collectively), and only process 0 writes the results,
tables, plots, ``run.json`` and progress bars and holds the lock on ``--out``. ``--out`` must be on
a file system every process sees.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from typing import Iterator, Optional

import jax
from jax.experimental import multihost_utils

from prospr_jax.experiment.config import UsageError

def initialize(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when the flags ask for many processes; checks them first.

    Raises:
      UsageError: a coordinator address without a process count or id (or the reverse), a process id
        outside ``[0, num_processes)``, a malformed address, or processes that fail to connect.
    """
    explicit = [args.coordinator_address, args.num_processes, args.process_id]
    if args.num_devices is not None and args.num_devices < 1:
        raise UsageError(f"`--num-devices` must be an integer >= 1, got {args.num_devices}")
    if all(v is None for v in explicit) and not args.distributed:
        return
    if args.distributed and any(v is not None for v in explicit):
        raise UsageError("pass either `--distributed` (detected by JAX) or `--coordinator-address`, "
                         "`--num-processes` and `--process-id`, not both")
    kwargs = {}
    if not args.distributed:
        missing = [flag for flag, v in zip(("--coordinator-address", "--num-processes", "--process-id"), explicit)
                   if v is None]
        if missing:
            raise UsageError(f"many processes need `--coordinator-address`, `--num-processes` and `--process-id`; "
                             f"missing: {', '.join(missing)}")
        if not re.fullmatch(r"[^:\s]+:\d+", args.coordinator_address):
            raise UsageError(f"`--coordinator-address` must be HOST:PORT, got {args.coordinator_address!r}")
        if args.num_processes < 1:
            raise UsageError(f"`--num-processes` must be >= 1, got {args.num_processes}")
        if not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"`--process-id` must be in [0, {args.num_processes}) (--num-processes), got {args.process_id}")
        kwargs = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                      process_id=args.process_id)
    if args.initialization_timeout is not None:
        kwargs["initialization_timeout"] = args.initialization_timeout
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - the runtime's own message says what failed
        raise UsageError(f"jax.distributed.initialize failed: {type(e).__name__}: {e}") from None


def is_main() -> bool:
    """True in process 0 (the one that writes results, tables, plots and holds the lock)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Standard output of the processes other than 0 is dropped (errors still reach stderr)."""
    if is_main():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def describe_processes() -> Optional[str]:
    """``'process I of N'`` with several processes, else ``None``."""
    if jax.process_count() == 1:
        return None
    return f"process {jax.process_index()} of {jax.process_count()}"


__all__ = ["barrier", "describe_processes", "initialize", "is_main",
           "quiet_unless_main"]
