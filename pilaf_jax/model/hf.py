"""Hugging Face Llama / Qwen2 / Mistral checkpoints: read them into our Flax params, write them back.

Loading is tensor by tensor: each safetensors tensor is read, transposed to the Flax layout, cast,
and placed on its sharding before the next one is read, so host memory stays near one tensor (plus
this process's shards) however large the model. Saving gathers and writes one tensor at a time too.

Name mapping (HF -> ours; kernels are HF weights transposed to [in, out]):

  model.embed_tokens.weight                  embed_tokens/embedding
  model.layers.3.self_attn.q_proj.weight     layers_3/self_attn/q_proj/kernel
  model.layers.3.self_attn.q_proj.bias       layers_3/self_attn/q_proj/bias      (Qwen2)
  model.layers.3.input_layernorm.weight      layers_3/input_layernorm/scale
  model.norm.weight                          norm/scale
  lm_head.weight                             lm_head/kernel                      (absent when tied)
  score.weight [num_labels, d]               score/kernel [d, num_labels]        (reward models)

Scanned layers (model.scan_layers): the decoder layers are one `layers` subtree with a leading
[num_layers] axis. Checkpoints keep HF's per-layer tensors; loading stacks them (when asked with
scan_layers=True, or when `shardings` is in the stacked layout) and saving unstacks them, so a file
written from either layout is the same.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import struct
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np

from pilaf_jax.model.checkpoints import CheckpointError, CheckpointInfo, resolve_path
from pilaf_jax.model.llama import (LlamaConfig, init_params, is_stacked, stack_layer_params,
                                   unstack_layer_params)

SUPPORTED_MODEL_TYPES = ('llama', 'qwen2', 'mistral')
_ARCH_PREFIX = {'llama': 'Llama', 'qwen2': 'Qwen2', 'mistral': 'Mistral'}
_HEADS = ('ForCausalLM', 'ForSequenceClassification')
# Present in some older checkpoints, recomputed by every implementation.
_IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model',
                    'special_tokens_map.json', 'added_tokens.json', 'vocab.json', 'merges.txt',
                    'chat_template.jinja', 'chat_template.json')
_ST_DTYPES = {'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16', 'float64': 'F64'}


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: {what} is not valid JSON ({e}).') from None


def _ids(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def _first(value: Any) -> Optional[int]:
  ids = _ids(value)
  return ids[0] if ids else None


def read_hf_config(path: str) -> tuple[LlamaConfig, CheckpointInfo]:
  """The architecture and metadata of a Hugging Face checkpoint directory (config.json and, when
  present, generation_config.json for the stop tokens).

  Raises CheckpointError (one line, naming the path) for a missing directory or config.json, or an
  architecture this model cannot reproduce exactly.
  """
  root = resolve_path(path)
  config_path = os.path.join(root, 'config.json')
  if not os.path.isdir(root):
    raise CheckpointError(f'{root}: no such directory; expected a Hugging Face checkpoint directory '
                          f'with config.json and model.safetensors.')
  if not os.path.isfile(config_path):
    raise CheckpointError(f'{config_path}: missing; expected a Hugging Face config.json '
                          f'(model_type one of {list(SUPPORTED_MODEL_TYPES)}).')
  c = _read_json(config_path, 'config.json')
  model_type = c.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f'{config_path}: model_type {model_type!r} is not supported; expected one '
                          f'of {list(SUPPORTED_MODEL_TYPES)}.')
  prefix = _ARCH_PREFIX[model_type]
  archs = c.get('architectures') or [prefix + 'ForCausalLM']
  allowed = [prefix + head for head in _HEADS]
  if len(archs) != 1 or archs[0] not in allowed:
    raise CheckpointError(f'{config_path}: architectures {archs} are not supported; expected one of '
                          f'{allowed}.')
  classifier = archs[0].endswith('ForSequenceClassification')

  def bad(field, value, expected):
    return CheckpointError(f'{config_path}: {field}={value!r} is not supported; expected {expected}.')

  if c.get('hidden_act', 'silu') != 'silu':
    raise bad('hidden_act', c['hidden_act'], "'silu'")
  if model_type == 'llama':
    # Our o_proj and MLP have no biases; Qwen2's q/k/v biases are the only ones we model.
    if c.get('attention_bias'):
      raise bad('attention_bias', c['attention_bias'], 'false for model_type llama')
    if c.get('mlp_bias'):
      raise bad('mlp_bias', c['mlp_bias'], 'false')
  if c.get('pretraining_tp', 1) not in (1, None):
    raise bad('pretraining_tp', c['pretraining_tp'], '1')
  window = c.get('sliding_window') if (model_type == 'mistral' or c.get('use_sliding_window')) else None
  if window:
    # Attention here is always full: identical to the windowed model for shorter sequences.
    logging.warning('%s: sliding_window=%s is ignored (full attention); sequences longer than the '
                    'window will differ from the original model.', config_path, window)

  # transformers >= 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling.
  rope = dict(c.get('rope_parameters') or c.get('rope_scaling') or {})
  theta = rope.get('rope_theta', c.get('rope_theta', 10_000.0))
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  scaling = {}
  if rope_type == 'llama3':
    try:
      scaling = dict(rope_scaling='llama3', rope_scaling_factor=float(rope['factor']),
                     rope_low_freq_factor=float(rope['low_freq_factor']),
                     rope_high_freq_factor=float(rope['high_freq_factor']),
                     rope_original_max_position=int(rope['original_max_position_embeddings']))
    except KeyError as e:
      raise CheckpointError(f'{config_path}: llama3 rope scaling without {e.args[0]!r}; expected '
                            f'factor, low_freq_factor, high_freq_factor and '
                            f'original_max_position_embeddings.') from None
  elif rope_type != 'default':
    raise bad('rope_type', rope_type, "'default' or 'llama3'")

  try:
    heads = int(c['num_attention_heads'])
    cfg = LlamaConfig(
        vocab_size=int(c['vocab_size']), hidden_size=int(c['hidden_size']),
        intermediate_size=int(c['intermediate_size']), num_layers=int(c['num_hidden_layers']),
        num_heads=heads, num_kv_heads=int(c.get('num_key_value_heads') or heads),
        head_dim=int(c.get('head_dim') or 0) or None, rope_theta=float(theta),
        rms_norm_eps=float(c.get('rms_norm_eps', 1e-6)),
        tie_embeddings=bool(c.get('tie_word_embeddings', False)),
        attention_bias=model_type == 'qwen2', **scaling)
  except KeyError as e:
    raise CheckpointError(f'{config_path}: missing field {e.args[0]!r}; expected a complete '
                          f'{prefix} config.') from None
  except ValueError as e:
    raise CheckpointError(f'{config_path}: {e}') from None

  gen_path = os.path.join(root, 'generation_config.json')
  gen = _read_json(gen_path, 'generation_config.json') if os.path.isfile(gen_path) else {}
  num_labels = 0
  if classifier:
    num_labels = int(c.get('num_labels') or len(c.get('id2label') or {}) or 2)
  info = CheckpointInfo(
      path=root, model_type=model_type,
      eos_token_ids=_ids(gen['eos_token_id'] if gen.get('eos_token_id') is not None
                         else c.get('eos_token_id')),
      bos_token_id=_first(gen.get('bos_token_id', c.get('bos_token_id'))),
      pad_token_id=_first(gen.get('pad_token_id', c.get('pad_token_id'))),
      num_labels=num_labels)
  return cfg, info


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


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
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


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def weight_files(root: str) -> dict[str, list[str]]:
  """{safetensors file: [tensor names]} of a checkpoint (single file or sharded index)."""
  single = os.path.join(root, 'model.safetensors')
  index = os.path.join(root, 'model.safetensors.index.json')
  if os.path.isfile(index):
    weight_map = _read_json(index, 'the safetensors index').get('weight_map') or {}
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      files.setdefault(os.path.join(root, file), []).append(name)
    for file in files:
      if not os.path.isfile(file):
        raise CheckpointError(f'{file}: missing; listed in {index}.')
    return files
  if os.path.isfile(single):
    from safetensors import safe_open
    with safe_open(single, framework='np') as f:
      return {single: list(f.keys())}
  raise CheckpointError(f'{root}: no model.safetensors or model.safetensors.index.json; expected '
                        f'safetensors weights (convert .bin / .pth checkpoints with transformers).')


@functools.lru_cache(maxsize=None)
def _copier(sharding: Any) -> Any:
  return jax.jit(jnp.copy, out_shardings=sharding)


def _place(host: np.ndarray, sharding: Any) -> jax.Array:
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


def load_hf_checkpoint(path: str, dtype: Any = 'float32', shardings: Any = None,
                       scan_layers: Optional[bool] = None,
                       activation_dtype: Any = None) -> tuple[LlamaConfig, dict]:
  """(config, params) of a Hugging Face checkpoint directory, params cast to `dtype`.

  shardings: None (arrays on the default device), or a pytree of Shardings matching the params
  (e.g. param_shardings(hf_param_shapes(cfg, info.num_labels), mesh)); each tensor then goes
  straight to its shards. The config's param_dtype is `dtype`, and its dtype (what Llama computes
  in) is activation_dtype, by default `dtype` too: bfloat16 weights give a bfloat16 model (pass
  activation_dtype='float32' to keep float32 activations over them). Sequence-classification checkpoints
  give 'score' instead of 'lm_head' (see read_hf_config's info.num_labels and reward_model).

  scan_layers: return the stacked (model.scan_layers) layout and a config with scan_layers=True;
  None: stacked exactly when `shardings` is. Tensors are read and placed layer by layer as usual
  (each on its slice's sharding), then stacked on device: peak memory holds the layers twice.

  Raises CheckpointError naming the file and tensor for a missing, unexpected or misshapen tensor.
  """
  from safetensors import safe_open

  stacked_shardings = None
  if scan_layers is None:
    scan_layers = shardings is not None and is_stacked(shardings)
  if shardings is not None and is_stacked(shardings):
    stacked_shardings = shardings
    rest, layer = per_layer_shardings(shardings)
    num = read_hf_config(path)[0].num_layers
    shardings = dict(rest, **{f'layers_{i}': layer for i in range(num)})
  cfg, info = read_hf_config(path)
  dtype = jnp.dtype(dtype)
  cfg = dataclasses.replace(cfg, param_dtype=dtype.name,
                            dtype=jnp.dtype(activation_dtype or dtype).name)
  root = info.path
  expected = {}  # HF name -> (our path, HF shape, transposed)
  for p, shape in _flat(hf_param_shapes(cfg, info.num_labels)).items():
    name, transposed = hf_name(p)
    expected[name] = (p, tuple(reversed(shape.shape)) if transposed else tuple(shape.shape), transposed)
  flat_shardings = None
  if shardings is not None:
    flat_shardings = _flat(shardings)
    if set(flat_shardings) != {p for p, _, _ in expected.values()}:
      missing = sorted('/'.join(p) for p, _, _ in expected.values() if p not in flat_shardings)
      extra = sorted('/'.join(p) for p in set(flat_shardings) - {p for p, _, _ in expected.values()})
      raise ValueError(f'shardings do not match the params of {root}: missing {missing}, extra {extra}.')

  files = weight_files(root)
  ignored = set(_IGNORED_SUFFIXES)
  if cfg.tie_embeddings:
    ignored.add('lm_head.weight')  # Some exporters write the tied copy as well.
  for file, names in files.items():
    for name in names:
      if name not in expected and not any(name == s or name.endswith(s) for s in ignored):
        raise CheckpointError(f'{file}: unexpected tensor {name!r}; expected only the tensors of a '
                              f'{cfg.num_layers}-layer {info.model_type} model.')
  present = {name for names in files.values() for name in names}
  missing = [name for name in expected if name not in present]
  if missing:
    raise CheckpointError(f'{root}: tensor {missing[0]!r} is missing from the safetensors files'
                          f'{f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""}.')

  out = {}
  for file, names in files.items():
    with safe_open(file, framework='np') as f:
      for name in names:
        if name not in expected:
          continue
        p, shape, transposed = expected[name]
        raw = f.get_tensor(name)
        if tuple(raw.shape) != shape:
          raise CheckpointError(f'{file}: tensor {name!r} has shape {tuple(raw.shape)}; expected '
                                f'{shape}.')
        # One host buffer in the Flax layout, written straight from the raw tensor (no third copy).
        host = np.empty(shape[::-1] if transposed else shape, dtype)
        host[...] = raw.T if transposed else raw
        del raw
        out[p] = _place(host, None if flat_shardings is None else flat_shardings[p])
        del host
  params = _unflatten(out)
  if scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    params = to_scanned(params, stacked_shardings)
  return cfg, params


def _gather(x: Any) -> np.ndarray:
  """A full host copy of one (possibly sharded, possibly multi-process) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _config_json(cfg: LlamaConfig, info: Optional[CheckpointInfo], num_labels: int,
                 dtype: np.dtype, max_position_embeddings: int) -> dict:
  model_type = 'qwen2' if cfg.attention_bias else 'llama'
  head = 'ForSequenceClassification' if num_labels else 'ForCausalLM'
  eos = list(info.eos_token_ids) if info and info.eos_token_ids else None
  c = {
      'architectures': [_ARCH_PREFIX[model_type] + head], 'model_type': model_type,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'hidden_act': 'silu', 'rms_norm_eps': cfg.rms_norm_eps,
      'rope_theta': cfg.rope_theta, 'tie_word_embeddings': cfg.tie_embeddings,
      'max_position_embeddings': max_position_embeddings,
      'bos_token_id': info.bos_token_id if info else None,
      'eos_token_id': (eos[0] if len(eos) == 1 else eos) if eos else None,
      'pad_token_id': info.pad_token_id if info else None,
      'torch_dtype': dtype.name, 'dtype': dtype.name,
  }
  if cfg.head_dim:
    c['head_dim'] = cfg.head_dim  # Otherwise hidden_size // num_attention_heads, as here.
  if model_type == 'llama':
    c.update(attention_bias=False, mlp_bias=False)
  else:
    c.update(use_sliding_window=False, sliding_window=None)
  if cfg.rope_scaling == 'llama3':
    c['rope_scaling'] = {
        'rope_type': 'llama3', 'factor': cfg.rope_scaling_factor,
        'low_freq_factor': cfg.rope_low_freq_factor, 'high_freq_factor': cfg.rope_high_freq_factor,
        'original_max_position_embeddings': cfg.rope_original_max_position}
  if num_labels:
    c['id2label'] = {str(i): f'LABEL_{i}' for i in range(num_labels)}
    c['label2id'] = {f'LABEL_{i}': i for i in range(num_labels)}
  return c


def save_hf_checkpoint(path: str, cfg: LlamaConfig, params: Any, *,
                       info: Optional[CheckpointInfo] = None, tokenizer_dir: Optional[str] = None,
                       dtype: Any = None, max_position_embeddings: int = 0) -> None:
  """Writes params as a Hugging Face checkpoint directory that transformers loads as is.

  Writes config.json (llama, or qwen2 when cfg.attention_bias; ...ForSequenceClassification when
  params has 'score'), generation_config.json (info's token ids), model.safetensors (in `dtype`, by
  default the params' own) and the tokenizer files of tokenizer_dir. Arrays may be sharded across
  processes: every process must call this (the gathers are collective), only process 0 writes, one
  tensor at a time. max_position_embeddings: written to config.json (0: 8 x the rope's original
  context with llama3 scaling, else 32768); it does not change the model's outputs.
  """
  if is_stacked(params):
    params = unstack_layer_params(params)  # Files hold HF's per-layer tensors.
  cfg = dataclasses.replace(cfg, scan_layers=False)
  flat = _flat(params)
  num_labels = int(flat[('score', 'kernel')].shape[1]) if ('score', 'kernel') in flat else 0
  expected = set(_flat(hf_param_shapes(cfg, num_labels)))
  if set(flat) != expected:
    raise ValueError(f'params do not match the config: missing '
                     f'{sorted("/".join(p) for p in expected - set(flat))}, unexpected '
                     f'{sorted("/".join(p) for p in set(flat) - expected)}.')
  if dtype is None:
    dtype = flat[('embed_tokens', 'embedding')].dtype
  dtype = np.dtype(jnp.dtype(dtype))
  if dtype.name not in _ST_DTYPES:
    raise ValueError(f'dtype {dtype} cannot be saved; expected one of {sorted(_ST_DTYPES)}.')
  if not max_position_embeddings:
    max_position_embeddings = (cfg.rope_original_max_position * int(cfg.rope_scaling_factor)
                               if cfg.rope_scaling else 32768)

  # The safetensors layout is known from shapes alone, so tensors can be streamed in one by one.
  entries, offset = [], 0
  for p in sorted(flat, key=lambda p: hf_name(p)[0]):
    name, transposed = hf_name(p)
    shape = tuple(flat[p].shape)
    shape = shape[::-1] if transposed else shape
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    entries.append((name, p, transposed, shape, offset, offset + nbytes))
    offset += nbytes
  header = {'__metadata__': {'format': 'pt'}}
  for name, _, _, shape, start, end in entries:
    header[name] = {'dtype': _ST_DTYPES[dtype.name], 'shape': list(shape), 'data_offsets': [start, end]}
  header_bytes = json.dumps(header, separators=(',', ':')).encode()
  header_bytes += b' ' * (-len(header_bytes) % 8)

  writer = jax.process_index() == 0
  root = resolve_path(path)
  f = None
  if writer:
    os.makedirs(root, exist_ok=True)
    f = open(os.path.join(root, 'model.safetensors.tmp'), 'wb')
    f.write(struct.pack('<Q', len(header_bytes)) + header_bytes)
  try:
    for name, p, transposed, shape, start, end in entries:
      host = _gather(flat[p])  # Collective when sharded across processes: every process calls it.
      if writer:
        out = np.ascontiguousarray((host.T if transposed else host).astype(dtype, copy=False))
        assert out.nbytes == end - start, name
        f.write(out.tobytes())  # memoryview would avoid a copy, but bf16 has no buffer format.
      del host
  finally:
    if f is not None:
      f.close()
  if not writer:
    return
  # The small files first, each written whole (temporary file and rename): the weights' rename
  # below is the last step, so a directory that holds model.safetensors also holds its config.
  from pilaf_jax import paths
  paths.write_text_atomic(os.path.join(root, 'config.json'), json.dumps(
      _config_json(cfg, info, num_labels, dtype, max_position_embeddings), indent=2))
  gen = {'bos_token_id': info.bos_token_id if info else None,
         'eos_token_id': list(info.eos_token_ids) if info and info.eos_token_ids else None,
         'pad_token_id': info.pad_token_id if info else None}
  paths.write_text_atomic(os.path.join(root, 'generation_config.json'),
                          json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))
  if tokenizer_dir:
    src = resolve_path(tokenizer_dir)
    for file in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(src, file)):
        paths.write_bytes_atomic(os.path.join(root, file), paths.read_bytes(os.path.join(src, file)))
  stale = os.path.join(root, 'model.safetensors.index.json')
  if os.path.exists(stale):
    os.remove(stale)  # It would point at shards this save did not write.
  os.replace(os.path.join(root, 'model.safetensors.tmp'), os.path.join(root, 'model.safetensors'))
  paths._fsync_dir(root)  # pylint: disable=protected-access
