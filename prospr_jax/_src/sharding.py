"""Data parallelism: one mesh axis over devices, batches sharded on it, everything else replicated.

Scoring and training are jitted programs whose inputs carry shardings: with the batch split over the
``'data'`` axis of a :class:`jax.sharding.Mesh` and the parameters replicated, XLA runs every
computation data-parallel and inserts the all-reduces itself. Reductions over the batch axis are
GLOBAL: the loss mean, the gradient, and BatchNorm's batch statistics are those of the whole global
batch, so a run on N devices computes what one device computes on the same global batch (up to the
summation order of floats).

The same code serves one process with several devices and many processes (``jax.distributed``): each
process holds its share of each global batch (:func:`process_rows`), :func:`shard_batch` assembles
the global array from the shares, :func:`replicate` places values every process holds. A model too big
to replicate would shard its parameters over a second ``'model'`` mesh axis instead (e.g. a
``NamedSharding(mesh, P(None, 'model'))`` on the large kernels passed as ``in_shardings``); the
library's programs take whatever shardings their inputs carry.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prospr_jax._src.tree import PyTree, named_leaves, names_in_order
from prospr_jax._src.validate import check_int

DATA_AXIS = "data"


def data_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over the first ``num_devices`` devices (default: every device of
    every process, ``jax.devices()``).

    With several processes the mesh must hold the same number of devices of each process: pass
    ``None`` or a multiple of ``jax.process_count()`` (each process contributes its first
    ``num_devices // process_count`` local devices).
    """
    devices = jax.devices()
    if num_devices is None:
        return Mesh(np.array(devices), (DATA_AXIS,))
    n = check_int(num_devices, "num_devices", low=1, high=len(devices))
    processes = jax.process_count()
    if n % processes:
        raise ValueError(
            f"`num_devices`={n} must be a multiple of the number of processes ({processes}): every process "
            "contributes the same number of devices"
        )
    per_process = n // processes
    chosen = [d for p in range(processes) for d in [d for d in devices if d.process_index == p][:per_process]]
    return Mesh(np.array(chosen), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds whole."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """The sharding that splits array axis ``axis`` (the batch axis) over the mesh's ``'data'`` axis."""
    axis = check_int(axis, "axis", low=0)
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), DATA_AXIS))


def process_rows(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch that THIS process loads: a contiguous ``slice`` of length
    ``global_batch_size / process_count`` (process ``p`` takes the ``p``-th block).

    Raises:
      ValueError: a global batch that does not split evenly over the mesh's devices (the error names
        the batch size and the device count; pick a multiple).
    """
    size = check_int(global_batch_size, "global_batch_size", low=1)
    devices = mesh.devices.size
    if size % devices:
        raise ValueError(
            f"the global batch of {size} examples does not split over {devices} devices: use a batch size "
            f"that is a multiple of {devices} (or fewer devices, e.g. --num-devices)"
        )
    processes = jax.process_count()
    per_process = size // processes
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def shard_batch(local_batch: PyTree, mesh: Mesh, *, axis: int = 0) -> PyTree:
    """The global batch, sharded over ``'data'`` along ``axis``, from this process's rows of it.

    Args:
      local_batch: pytree of arrays: with one process, the whole batch; with several, this process's
        rows (:func:`process_rows`) along ``axis``.
      mesh: a mesh from :func:`data_mesh`.
      axis: the batch axis (1 for ProsPr's stacked ``[M + 1, B, ...]`` batches).

    Returns:
      Global ``jax.Array`` leaves of ``process_count`` times the local batch size along ``axis``.

    Raises:
      ValueError: a leaf whose batch axis does not split evenly over the devices (naming the leaf).
    """
    sharding = batch_sharding(mesh, axis)
    processes = jax.process_count()
    local_devices = mesh.devices.size // processes
    bad = [
        f"{name}: {np.shape(x)}" for name, x in named_leaves(local_batch)
        if np.ndim(x) <= axis or np.shape(x)[axis] % local_devices
    ]
    if bad:
        raise ValueError(
            f"every leaf of the batch needs an axis {axis} whose size divides over the {mesh.devices.size} "
            f"devices ({local_devices} per process); got {names_in_order(bad)}"
        )

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        shape = list(x.shape)
        shape[axis] *= processes
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree_util.tree_map(one, local_batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` placed whole on every device of ``mesh`` (each process passes the same values)."""
    sharding = replicated(mesh)

    def one(x: Any) -> jax.Array:
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if not (x.is_fully_addressable or x.is_fully_replicated):
                raise ValueError("`tree` holds an array sharded over other processes' devices: gather it first")
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(one, tree)


def describe_mesh(mesh: Mesh) -> str:
    """One line for logs: devices, their kind, processes."""
    devices = mesh.devices.ravel()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"mesh {dict(mesh.shape)}: {devices.size} device(s) ({', '.join(kinds)}) "
        f"over {jax.process_count()} process(es)"
    )


__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "data_mesh",
    "describe_mesh",
    "process_rows",
    "replicate",
    "replicated",
    "shard_batch",
]
