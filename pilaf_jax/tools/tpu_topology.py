"""TPU topologies without a TPU: the compiler's devices for a cloud accelerator type, per-chip figures.

`jax.experimental.topologies` (with `libtpu`, `pip install -e '.[aot]'`) describes a slice's chips on
any machine; tools/aot.py lowers and compiles a config's programs onto them. Bad names, a batch that
does not split over the chips, and GPU targets are PlanErrors with a one-line reason.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from pilaf_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-device figures (public spec sheets). A device is one chip, except where the compiler's
  topology lists each TensorCore as a device (v4 here: no megacore), where it is half a chip."""
  hbm_bytes: float
  bf16_flops: float  # Peak bf16 FLOP/s.
  hbm_bandwidth: float  # Bytes/s.


CHIPS = {  # jax device_kind -> per-chip figures.
    'TPU v5': Chip(95e9, 459e12, 2765e9),  # v5p
    'TPU v5 lite': Chip(16e9, 197e12, 819e9),  # v5e
    'TPU v4': Chip(32e9, 275e12, 1228e9),
    'TPU v6 lite': Chip(32e9, 918e12, 1640e9),  # v6e (Trillium)
}

# Cloud accelerator types -> compiler topologies. v5p and v4 names count TensorCores (2 per chip).
ACCELERATOR_TYPES = {
    **{f'v5p-{2 * math.prod(s)}': 'v5p:' + 'x'.join(map(str, s))
       for s in ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8))},
    **{f'v4-{2 * math.prod(s)}': 'v4:' + 'x'.join(map(str, s))
       for s in ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4))},
    **{f'v5litepod-{math.prod(s)}': 'v5e:' + 'x'.join(map(str, s))
       for s in ((2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))},
    **{f'v6e-{math.prod(s)}': 'v6e:' + 'x'.join(map(str, s))
       for s in ((2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))},
}

GPU_UNSUPPORTED = (
    "GPU targets cannot be compiled on a machine without a GPU with jax 0.10.2: "
    "jax.experimental.topologies.get_topology_desc('1x8', 'cuda') raises NotImplementedError "
    "('topology not implemented for cuda'), and with the CUDA plugin installed "
    "(jax-cuda12-plugin/pjrt 0.10.2) JaxRuntimeError ('FAILED_PRECONDITION: No visible GPU devices.'). "
    'Plan GPU runs with python -m pilaf_jax.tools.memory_report.')


class PlanError(ValueError):
  """A bad topology, a config that does not fit it, or a batch that does not split over it."""


def topology_name(name: str) -> str:
  """The compiler's topology name for a cloud accelerator type ('v5p-32') or a topology ('v5p:2x2x4')."""
  return ACCELERATOR_TYPES.get(name, name)


def _known() -> str:
  return ', '.join(f'{k} ({v})' for k, v in ACCELERATOR_TYPES.items() if k in (
      'v5p-32', 'v5p-64', 'v4-64', 'v5litepod-16', 'v5litepod-64', 'v6e-16'))


def topology_devices(name: str) -> list:
  """The devices of a TPU topology (no TPU needed). Raises PlanError for an unknown name."""
  if name.lower().startswith(('cuda', 'gpu', 'h100', 'a100', 'h200', 'b200')):
    raise PlanError(f'--topology={name}: {GPU_UNSUPPORTED}')
  try:
    from jax.experimental import topologies
    import libtpu  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    raise PlanError("compiling for TPU needs the TPU compiler: pip install -e '.[aot]' "
                    "(jax[tpu], which brings libtpu).") from None
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology_name(name)).devices)
  except Exception as e:  # pylint: disable=broad-except  (the compiler's error types vary)
    raise PlanError(f'--topology={name} is not a TPU topology the compiler knows ({first_line(e)}); '
                    f'use a cloud accelerator type or a topology, e.g. {_known()}.') from None


FAMILIES = {'TPU v5': 'v5p', 'TPU v5 lite': 'v5e', 'TPU v4': 'v4', 'TPU v6 lite': 'v6e'}  # device_kind -> topology prefix.


def smallest_fitting(family: str, cores_per_chip: int, devices_needed: int) -> str:
  """The smallest known accelerator type of a generation ('v5p', 'v5e', ...) with at least
  devices_needed devices (a device is a TensorCore where the compiler lists two per chip); ''
  when none is known."""
  sizes = sorted((math.prod(map(int, t.split(':')[1].split('x'))), name)
                 for name, t in ACCELERATOR_TYPES.items() if t.split(':')[0] == family)
  return next((name for chips, name in sizes if chips * cores_per_chip >= devices_needed), '')


def fit_hint(topology: str, devices: int, devices_needed: int) -> str:
  """What to rent when a program does not fit on `topology` (whose compiler lists `devices` devices)."""
  family, _, shape = topology_name(topology).partition(':')
  try:
    chips = math.prod(int(x) for x in shape.split('x'))
  except ValueError:
    chips = 0
  smallest = smallest_fitting(family, max(1, devices // chips), devices_needed) if chips else ''
  return (f'use a topology with at least ~{devices_needed} devices (now {devices})'
          + (f', e.g. {smallest}' if smallest else ''))


def first_line(e: BaseException) -> str:
  return ' '.join(str(e).split())[:200]


def chip_of(devices: Sequence[Any]) -> Chip:
  """Per-device figures of a topology's devices (half a chip where each TensorCore is a device)."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise PlanError(f'No HBM/FLOP figures for {kind!r}; add them to pilaf_jax.tools.aot.CHIPS.')
  chip = CHIPS[kind]
  cores = 1 + max(getattr(d, 'core_on_chip', 0) for d in devices)
  return Chip(chip.hbm_bytes / cores, chip.bf16_flops / cores, chip.hbm_bandwidth / cores)


def make_mesh(config, devices: Sequence[Any]):
  """The run's mesh over the topology's devices; PlanError (saying what to change) when the mesh or
  a batch does not fit the chip count."""
  n = len(devices)
  try:
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    for field in ('dpo.batch_size', 'sft.batch_size', 'eval.batch_size'):
      section, name = field.split('.')
      mesh_lib.check_batch_divisible(config[section][name], mesh, field)
  except ValueError as e:
    raise PlanError(f'{first_line(e)} Use a topology whose {n} devices divide the batch sizes, or '
                    f'change the batch sizes or config.mesh.') from None
  return mesh
