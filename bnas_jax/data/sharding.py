"""Data parallelism: the 1-D device mesh, the batch sharding and the placement of host batches.

`make_mesh` builds a 1-D mesh over all devices (axis ``'data'``); with
``sharding=batch_sharding(mesh)`` each global batch is split along its batch axis
(``NamedSharding(mesh, P('data'))``). With several processes each process loads only its own rows
of the global batch and the global array is assembled with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnas_jax.data.dataset import DatasetError

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``'data'``."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, P('data'))``: arrays split along their leading (batch) axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(sharding: jax.sharding.Sharding, batch_size: int) -> int:
  """The number of devices of `sharding`.

  Raises:
    DatasetError: `batch_size` is not divisible by it (naming the fix).
  """
  n = len(sharding.device_set)
  if batch_size % n:
    raise DatasetError(
        f'batch size {batch_size} is not divisible by the {n} devices of the data sharding; use a '
        f'multiple of {n} (or fewer devices).')
  return n


def local_rows(sharding: jax.sharding.Sharding, batch_size: int) -> slice:
  """The rows of a global batch held by this process's devices (contiguous for `make_mesh`)."""
  if jax.process_count() == 1:
    return slice(0, batch_size)
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return slice(min(starts), max(stops))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
                global_batch_size: int | None = None) -> dict[str, jax.Array]:
  """Places process-local host arrays as global arrays split along the batch axis.

  Args:
    batch: ``{key: array[B_local, ...]}``; on one process ``B_local`` is the global batch size.
    sharding: usually `batch_sharding` ``(make_mesh())``.
    global_batch_size: the global batch size (default: ``B_local * process_count``).

  Returns:
    ``{key: jax.Array[B, ...]}`` with ``sharding`` (a plain ``device_put`` on one process).

  Raises:
    DatasetError: the global batch size is not divisible by the number of devices.
  """
  out = {}
  for k, v in batch.items():
    b = global_batch_size or v.shape[0] * jax.process_count()
    check_divisible(sharding, b)
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      out[k] = jax.make_array_from_process_local_data(sharding, v, (b,) + v.shape[1:])
  return out

