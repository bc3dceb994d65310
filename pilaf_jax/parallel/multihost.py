"""Multi-process (multi-host) runs: starting jax.distributed and moving data between hosts and the mesh.

Every process runs the same program. Each sees its local devices; jax.devices() lists all of them,
and jitted functions on global arrays run as one SPMD program across processes.

Settings come from config.distributed, and these environment variables override them when set
(launchers set them per process, see launch/):

  PILAF_COORDINATOR       host:port of process 0's coordinator service, or 'auto'
  PILAF_NUM_PROCESSES     total number of processes
  PILAF_PROCESS_ID        this process, 0 .. num_processes - 1
  PILAF_LOCAL_DEVICE_IDS  comma-separated local device ids this process uses (e.g. one GPU each)

coordinator 'auto' lets jax.distributed detect the cluster (Cloud TPU VMs, SLURM, Open MPI).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pilaf_jax.parallel.mesh import BATCH_AXES, batch_spec

ENV_COORDINATOR = 'PILAF_COORDINATOR'
ENV_NUM_PROCESSES = 'PILAF_NUM_PROCESSES'
ENV_PROCESS_ID = 'PILAF_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'PILAF_LOCAL_DEVICE_IDS'


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  coordinator_address: str  # '' (single process), 'auto' or host:port.
  num_processes: int
  process_id: int
  local_device_ids: Optional[tuple[int, ...]]  # None: all local devices.

  @property
  def enabled(self) -> bool:
    return bool(self.coordinator_address) or self.num_processes > 1


def parse_device_ids(text: Any) -> Optional[tuple[int, ...]]:
  """'0,1,2' -> (0, 1, 2); '' or None -> None. Ints and sequences pass through."""
  if text is None or text == '':
    return None
  if isinstance(text, int):
    return (text,)
  if isinstance(text, str):
    try:
      return tuple(int(t) for t in text.split(',') if t.strip())
    except ValueError:
      raise ValueError(f'distributed.local_device_ids={text!r} must be a comma-separated list of '
                       'integers, e.g. "0,1".') from None
  return tuple(int(t) for t in text)


def resolve_settings(dist_cfg: Mapping[str, Any],
                     environ: Optional[Mapping[str, str]] = None) -> DistributedSettings:
  """config.distributed with the PILAF_* environment overrides applied, validated."""
  env = os.environ if environ is None else environ
  cfg = dict(dist_cfg)

  def pick(env_name, field, cast):
    raw = env.get(env_name, '')
    if raw == '':
      return cfg.get(field)
    try:
      return cast(raw)
    except ValueError:
      raise ValueError(f'{env_name}={raw!r} is not a valid {field}.') from None

  coordinator = str(pick(ENV_COORDINATOR, 'coordinator_address', str) or '').strip()
  num_processes = int(pick(ENV_NUM_PROCESSES, 'num_processes', int) or 1)
  process_id = int(pick(ENV_PROCESS_ID, 'process_id', int) or 0)
  device_ids = parse_device_ids(pick(ENV_LOCAL_DEVICE_IDS, 'local_device_ids', str))
  if coordinator != 'auto':
    if num_processes < 1:
      raise ValueError(f'distributed.num_processes={num_processes} must be >= 1.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'distributed.process_id={process_id} must be in [0, {num_processes}) '
                       f'(distributed.num_processes={num_processes}).')
    if num_processes > 1 and not coordinator:
      raise ValueError(f'distributed.num_processes={num_processes} needs '
                       "distributed.coordinator_address (host:port of process 0, or 'auto').")
  return DistributedSettings(coordinator, num_processes, process_id, device_ids)


def _enable_cpu_collectives() -> None:
  """Cross-process collectives on the CPU backend.

  jax >= 0.5 uses gloo by default (0.10 no longer accepts 'none'); older versions defaulted to no
  cross-process CPU collectives, so set gloo when the setting is off. GPU/TPU are unaffected.
  """
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:  # A jax without the setting.
    pass


def initialize_distributed(dist_cfg: Mapping[str, Any],
                           environ: Optional[Mapping[str, str]] = None) -> DistributedSettings:
  """Starts jax.distributed when the settings ask for more than one process; else does nothing.

  Must run before anything touches jax devices (jax.devices(), any computation). Idempotent.
  """
  settings = resolve_settings(dist_cfg, environ)
  if not settings.enabled:
    return settings
  if jax.distributed.is_initialized():
    return settings
  _enable_cpu_collectives()
  ids = list(settings.local_device_ids) if settings.local_device_ids is not None else None
  if settings.coordinator_address == 'auto':
    logging.info('jax.distributed.initialize() with cluster auto-detection.')
    jax.distributed.initialize(local_device_ids=ids)
  else:
    logging.info('jax.distributed.initialize(%s, num_processes=%d, process_id=%d)',
                 settings.coordinator_address, settings.num_processes, settings.process_id)
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                               settings.process_id, local_device_ids=ids)
  logging.info('Process %d of %d: %d local devices, %d in all.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return settings


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and other single-writer files."""
  return jax.process_index() == 0


def host_local_to_global(tree: Any, mesh: Mesh, spec: Optional[P] = None) -> Any:
  """Assembles global arrays from the rows each process holds.

  Every process passes the rows its devices hold (same shapes on every process): with the usual
  process-major device order that is rows process_rows(global_rows, mesh) of the global batch.
  spec (for every leaf) defaults to rows over ('data', 'fsdp'), the rest replicated. With one
  process this is a device_put.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, batch_spec(x.ndim) if spec is None else spec), x)
  return jax.tree.map(one, tree)


def global_to_host(tree: Any) -> Any:
  """Full numpy copies of global arrays on every process.

  Arrays this process can read whole (single process, or replicated) are copied locally; others
  are all-gathered, which is a collective: every process must call this with the same tree.
  """
  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def process_rows(global_rows: int, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> slice:
  """The rows of a [global_rows, ...] batch that this process's devices hold.

  That is the slice of a globally known batch to pass to host_local_to_global.
  """
  sharding = NamedSharding(mesh, P(tuple(axes)))
  index = sharding.addressable_devices_indices_map((global_rows,))
  starts = sorted({(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
                   for i in index.values()})
  start, stop = starts[0][0], starts[-1][1]
  if sum(b - a for a, b in starts) != stop - start:
    raise ValueError(f'This process holds non-contiguous rows {starts} of the batch; '
                     'order the mesh so that each process owns a contiguous block.')
  return slice(start, stop)


def sync(name: str) -> None:
  """Barrier: blocks until every process reaches sync(name). No-op with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
