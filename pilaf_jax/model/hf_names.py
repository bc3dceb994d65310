"""Our Flax params tree and Hugging Face tensor names: the mapping (see hf.py's table) and the tree's
shapes for a config."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pilaf_jax.model.llama import LlamaConfig, init_params


def hf_param_shapes(cfg: LlamaConfig, num_labels: int = 0, dtype: Any = None) -> dict:
  """ShapeDtypeStructs of the params tree load_hf_checkpoint returns (for planning shardings).

  num_labels > 0: a sequence-classification model, with score/kernel [d, num_labels] and no lm_head.
  """
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  shapes = dict(shapes)
  if num_labels:
    shapes.pop('lm_head', None)
    shapes['score'] = {'kernel': jax.ShapeDtypeStruct((cfg.hidden_size, num_labels), jnp.float32)}
  if dtype is not None:
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)
  return shapes


def _key(k: Any) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))


def flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return {tuple(_key(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """(HF tensor name, whether the HF tensor is our array transposed) of one of our param paths."""
  *modules, leaf = path
  if modules == ['embed_tokens'] and leaf == 'embedding':
    return 'model.embed_tokens.weight', False
  if modules in (['lm_head'], ['score']) and leaf == 'kernel':
    return f'{modules[0]}.weight', True
  if modules and modules[0].startswith('layers_'):
    modules = ['layers', modules[0][len('layers_'):]] + modules[1:]
  name = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]
  return 'model.' + '.'.join(modules + [name]), leaf == 'kernel'


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree
