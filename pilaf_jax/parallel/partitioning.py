"""How parameters, optimizer state and KV caches are laid out on the ('data', 'fsdp', 'tensor') mesh.

Parameters are matched by regex against their '/'-joined path (`layers_3/mlp/down_proj/kernel`);
the first matching rule gives the PartitionSpec. Kernels are [in, out] (Flax Dense), so the
Megatron layout is:

  column-parallel  q/k/v, gate/up:            [d, out] -> ('fsdp', 'tensor')
  output head      lm_head                    [d, V]   -> (None, ('tensor', 'fsdp'))
  row-parallel     o_proj, down_proj:         [in, d]  -> ('tensor', 'fsdp')
  embedding        [vocab, d]                          -> ('tensor', 'fsdp')
  norms, biases    replicated (a few KB per layer)

Scanned layers (model.scan_layers) keep every layer's arrays in one `layers/...` leaf with a leading
[num_layers] axis; that axis is never sharded (each scan step reads one layer), so their spec is the
per-layer rule's with a None in front (`layers/mlp/down_proj/kernel` -> (None, 'tensor', 'fsdp')).

With tensor=1 this is plain FSDP (every matrix split over fsdp on its model dimension); with
fsdp=1 it is plain tensor parallelism. Optimizer moments follow their parameter.

Everything here also works on specs alone, with a mesh given as {axis: size}, so that memory can
be planned for a mesh that does not exist on this machine (tools/memory_report.py).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pilaf_jax.model.llama import KVCache, LlamaConfig, init_params
from pilaf_jax.parallel.mesh import BATCH_AXES, MeshLike, axis_sizes

Rules = Sequence[tuple[str, P]]

LLAMA_RULES: Rules = (
    (r'(^|/)embed_tokens/embedding$', P('tensor', 'fsdp')),
    (r'/self_attn/(q_proj|k_proj|v_proj)/kernel$', P('fsdp', 'tensor')),
    (r'/self_attn/o_proj/kernel$', P('tensor', 'fsdp')),
    (r'/mlp/(gate_proj|up_proj)/kernel$', P('fsdp', 'tensor')),
    (r'/mlp/down_proj/kernel$', P('tensor', 'fsdp')),
    # The output head is split on the vocabulary only: each chip then computes its rows' logits for
    # its vocabulary slice, and the head's weight gradient stays split. Split on d (the
    # column-parallel rule above), XLA materialised the whole batch's logit gradients on every
    # chip: the DPO step on v5p-32 needed 49.9 GB per chip instead of 28.2 (docs/scale_out.md).
    (r'(^|/)lm_head/kernel$', P(None, ('tensor', 'fsdp'))),
    # Reward-model head [d, num_labels]: num_labels is tiny (often 1), so only d is split.
    (r'(^|/)score/kernel$', P('fsdp', None)),
    # Replicated: every device needs all of a norm, and biases are tiny.
    (r'(^|/)(input_layernorm|post_attention_layernorm|norm)/scale$', P()),
    (r'/bias$', P()),
)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def key_name(key: Any) -> str:
  """One path entry as text: DictKey 'a' -> 'a', GetAttrKey 'mu' -> 'mu', SequenceKey 0 -> '0'."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  return '/'.join(key_name(k) for k in path)


def spec_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, 'fsdp' or ('data', 'fsdp'))."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _match(path: str, rules: Rules) -> Optional[tuple[str, P]]:
  for pattern, spec in rules:
    if re.search(pattern, path):
      return pattern, spec
  return None


def spec_problems(path: str, shape: Sequence[int], spec: P, sizes: dict[str, int],
                  rule: str = '') -> list[str]:
  """Why `spec` cannot shard an array of `shape` on a mesh of `sizes` (empty when it can)."""
  where = f" (rule {rule!r} -> {spec})" if rule else f' (spec {spec})'
  if len(spec) > len(shape):
    return [f'{path}: spec has {len(spec)} entries for a {len(shape)}-d array of shape '
            f'{tuple(shape)}{where}.']
  problems = []
  for dim, entry in enumerate(spec):
    axes = spec_axes(entry)
    unknown = [a for a in axes if a not in sizes]
    if unknown:
      problems.append(f'{path}: mesh has no axis {unknown} (axes: {sorted(sizes)}){where}.')
      continue
    ways = math.prod(sizes[a] for a in axes)
    if shape[dim] % ways:
      split = ' x '.join(f'{a}={sizes[a]}' for a in axes)
      problems.append(f'{path}: dim {dim} of size {shape[dim]} is not divisible by {ways} '
                      f'(mesh {split}){where}.')
  return problems


def param_partition_specs(params: Any, rules: Rules = LLAMA_RULES,
                          mesh: Optional[MeshLike] = None) -> Any:
  """PartitionSpec of every leaf of a params tree (arrays or ShapeDtypeStructs).

  With a mesh (a Mesh or {axis: size}), checks that every sharded dim divides evenly. Raises
  ValueError listing every parameter no rule matches and every dim that does not divide.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  sizes = axis_sizes(mesh) if mesh is not None else None
  specs, problems = [], []
  for path, leaf in leaves:
    name = path_str(path)
    found = _match(name, rules)
    if found is None:
      problems.append(f'{name}: no partition rule matches (shape {tuple(np.shape(leaf))}).')
      specs.append(P())
      continue
    rule, spec = found
    if re.match(r'(.*/)?layers/', name):
      spec = P(None, *spec)  # The stacked layer axis of scanned layers.
    if sizes is not None:
      problems += spec_problems(name, np.shape(leaf), spec, sizes, rule)
    specs.append(spec)
  if problems:
    shown = problems[:20] + ([f'... and {len(problems) - 20} more.'] if len(problems) > 20 else [])
    raise ValueError('Cannot partition the parameters:\n  ' + '\n  '.join(shown))
  return jax.tree_util.tree_unflatten(treedef, specs)


def to_shardings(specs: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def param_shardings(params: Any, mesh: Mesh, rules: Rules = LLAMA_RULES) -> Any:
  """NamedSharding of every parameter (validated against the mesh)."""
  return to_shardings(param_partition_specs(params, rules, mesh), mesh)


def _spec_of(value: Any) -> P:
  return value.spec if isinstance(value, NamedSharding) else value


def optimizer_state_partition(opt_state: Any, param_values: Any, default: Any, params: Any = None,
                              is_leaf: Optional[Callable[[Any], bool]] = None) -> Any:
  """Maps each optimizer-state leaf to the value (spec or sharding) of the parameter it mirrors.

  A state leaf mirrors a parameter when its path ends with that parameter's path: optax's mu/nu
  (`1/0/mu/layers_0/mlp/up_proj/kernel`) wherever they sit in a chain, inject_hyperparams or
  masked wrapper. It must also have the parameter's shape (when `params`, arrays or
  ShapeDtypeStructs, is given) or at least as many dims as the spec has entries, so that factored
  statistics (Adafactor's v_row) fall back to `default`. Counts, schedule steps and other scalars
  mirror nothing and get `default`. param_values has the params' tree structure.
  """
  flat = jax.tree_util.tree_flatten_with_path(param_values, is_leaf=is_leaf)[0]
  index = {tuple(key_name(k) for k in path): value for path, value in flat}
  shapes = None
  if params is not None:
    shapes = {tuple(key_name(k) for k in path): tuple(np.shape(leaf))
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(shapes) != set(index):
      raise ValueError('params and their specs/shardings have different tree paths.')
  lengths = sorted({len(k) for k in index}, reverse=True)  # Longest (most specific) match first.

  def lookup(path, leaf):
    names = tuple(key_name(k) for k in path)
    for n in lengths:
      key = names[-n:]
      if n > len(names) or key not in index:
        continue
      value = index[key]
      fits = (shapes[key] == tuple(np.shape(leaf)) if shapes is not None
              else len(_spec_of(value)) <= np.ndim(leaf))
      if fits:
        return value
    return default

  return jax.tree_util.tree_map_with_path(lookup, opt_state)


def optimizer_state_specs(opt_state: Any, param_specs: Any, params: Any = None) -> Any:
  """PartitionSpec of every optimizer-state leaf: moments like their parameter, the rest P()."""
  return optimizer_state_partition(opt_state, param_specs, P(), params, is_leaf=_is_spec)


def optimizer_state_shardings(opt_state: Any, params_shardings: Any, params: Any = None) -> Any:
  """NamedSharding of every optimizer-state leaf: moments like their parameter, the rest replicated.

  opt_state: the state or its eval_shape (e.g. `jax.eval_shape(tx.init, param_shapes)`). Passing
  the params (or their shapes) as well makes the match check shapes, not only paths.
  """
  flat = jax.tree_util.tree_leaves(params_shardings)
  if not flat:
    raise ValueError('params_shardings is empty.')
  return optimizer_state_partition(opt_state, params_shardings, NamedSharding(flat[0].mesh, P()),
                                   params)


def shard_params(params: Any, shardings: Any) -> Any:
  """Places host or device params onto their shardings.

  For a multi-process run every process must pass the same values (e.g. the same checkpoint or the
  same init seed); to avoid materialising a large model on one device, use init_sharded_params.
  """
  return jax.device_put(params, shardings)


def sharded_init(cfg: LlamaConfig, mesh: Mesh, rules: Rules = LLAMA_RULES) -> Callable[[jax.Array], Any]:
  """init_params(cfg, rng) as a jitted function of rng whose outputs land on their shardings.

  Each device creates only its own shards, so no device (or host) ever holds the full model.
  """
  init = functools.partial(init_params, cfg)
  shardings = param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
  return jax.jit(init, out_shardings=shardings)


def init_sharded_params(cfg: LlamaConfig, rng: jax.Array, mesh: Mesh,
                        rules: Rules = LLAMA_RULES) -> Any:
  """Random parameters, created sharded (see sharded_init)."""
  return sharded_init(cfg, mesh, rules)(rng)


# KV caches.


def _batch_entry(rows: int, sizes: dict[str, int]) -> Any:
  """Batch rows over data x fsdp when they divide, else over data alone, else replicated."""
  if rows % math.prod(sizes.get(a, 1) for a in BATCH_AXES) == 0:
    return BATCH_AXES
  if rows % sizes.get('data', 1) == 0:
    return 'data'
  return None


def kv_cache_specs(cache: KVCache, mesh: MeshLike) -> KVCache:
  """PartitionSpecs for a KVCache (of arrays or ShapeDtypeStructs), as a KVCache.

  k, v [B, Hkv, S, D]: rows over ('data', 'fsdp') and kv heads over 'tensor' when they divide (the
  attention einsums then need no communication); anything that does not divide stays replicated
  along that dim. Scanned layers' stacked [L, B, Hkv, S, D] arrays: the same, the layer axis
  unsharded. valid [B, S] follows the rows; index is a replicated scalar.
  """
  sizes = axis_sizes(mesh)
  rows = cache.valid.shape[0]
  batch = _batch_entry(rows, sizes)
  tensor = sizes.get('tensor', 1)

  def kv_spec(x):
    spec = (batch, 'tensor' if x.shape[-3] % tensor == 0 else None, None, None)
    return P(*((None,) * (len(x.shape) - 4) + spec))

  if isinstance(cache.k, (tuple, list)):
    k, v = tuple(kv_spec(x) for x in cache.k), tuple(kv_spec(x) for x in cache.v)
  else:
    k, v = kv_spec(cache.k), kv_spec(cache.v)
  return KVCache(k=k, v=v, valid=P(batch, None), index=P())


def kv_cache_sharding(cache: KVCache, mesh: Mesh) -> KVCache:
  """NamedShardings for a KVCache (see kv_cache_specs); usable as out_shardings or a constraint."""
  return to_shardings(kv_cache_specs(cache, mesh), mesh)


def abstract_kv_cache(cfg: LlamaConfig, batch: int, slots: int) -> KVCache:
  """The KVCache's ShapeDtypeStructs, without allocating it."""
  return jax.eval_shape(lambda: KVCache.zeros(cfg, batch, slots))


# Arithmetic on specs (no devices needed).


def per_device_bytes(shapes: Any, specs: Any, mesh: MeshLike) -> int:
  """Bytes one device holds of a tree of arrays/ShapeDtypeStructs laid out by a tree of specs.

  Each leaf's bytes are divided by the product of the mesh axes that shard it, rounding each dim
  up (what the largest shard holds when a dim does not divide).
  """
  sizes = axis_sizes(mesh)
  leaves = jax.tree_util.tree_leaves(shapes)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=_is_spec)
  if len(leaves) != len(spec_leaves):
    raise ValueError(f'{len(leaves)} arrays but {len(spec_leaves)} specs.')
  total = 0
  for leaf, spec in zip(leaves, spec_leaves):
    shape = list(np.shape(leaf))
    for dim, entry in enumerate(spec):
      ways = math.prod(sizes[a] for a in spec_axes(entry))
      shape[dim] = -(-shape[dim] // ways)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def total_bytes(shapes: Any) -> int:
  return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes))


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: LlamaConfig) -> Any:
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def abstract_params(cfg: LlamaConfig) -> Any:
  """The params' ShapeDtypeStructs, without allocating them (cached: tracing 8B takes a second)."""
  return jax.tree.map(lambda x: x, _abstract_params(cfg))  # A fresh tree each call.
