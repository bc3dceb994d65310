"""Placing loaded tensors on their shardings, and the stacked-layer (model.scan_layers) layout.

Checkpoints hold one tensor per decoder layer. A loader reads and places them layer by layer, each on
its slice's sharding (`per_layer_plan`), then stacks them on device (`stacked`): peak memory holds
the layers twice. Written once for every checkpoint format (hf.py, gguf.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.model.llama import is_stacked, stack_layer_params


@functools.lru_cache(maxsize=None)
def _copier(sharding: Any) -> Any:
  return jax.jit(jnp.copy, out_shardings=sharding)


def place(host: np.ndarray, sharding: Any) -> jax.Array:
  """host on `sharding` (or the default device), in buffers that do not keep `host` alive."""
  if sharding is None:
    return jnp.asarray(host)  # If a CPU device aliases `host`, that buffer is the array itself.
  # Each device (of this process) copies only its own slice.
  array = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  if (not sharding.is_fully_replicated and
      any(d.platform == 'cpu' for d in sharding.device_set)):
    # A CPU device may alias its slice of an aligned numpy buffer instead of copying it, which
    # would keep the whole host tensor alive for one shard; a device-side copy releases it.
    array = _copier(sharding)(array)
  return array


def per_layer_shardings(shardings: Any) -> tuple[dict, Any]:
  """(the non-layer entries, one layer's shardings) from shardings (or specs) of the stacked
  layout: each layer's array is sharded like its slice of the stacked array (layer axis dropped)."""
  from jax.sharding import NamedSharding, PartitionSpec

  def drop(x):
    if isinstance(x, NamedSharding):
      return NamedSharding(x.mesh, PartitionSpec(*tuple(x.spec)[1:]))
    if isinstance(x, PartitionSpec):
      return PartitionSpec(*tuple(x)[1:])
    return x  # A single-device sharding: the same for a slice.

  is_leaf = lambda x: isinstance(x, PartitionSpec)
  layers = shardings['layers']
  out = {k: v for k, v in shardings.items() if k != 'layers'}
  return out, jax.tree.map(drop, layers, is_leaf=is_leaf)


def to_scanned(params: dict, shardings: Any = None) -> dict:
  """Per-layer params -> the stacked layout, placed on `shardings` (stacked layout) when given."""
  if shardings is None:
    return stack_layer_params(params)
  return jax.jit(stack_layer_params, out_shardings=shardings)(params)


def per_layer_plan(shardings: Any, num_layers: int, scan_layers: Optional[bool]) -> tuple[Any, Any, bool]:
  """(per-layer shardings to load into, the stacked shardings or None, whether to stack at the end).

  shardings in the stacked layout (a dict with a `layers` subtree) become one entry per layer
  ('layers_<i>', each sharded like its slice); scan_layers=None stacks exactly when they were."""
  if not (isinstance(shardings, dict) and is_stacked(shardings)):
    return shardings, None, bool(scan_layers)
  rest, layer = per_layer_shardings(shardings)
  per_layer = dict(rest, **{f'layers_{i}': layer for i in range(num_layers)})
  return per_layer, shardings, True if scan_layers is None else scan_layers


def stacked(cfg: Any, params: dict, scan_layers: bool, stacked_shardings: Any) -> tuple[Any, dict]:
  """(cfg, params) in the stacked layout when scan_layers, on stacked_shardings (see per_layer_plan)."""
  if not scan_layers:
    return cfg, params
  return dataclasses.replace(cfg, scan_layers=True), to_scanned(params, stacked_shardings)
