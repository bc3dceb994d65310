"""Writes our params as a Hugging Face checkpoint directory that transformers loads as is, one tensor
at a time (see hf.py for the name mapping)."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from pilaf_jax import paths
from pilaf_jax.model.checkpoint_info import CheckpointInfo, resolve_path
from pilaf_jax.model.hf_config import config_json
from pilaf_jax.model.hf_names import flat as _flat
from pilaf_jax.model.hf_names import hf_name, hf_param_shapes
from pilaf_jax.model.llama import LlamaConfig, is_stacked, unstack_layer_params

_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model',
                    'special_tokens_map.json', 'added_tokens.json', 'vocab.json', 'merges.txt',
                    'chat_template.jinja', 'chat_template.json')
_ST_DTYPES = {'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16', 'float64': 'F64'}


def _gather(x: Any) -> np.ndarray:
  """A full host copy of one (possibly sharded, possibly multi-process) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


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
  paths.write_text_atomic(os.path.join(root, 'config.json'), json.dumps(
      config_json(cfg, info, num_labels, dtype, max_position_embeddings), indent=2))
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
