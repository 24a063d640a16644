"""Devices, mesh and shardings: data parallel by default, FSDP as an option, multi-host aware.

One mesh axis, "data", over every device of every process. Batches are split along it. With
"dp" the parameters and optimizer state are replicated (each device holds a copy; XLA inserts the
gradient all-reduce); with "fsdp" each array is split along its largest dimension that the device
count divides (XLA gathers parameters for the forward pass and reduce-scatters gradients), so
memory per device falls roughly by the device count.

Several processes (several hosts, or several local processes in the tests) join through
`jax.distributed.initialize()`: explicitly from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or detected by jax itself under SLURM or Open MPI.
"""

from __future__ import annotations

import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def initialize_distributed() -> bool:
    """Join a multi-process run when the environment describes one. True if this is multi-process."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if "JAX_COORDINATOR_ADDRESS" in os.environ and "JAX_NUM_PROCESSES" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ.get("JAX_PROCESS_ID", "0")),
        )
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()  # jax reads the cluster layout from SLURM / Open MPI
        return True
    return False


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split axis `batch_axis` of an `ndim`-dimensional batch over the devices."""
    spec = [None] * ndim
    spec[batch_axis] = AXIS
    return NamedSharding(mesh, P(*spec))


def leaf_sharding(x, mesh: Mesh, strategy: Literal["dp", "fsdp"]) -> NamedSharding:
    """Replicated ("dp"), or split along the largest dimension the device count divides ("fsdp").

    FSDP splits floating-point arrays only (parameters, moments): the integer leaves are counters and
    the PRNG key data, a few bytes, and key data must stay whole (jax refuses a key whose uint32[2]
    is split, which on 2 devices crashed the first `fold_in`)."""
    n = mesh.shape[AXIS]
    shape = getattr(x, "shape", ())
    floating = jnp.issubdtype(getattr(x, "dtype", jnp.float32), jnp.floating)
    if strategy == "fsdp" and n > 1 and len(shape) > 0 and floating:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % n == 0:
                spec = [None] * len(shape)
                spec[axis] = AXIS
                return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def tree_shardings(tree, mesh: Mesh, strategy: Literal["dp", "fsdp"]):
    """A sharding for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: leaf_sharding(x, mesh, strategy), tree)


def global_batch(local_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One process's slice of the global batch -> the global, sharded jax.Array (one transfer).

    Every process passes its own rows; with one process this is a plain device_put.
    """
    return jax.make_array_from_process_local_data(sharding, local_batch)
