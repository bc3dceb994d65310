"""Hugging Face config.json: read into a LlamaConfig and CheckpointInfo (refusing what this model
cannot reproduce exactly), and written back for a checkpoint we save."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import numpy as np

from pilaf_jax.model.checkpoint_info import CheckpointError, CheckpointInfo, resolve_path
from pilaf_jax.model.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ('llama', 'qwen2', 'mistral')
_ARCH_PREFIX = {'llama': 'Llama', 'qwen2': 'Qwen2', 'mistral': 'Mistral'}
_HEADS = ('ForCausalLM', 'ForSequenceClassification')


def read_json(path: str, what: str) -> dict:
  """The JSON in `path`; CheckpointError naming `what` when it is not valid JSON."""
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
  c = read_json(config_path, 'config.json')
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
  gen = read_json(gen_path, 'generation_config.json') if os.path.isfile(gen_path) else {}
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


def config_json(cfg: LlamaConfig, info: Optional[CheckpointInfo], num_labels: int,
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
