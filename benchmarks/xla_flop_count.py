r"""Does XLA's cost analysis count every FLOP of a training step's matmuls? Probes on TPU topologies.

  python benchmarks/xla_flop_count.py                # all probes (~2 minutes on 2 cores)
  python benchmarks/xla_flop_count.py --probes=layer_fsdp,layer_fsdp_no_windowed

Compiled for TPU chips without a TPU (libtpu: pip install -e '.[aot]'), per chip:
  matmul_*            grad of one [8192, 4096] x [4096, 4096] bf16 matmul on v5p:2x2x1 (4 chips,
                      rows split, weight replicated): the model's custom-VJP _matmul, plain
                      jnp.matmul, plain matmul behind an optimization barrier. Exact: 6 MKN.
  layer_*             grad of one decoder layer (d 1024, F 3584, 8 heads, 2 kv heads, 1024 tokens,
                      4 rows per chip): custom vs plain matmul, with and without full remat, weights
                      replicated or split over fsdp on v5p:2x2x4 (16 chips), and the same with
                      XLA:TPU's windowed einsums off.
Each line prints XLA's FLOPs over the forward pass's (3.00 = forward + backward, 3.78 = plus the
rematerialised forward as XLA computes it) and the cost-model time. Figures: docs/scale_out.md.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from pilaf_jax.model import llama  # noqa: E402
from pilaf_jax.tools.aot import COST_COMPILER_OPTIONS, cost_of  # noqa: E402


def _mesh(topology: str) -> Mesh:
  devices = topologies.get_topology_desc(platform='tpu', topology_name=topology).devices
  return Mesh(np.array(devices).reshape(-1), ('fsdp',))


def matmul_probe(mm) -> tuple[float, float]:
  mesh = _mesh('v5p:2x2x1')
  m, k, n = 8192, 4096, 4096
  loss = lambda x, w: jnp.sum(mm(x, w.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P('fsdp')))
  w = jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=NamedSharding(mesh, P()))
  cost = cost_of(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile())
  return cost.flops / (2 * m * k * n / mesh.size), cost.seconds


def layer_probe(plain: bool, remat: bool, fsdp: bool, options: dict | None = None) -> tuple[float, float]:
  mesh = _mesh('v5p:2x2x4' if fsdp else 'v5p:2x2x1')
  cfg = llama.LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=3584, num_layers=1,
                          num_heads=8, num_kv_heads=2, head_dim=128, dtype='bfloat16')
  b, t = 4 * mesh.size, 1024
  layer = (llama.nn.remat(llama.DecoderLayer) if remat else llama.DecoderLayer)(cfg)
  pos, valid = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool)
  x0 = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.bfloat16, sharding=NamedSharding(mesh, P('fsdp')))
  params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x0.shape, x0.dtype), pos, valid, None, 0))
  split = lambda a: P('fsdp') if fsdp and a.ndim == 2 else P()
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, split(a))), params)

  def loss(p, x):
    return jnp.sum(layer.apply(p, x, pos, valid, None, 0)[0].astype(jnp.float32) ** 2)

  saved = llama._matmul  # pylint: disable=protected-access
  llama._matmul = jnp.matmul if plain else saved
  try:
    cost = cost_of(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x0).compile(compiler_options=options))
  finally:
    llama._matmul = saved
  d, hd, f = cfg.hidden_size, cfg.resolved_head_dim, cfg.intermediate_size
  n = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d + 3 * d * f
  forward = b * t / mesh.size * (2 * n + 4 * cfg.num_heads * hd * t)
  return cost.flops / forward, cost.seconds


PROBES = {
    'matmul_custom': lambda: matmul_probe(llama._matmul),  # pylint: disable=protected-access
    'matmul_plain': lambda: matmul_probe(jnp.matmul),
    'matmul_barrier': lambda: matmul_probe(lambda x, w: jnp.matmul(jax.lax.optimization_barrier(x), w)),
    'layer_custom': lambda: layer_probe(plain=False, remat=False, fsdp=False),
    'layer_plain': lambda: layer_probe(plain=True, remat=False, fsdp=False),
    'layer_remat_custom': lambda: layer_probe(plain=False, remat=True, fsdp=False),
    'layer_remat_plain': lambda: layer_probe(plain=True, remat=True, fsdp=False),
    'layer_fsdp': lambda: layer_probe(plain=False, remat=True, fsdp=True),
    'layer_fsdp_plain': lambda: layer_probe(plain=True, remat=True, fsdp=True),
    'layer_fsdp_no_windowed': lambda: layer_probe(plain=False, remat=True, fsdp=True, options=COST_COMPILER_OPTIONS),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--probes', default=','.join(PROBES), help='comma-separated, of: ' + ', '.join(PROBES))
  for name in parser.parse_args().probes.split(','):
    ratio, seconds = PROBES[name]()
    print(f'{name:24s} XLA FLOPs / forward {ratio:5.2f}   cost-model time {seconds * 1e3:7.3f} ms', flush=True)


if __name__ == '__main__':
  main()
