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

This module loads; beside it: hf_config.py (config.json both ways), hf_names.py (the name mapping
above and the params' shapes), hf_save.py (writing a checkpoint), layer_placement.py (shardings and
the stacked layout, shared with gguf.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np

from pilaf_jax.model import layer_placement
from pilaf_jax.model.checkpoint_info import CheckpointError
from pilaf_jax.model.hf_config import read_hf_config, read_json
from pilaf_jax.model.hf_names import flat as _flat
from pilaf_jax.model.hf_names import hf_name, hf_param_shapes, unflatten
from pilaf_jax.model.hf_save import save_hf_checkpoint  # noqa: F401  (part of this module's API)
from pilaf_jax.model.llama import LlamaConfig

# Present in some older checkpoints, recomputed by every implementation.
_IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


def weight_files(root: str) -> dict[str, list[str]]:
  """{safetensors file: [tensor names]} of a checkpoint (single file or sharded index)."""
  single = os.path.join(root, 'model.safetensors')
  index = os.path.join(root, 'model.safetensors.index.json')
  if os.path.isfile(index):
    weight_map = read_json(index, 'the safetensors index').get('weight_map') or {}
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

  cfg, info = read_hf_config(path)
  shardings, stacked_shardings, scan_layers = layer_placement.per_layer_plan(shardings, cfg.num_layers,
                                                                             scan_layers)
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
        out[p] = layer_placement.place(host, None if flat_shardings is None else flat_shardings[p])
        del host
  return layer_placement.stacked(cfg, unflatten(out), scan_layers, stacked_shardings)

