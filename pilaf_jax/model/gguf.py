"""Llama-architecture GGUF files (llama.cpp's format) as a LlamaConfig and our Flax parameter tree.

Hyper-parameters come from the `llama.*` metadata keys, special token ids from `tokenizer.ggml.*`,
and each tensor is dequantised on the host (gguf.quants.dequantize: Q4_0, Q4_1, Q8_0, K-quants,
F16, ...) one at a time, so peak host memory is one float32 tensor beyond the result. The header is
parsed once per file by gguf_file.py and shared with the config reader and the tokenizer.

Tensor names map onto Hugging Face's Llama names (and so onto ours, see llama.py):

    token_embd              model.embed_tokens               embed_tokens/embedding
    blk.N.attn_norm         model.layers.N.input_layernorm   layers_N/input_layernorm/scale
    blk.N.attn_q / k / v    ...self_attn.q_proj / k / v      layers_N/self_attn/q_proj/kernel ...
    blk.N.attn_output       ...self_attn.o_proj              layers_N/self_attn/o_proj/kernel
    blk.N.ffn_norm          ...post_attention_layernorm      layers_N/post_attention_layernorm/scale
    blk.N.ffn_gate / up     ...mlp.gate_proj / up_proj       layers_N/mlp/gate_proj/kernel ...
    blk.N.ffn_down          ...mlp.down_proj                 layers_N/mlp/down_proj/kernel
    output_norm             model.norm                       norm/scale
    output (when untied)    lm_head                          lm_head/kernel

GGUF lists dimensions fastest-first, so a tensor of GGUF shape [in, out] is a row-major numpy
[out, in] array: HF's `weight` layout, transposed once more into a Dense kernel [in, out].

Why Q and K are permuted: llama.cpp applies rotary to adjacent pairs (dims 2i, 2i+1) of each head,
while HF (and llama.py) rotate dim i with dim i + head_dim/2 (half-split). llama.cpp's converter
therefore reorders the output rows of q_proj and k_proj within every head, so that its
interleaved rotary computes what the half-split one did on the original weights. We undo that
reordering (per head of Q, per KV head of K). Scores at equal positions do not notice the
permutation (q and k are reordered alike), so a missing un-permutation only shows through rotary:
the model still runs but with scrambled relative positions.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.model import layer_placement
from pilaf_jax.model.checkpoint_info import CheckpointError, CheckpointInfo, resolve_path
from pilaf_jax.model.gguf_file import GGUFFile, read_gguf_file, tensor_data
from pilaf_jax.model.llama import LlamaConfig, init_params

# GGUF block tensor -> (module path under layers_N, parameter name for '.weight').
_BLOCK_TENSORS = {
    'attn_q': (('self_attn', 'q_proj'), 'kernel'),
    'attn_k': (('self_attn', 'k_proj'), 'kernel'),
    'attn_v': (('self_attn', 'v_proj'), 'kernel'),
    'attn_output': (('self_attn', 'o_proj'), 'kernel'),
    'ffn_gate': (('mlp', 'gate_proj'), 'kernel'),
    'ffn_up': (('mlp', 'up_proj'), 'kernel'),
    'ffn_down': (('mlp', 'down_proj'), 'kernel'),
    'attn_norm': (('input_layernorm',), 'scale'),
    'ffn_norm': (('post_attention_layernorm',), 'scale'),
}
_TOP_TENSORS = {
    'token_embd': (('embed_tokens',), 'embedding'),
    'output_norm': (('norm',), 'scale'),
    'output': (('lm_head',), 'kernel'),
}
_BLOCK_NAME = re.compile(r'^blk\.(\d+)\.(\w+)\.(weight|bias)$')


def _reader(path: str) -> GGUFFile:
  """The parsed header of the GGUF file at `path` (cached per file), or a one-line CheckpointError."""
  return read_gguf_file(path)


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
  return reader.get(key, default)


def _float32(value) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
  return float(str(np.float32(value)))


def gguf_tokenizer(path: str):
  """The file's tokenizer as a transformers tokenizer (offline), chat template included.

  Built from the tokenizer.ggml.* metadata (pilaf_jax.data.gguf_tokenizer; no torch for byte-level
  BPE files such as SmolLM2's); nothing is downloaded.
  """
  from pilaf_jax.data.gguf_tokenizer import load_gguf_tokenizer  # Heavy import: transformers.
  return load_gguf_tokenizer(resolve_path(path))


def _config_and_info(reader, path: str, dtype: str, tensor_names: set[str],
                     activation_dtype: Optional[str] = None) -> tuple[LlamaConfig, CheckpointInfo]:
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise CheckpointError(f'{path}: GGUF architecture is {arch!r}; expected a llama-architecture '
                          'file (general.architecture = "llama").')

  def need(key: str):
    value = _field(reader, f'llama.{key}')
    if value is None:
      raise CheckpointError(f'{path}: GGUF metadata llama.{key} is missing; expected a complete '
                            'llama-architecture file.')
    return value

  scaling = _field(reader, 'llama.rope.scaling.type', 'none')
  if scaling not in ('none', 'linear') or 'rope_freqs.weight' in tensor_names or (
      scaling == 'linear' and float(_field(reader, 'llama.rope.scaling.factor', 1.0)) != 1.0):
    raise CheckpointError(f'{path}: rope scaling ({scaling!r}, rope_freqs) is not supported; '
                          'expected plain rotary (llama.rope.scaling.type absent or "none").')
  tokens = reader.get('tokenizer.ggml.tokens')
  if tokens is None:
    raise CheckpointError(f'{path}: GGUF metadata tokenizer.ggml.tokens is missing; expected the '
                          'token list (it gives the vocabulary size).')
  hidden, heads = int(need('embedding_length')), int(need('attention.head_count'))
  head_dim = int(_field(reader, 'llama.attention.key_length', hidden // heads))
  rotary_dims = int(_field(reader, 'llama.rope.dimension_count', head_dim))
  if rotary_dims != head_dim:
    raise CheckpointError(f'{path}: llama.rope.dimension_count={rotary_dims} differs from the head '
                          f'size {head_dim}; expected rotary over whole heads.')
  dtype = jnp.dtype(dtype).name
  activation_dtype = jnp.dtype(activation_dtype or dtype).name
  cfg = LlamaConfig(
      vocab_size=len(tokens), hidden_size=hidden,
      intermediate_size=int(need('feed_forward_length')), num_layers=int(need('block_count')),
      num_heads=heads, num_kv_heads=int(_field(reader, 'llama.attention.head_count_kv', heads)),
      head_dim=head_dim if head_dim != hidden // heads else None,
      rope_theta=_float32(_field(reader, 'llama.rope.freq_base', 10_000.0)),
      rms_norm_eps=_float32(need('attention.layer_norm_rms_epsilon')),
      tie_embeddings='output.weight' not in tensor_names,
      attention_bias='blk.0.attn_q.bias' in tensor_names, dtype=activation_dtype,
      param_dtype=dtype)

  token_id = lambda key: None if _field(reader, key) is None else int(_field(reader, key))
  eos = [token_id(k) for k in ('tokenizer.ggml.eos_token_id', 'tokenizer.ggml.eot_token_id')]
  info = CheckpointInfo(path=path, model_type=arch,
                        eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
                        bos_token_id=token_id('tokenizer.ggml.bos_token_id'),
                        pad_token_id=token_id('tokenizer.ggml.padding_token_id'))
  return cfg, info


def _target(name: str) -> Optional[tuple[tuple[str, ...], str]]:
  """(module path, GGUF block name) of a GGUF tensor in our tree, or None when it has no place."""
  base, _, kind = name.rpartition('.')
  if base in _TOP_TENSORS and kind == 'weight':
    modules, param = _TOP_TENSORS[base]
    return modules + (param,), base
  m = _BLOCK_NAME.match(name)
  if m and m.group(2) in _BLOCK_TENSORS:
    modules, param = _BLOCK_TENSORS[m.group(2)]
    return (f'layers_{m.group(1)}',) + modules + (param if kind == 'weight' else 'bias',), m.group(2)
  return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: [out(, in)] per head, interleaved -> half-split pairs.

  llama.cpp stores HF row h*D + j*D/2 + i at h*D + 2i + j (j in {0, 1}); this maps it back.
  """
  rest = w.shape[1:]
  return w.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _lookup(shardings: Any, path: tuple[str, ...]) -> jax.sharding.Sharding:
  """The sharding for one parameter: `shardings` itself, or its leaf at `path`."""
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  node = shardings
  for key in path:
    if key not in node:
      raise ValueError(f'shardings has no entry for parameter {"/".join(path)}; expected a tree '
                       'shaped like the params (e.g. from param_shardings) or one Sharding.')
    node = node[key]
  return node


def read_gguf_config(path: str) -> tuple[LlamaConfig, CheckpointInfo]:
  """(config, info) from the file's metadata alone (tensors are not read)."""
  path = resolve_path(path)
  reader = _reader(path)
  return _config_and_info(reader, path, 'float32', set(reader.tensors_by_name))


def load_gguf_checkpoint(path: str, dtype: str = 'float32', shardings: Any = None,
                         scan_layers: Optional[bool] = None,
                         activation_dtype: Optional[str] = None) -> tuple[LlamaConfig, dict, CheckpointInfo]:
  """Reads a llama-architecture GGUF file into (config, params, info).

  path: a filesystem path or `package:<package>/<file>`. dtype: of the returned parameters (the
  config's param_dtype) and, unless activation_dtype says otherwise, of the activations (the
  config's dtype). shardings: None (default device), one Sharding for every
  leaf, or a tree shaped like the params; each tensor is then assembled with
  jax.make_array_from_callback as soon as it is dequantised.
  """
  import gguf
  path = resolve_path(path)
  reader = _reader(path)
  by_name = reader.tensors_by_name
  cfg, info = _config_and_info(reader, path, dtype, set(by_name), activation_dtype)
  # Scanned layers (model.scan_layers): load per layer, then stack (see layer_placement.py).
  shardings, stacked_shardings, scan_layers = layer_placement.per_layer_plan(shardings, cfg.num_layers,
                                                                             scan_layers)
  expected = {tuple(k.key for k in p): leaf.shape
              for p, leaf in jax.tree_util.tree_leaves_with_path(
                  jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0)))}
  np_dtype = jnp.dtype(cfg.param_dtype)
  hd = cfg.resolved_head_dim

  params: dict = {}
  for name, tensor in by_name.items():
    target = _target(name)
    if target is None:
      raise CheckpointError(f'{path}: unexpected GGUF tensor {name!r}; expected only llama tensors '
                            '(token_embd, blk.N.attn_*/ffn_*, output_norm, output).')
    tree_path, base = target
    # Row-major numpy order is GGUF's dimension list reversed: [out, in] for a matrix.
    w = gguf.quants.dequantize(tensor_data(reader, tensor), tensor.tensor_type)
    w = np.asarray(w, np.float32).reshape([int(d) for d in reversed(tensor.shape)])
    if base == 'attn_q':
      w = unpermute_rows(w, cfg.num_heads) if w.shape[0] == cfg.num_heads * hd else w
    elif base == 'attn_k':
      w = unpermute_rows(w, cfg.num_kv_heads) if w.shape[0] == cfg.num_kv_heads * hd else w
    if tree_path[-1] == 'kernel':
      w = w.T  # HF weight [out, in] -> Dense kernel [in, out].
    want = expected.get(tree_path)
    if want is None:
      raise CheckpointError(f'{path}: GGUF tensor {name!r} has no place in this architecture '
                            f'({"/".join(tree_path)}); expected only tensors that the llama.* '
                            'metadata implies.')
    if want != w.shape:
      raise CheckpointError(f'{path}: GGUF tensor {name!r} has shape {w.shape}; expected {want} for '
                            f'{"/".join(tree_path)} from the file\'s llama.* metadata.')
    w = np.ascontiguousarray(w.astype(np_dtype))
    if shardings is None:
      leaf = jnp.asarray(w)
    else:
      leaf = jax.make_array_from_callback(w.shape, _lookup(shardings, tree_path),
                                          lambda index, w=w: w[index])
    node = params
    for key in tree_path[:-1]:
      node = node.setdefault(key, {})
    node[tree_path[-1]] = leaf

  loaded = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  missing = sorted('/'.join(p) for p in set(expected) - loaded)
  if missing:
    raise CheckpointError(f'{path}: GGUF file lacks {len(missing)} parameter(s), e.g. {missing[:3]}; '
                          f'expected all {cfg.num_layers} llama blocks.')
  cfg, params = layer_placement.stacked(cfg, params, scan_layers, stacked_shardings)
  return cfg, params, info
