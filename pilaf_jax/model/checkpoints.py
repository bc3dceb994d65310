"""Pretrained checkpoints from disk: read the one a path names (hf.py or gguf.py by its kind), and
check that it has the architecture a run expects. Names and errors: checkpoint_info.py.
"""
from __future__ import annotations

import os
from typing import Optional

from pilaf_jax.model import gguf, hf
from pilaf_jax.model.checkpoint_info import CheckpointError, CheckpointInfo, resolve_path  # noqa: F401


def _is_gguf(path: str) -> bool:
  return path.endswith('.gguf')


def read_checkpoint_config(spec: str):
  """(LlamaConfig, CheckpointInfo) of a checkpoint, reading only its metadata (no tensors), after
  checking that its weight files are there (so a broken checkpoint stops a run before any work)."""
  path = resolve_path(spec)
  if not os.path.exists(path):
    raise CheckpointError(f'{spec!r}: no such file or directory ({path}); expected a Hugging Face '
                          'checkpoint directory (config.json + *.safetensors) or a .gguf file.')
  if _is_gguf(path):
    return gguf.read_gguf_config(path)
  config = hf.read_hf_config(path)
  hf.weight_files(path)
  return config


def load_checkpoint(spec: str, dtype: str = 'float32', shardings=None,
                    activation_dtype: Optional[str] = None):
  """(LlamaConfig, params, CheckpointInfo): weights read tensor by tensor, each placed straight into
  its sharding when `shardings` (a pytree of shardings like the params) is given.

  dtype: the parameters' (cfg.param_dtype); activation_dtype: what the model computes in
  (cfg.dtype), by default `dtype` as well."""
  path = resolve_path(spec)
  cfg, info = read_checkpoint_config(spec)
  if _is_gguf(path):
    cfg, params, info = gguf.load_gguf_checkpoint(path, dtype=dtype, shardings=shardings,
                                                  activation_dtype=activation_dtype)
  else:
    cfg, params = hf.load_hf_checkpoint(path, dtype=dtype, shardings=shardings,
                                        activation_dtype=activation_dtype)
  return cfg, params, info


ARCHITECTURE_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads',
                       'num_kv_heads', 'head_dim', 'rope_theta', 'rms_norm_eps', 'tie_embeddings',
                       'attention_bias', 'rope_scaling', 'rope_scaling_factor', 'rope_low_freq_factor',
                       'rope_high_freq_factor', 'rope_original_max_position')


def architecture(cfg) -> dict:
  """The architecture fields of a LlamaConfig, as config.model values."""
  out = {}
  for name in ARCHITECTURE_FIELDS:
    if hasattr(cfg, name):
      value = getattr(cfg, name)
      out[name] = 0 if (name == 'head_dim' and value is None) else value
  return out


def load_params(spec: str, model_cfg, shardings, field: str = 'model.checkpoint') -> dict:
  """Params of checkpoint `spec` for a model of architecture model_cfg, placed into `shardings`.

  Raises CheckpointError, naming the config field, when the checkpoint's architecture is not
  model_cfg's (e.g. a reference of another size or vocabulary than the policy: PILAF mixes the two
  models token by token, so they must share one vocabulary).
  """
  read_cfg, _ = read_checkpoint_config(spec)
  expected, found = architecture(model_cfg), architecture(read_cfg)
  diff = [f'{k}={found.get(k)!r} where the policy has {expected.get(k)!r}' for k in expected
          if k in found and found[k] != expected[k]]
  if diff:
    raise CheckpointError(f'{field}={spec!r} does not have the policy\'s architecture: ' + '; '.join(diff) +
                          '. Policy and reference must be the same model (same vocabulary) to be mixed.')
  try:
    _, params, _ = load_checkpoint(spec, dtype=model_cfg.param_dtype, shardings=shardings)
  except CheckpointError as e:
    raise CheckpointError(f'{field}: {e}') from None
  return params
