"""The device mesh: three named axes, resolved from the config, and the shardings of batch data.

Axes, outermost first:

  data    pure data parallelism: parameters replicated, batch rows split.
  fsdp    data parallelism with parameters (and optimizer state) split across it as well
          (ZeRO-3 / FSDP); XLA all-gathers a layer's weights where it is used.
  tensor  Megatron-style tensor parallelism: attention heads and MLP hidden units split.

Batch rows are split over ('data', 'fsdp') together. `tensor` is innermost so that, with the usual
process-major device order, its collectives stay inside one host.

Axis types are Auto (GSPMD propagation): the model code carries no sharding annotations and XLA
propagates the parameter and input shardings through it.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# A real Mesh, or only its axis sizes (enough for arithmetic: see tools/memory_report.py).
MeshLike = Union[Mesh, Mapping[str, int]]


def axis_sizes(mesh: MeshLike) -> dict[str, int]:
  """{axis name: size} of a Mesh, an AbstractMesh or a plain mapping."""
  shape = mesh.shape if hasattr(mesh, 'shape') else mesh
  return {name: int(size) for name, size in dict(shape).items()}


def _describe(sizes: Mapping[str, Any]) -> str:
  return ', '.join(f'mesh.{name}={sizes[name]}' for name in MESH_AXES)


def resolve_mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for num_devices devices; a -1 entry takes the remaining devices.

  Raises ValueError, naming the config fields, when the sizes cannot tile the devices exactly.
  """
  if num_devices < 1:
    raise ValueError(f'A mesh needs at least one device; got {num_devices}.')
  names = set(dict(mesh_cfg))
  if names != set(MESH_AXES):
    raise ValueError(f'The mesh config must have exactly the fields {list(MESH_AXES)}; '
                     f'got {sorted(names)}.')
  sizes = {name: mesh_cfg[name] for name in MESH_AXES}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f'mesh.{name}={size!r} must be a positive integer, or -1 for all remaining '
                       f'devices ({_describe(sizes)}).')
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f'At most one mesh axis may be -1 (all remaining devices); got {_describe(sizes)}.')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if num_devices % fixed:
      fixed_desc = ' x '.join(f'mesh.{n}={s}' for n, s in sizes.items() if s != -1)
      raise ValueError(f'{fixed_desc} = {fixed} does not divide the {num_devices} devices, so '
                       f'mesh.{rest[0]}=-1 cannot take the rest ({_describe(sizes)}).')
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'The mesh has {fixed} devices ({_describe(sizes)}) but {num_devices} devices '
                     f'are available; make the product equal {num_devices} or set one axis to -1.')
  return tuple(sizes[name] for name in MESH_AXES)


def _device_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as `shape`, in a topology-aware order on TPU when jax knows one."""
  try:
    from jax.experimental import mesh_utils
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    # The ICI-aware order is only an optimisation; a plain reshape is always a valid mesh.
    logging.warning('Topology-aware device order unavailable (%s); using the listed order.', e)
    return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') Mesh over `devices` (default: all devices) with Auto axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  # jax.make_mesh would default to Explicit axes; the model relies on propagation, so Auto.
  return Mesh(_device_grid(shape, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def num_batch_shards(mesh: MeshLike) -> int:
  """How many ways batch rows are split: data x fsdp."""
  sizes = axis_sizes(mesh)
  return math.prod(sizes.get(name, 1) for name in BATCH_AXES)


def batch_spec(ndim: int) -> P:
  """Rows (axis 0) over data x fsdp, every other axis replicated."""
  return P(BATCH_AXES, *([None] * (ndim - 1))) if ndim else P()


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of an ndim-array whose axis 0 is the batch."""
  return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh: MeshLike, what: str) -> None:
  """Raises ValueError unless batch_size rows split evenly over the data-parallel shards.

  what names the config field, e.g. 'dpo.batch_size'.
  """
  sizes = axis_sizes(mesh)
  shards = num_batch_shards(sizes)
  if batch_size % shards:
    raise ValueError(f'{what}={batch_size} is not divisible by the {shards} data-parallel shards '
                     f'(mesh data={sizes.get("data", 1)} x fsdp={sizes.get("fsdp", 1)}).')
