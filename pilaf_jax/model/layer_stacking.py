"""Per-layer params (`layers_0` ... `layers_{L-1}`) and the scanned layout (`layers`, leading [L] axis)."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def _layer_index(name: str) -> Optional[int]:
  if name.startswith('layers_') and name[len('layers_'):].isdigit():
    return int(name[len('layers_'):])
  return None


def is_stacked(params: Any) -> bool:
  """Whether params (or anything shaped like them: shardings, specs) are in the scanned layout."""
  return isinstance(params, dict) and 'layers' in params


def stack_layer_params(params: Any) -> dict:
  """Per-layer params (`layers_0` ... `layers_{L-1}`) -> the scanned layout (`layers`, every leaf
  with a leading [L] axis). Other entries (embedding, final norm, heads) are kept as they are."""
  layers = sorted((i, k) for k in params if (i := _layer_index(k)) is not None)
  if [i for i, _ in layers] != list(range(len(layers))) or not layers:
    raise ValueError(f'expected params layers_0 ... layers_N, got {sorted(params)}.')
  out = {k: v for k, v in params.items() if _layer_index(k) is None}
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for _, k in layers])
  return out


def unstack_layer_params(params: Any) -> dict:
  """The scanned layout (`layers`, leading [L] axis) -> per-layer params `layers_0` ... ."""
  if not is_stacked(params):
    raise ValueError(f'expected scanned params with a "layers" entry, got {sorted(params)}.')
  num_layers = jax.tree.leaves(params['layers'])[0].shape[0]
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return out
