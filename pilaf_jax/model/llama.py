"""A Llama-family decoder (RMSNorm, rotary, SwiGLU, grouped-query attention) with a KV cache.

Parameter names follow Hugging Face's Llama / Qwen2 / Mistral modules so that loading a checkpoint is
a mechanical mapping: `layers_3/self_attn/q_proj/kernel` is `model.layers.3.self_attn.q_proj.weight.T`,
`embed_tokens/embedding` is `model.embed_tokens.weight`, RMSNorm `scale` is `weight`. Rotary is the
half-split (GPT-NeoX / HF) convention.

The cache is an explicit pytree argument, not a mutable collection, so decoding stays a pure function
of (params, cache, tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Re-exported: callers import these from the model module.
from pilaf_jax.model.layer_stacking import is_stacked, stack_layer_params, unstack_layer_params  # noqa: F401
from pilaf_jax.model.rotary import apply_rotary, rotary_inv_freq


CHECKPOINT_FIELDS = ('checkpoint', 'reference_checkpoint')  # config.model fields that name files.
REMAT_POLICIES = ('', 'save_dots')
PROJECTION = 'projection'  # checkpoint_name of every Dense output (what 'save_dots' keeps).


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters (a subset of HF's LlamaConfig, same meanings)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None  # None or 0: hidden_size // num_heads.
  rope_theta: float = 10_000.0
  # Llama 3.1 rope scaling (HF rope_type 'llama3'); '' is plain rotary.
  rope_scaling: str = ''
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_bias: bool = False  # Qwen2 uses q/k/v biases.
  remat: bool = False  # Recompute each layer's activations in the backward pass (large models).
  # What remat keeps from the forward pass: '' only each layer's input (everything else is
  # recomputed, matmuls included); 'save_dots': also every projection's output (q/k/v/o, gate/up/
  # down), so the backward pass recomputes only elementwise work and attention (no weight matmul).
  remat_policy: str = ''
  # One decoder layer body run num_layers times under flax.linen.scan: compile time no longer grows
  # with depth. Params then hold one 'layers' subtree whose arrays have a leading [num_layers] axis
  # (stack_layer_params / unstack_layer_params convert), and the KV cache is stacked the same way.
  scan_layers: bool = False
  dtype: str = 'float32'  # Activations.
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must be a multiple of '
                       f'model.num_kv_heads={self.num_kv_heads}.')
    if not self.head_dim and self.hidden_size % self.num_heads:
      raise ValueError(f'model.hidden_size={self.hidden_size} must be divisible by '
                       f'model.num_heads={self.num_heads} (or set model.head_dim).')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'model.remat_policy={self.remat_policy!r} is unknown; allowed: {list(REMAT_POLICIES)}.')
    if self.rope_scaling not in ('', 'llama3'):
      raise ValueError(f"model.rope_scaling={self.rope_scaling!r} must be '' or 'llama3'.")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def from_config(cls, cfg) -> 'LlamaConfig':
    """Builds from config.model (a ConfigDict or dict): this dataclass's fields, plus the names of
    checkpoints to load, which are not architecture and are ignored here."""
    cfg = {k: v for k, v in dict(cfg).items() if k not in CHECKPOINT_FIELDS}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f'Unknown model fields {unknown}; allowed: {sorted(names)}.')
    return cls(**cfg)


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer for a fixed number of slots.

  k, v: one [batch, kv_heads, slots, head_dim] array per layer (tuples, so each layer updates its own
  buffer in place), or with cfg.scan_layers one [num_layers, batch, kv_heads, slots, head_dim] array
  each. Head-major, the layout attention's batched matmuls read: a slot-major cache made XLA
  transpose and copy every layer's whole cache at every decode step. valid: [batch, slots], True where a slot holds a real (non-padding) token. index: the next
  slot to write (shared by the batch; prompts are left-padded so that every row writes the same slot
  at the same step).
  """
  k: Union[tuple[jax.Array, ...], jax.Array]
  v: Union[tuple[jax.Array, ...], jax.Array]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, slots: int) -> 'KVCache':
    shape = (batch, cfg.num_kv_heads, slots, cfg.resolved_head_dim)
    if cfg.scan_layers:
      k = jnp.zeros((cfg.num_layers,) + shape, cfg.dtype)
      v = jnp.zeros((cfg.num_layers,) + shape, cfg.dtype)
    else:
      k = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
      v = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
    return cls(k=k, v=v, valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))


class RMSNorm(nn.Module):
  eps: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] @ kernel [in, out]; the backward pass materialises the incoming gradient first.

  Without the barrier, XLA:CPU fuses the elementwise producers of the gradient (SwiGLU, softmax,
  norm backward) into the transposing copy that feeds the weight-gradient GEMM, and that fusion
  reads its inputs column-wise: it cost more than the GEMMs themselves. Same products as
  autodiff's (x^T g and g k^T), so gradients agree up to float rounding.
  """
  return jnp.matmul(x, kernel)


def _matmul_fwd(x, kernel):
  return jnp.matmul(x, kernel), (x, kernel)


def _matmul_bwd(res, g):
  x, kernel = res
  g = jax.lax.optimization_barrier(g)
  dx = jnp.matmul(g, kernel.T).astype(x.dtype)
  dk = jnp.einsum('...i,...o->io', x, g).astype(kernel.dtype)
  return dx, dk


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


RowConstraint = Optional[Callable[[jax.Array], jax.Array]]


def _pin(x: jax.Array, constrain: RowConstraint) -> jax.Array:
  return x if constrain is None else constrain(x)


class Dense(nn.Module):
  """flax.linen.Dense's parameters (`kernel` [in, out], `bias`) and init, with _matmul.

  constrain: pins the output's rows to the mesh's batch axes (see Llama.constrain)."""
  features: int
  use_bias: bool
  dtype: str
  param_dtype: str
  constrain: RowConstraint = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.normal(0.02), (x.shape[-1], self.features),
                        self.param_dtype)
    y = checkpoint_name(_pin(_matmul(x.astype(self.dtype), kernel.astype(self.dtype)), self.constrain), PROJECTION)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _dense(features: int, name: str, cfg: LlamaConfig, bias: bool = False,
           constrain: RowConstraint = None) -> Dense:
  return Dense(features, use_bias=bias, name=name, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
               constrain=constrain)


class Attention(nn.Module):
  cfg: LlamaConfig
  constrain: RowConstraint = None

  @nn.compact
  def __call__(self, x, positions, keys_valid, layer_kv, cache_index, layer=None):
    """x: [B, T, d]. layer_kv: (k, v) slots [B, S, Hkv, D] or None (no cache: keys are x itself).

    With `layer` (a traced index, scanned layers), layer_kv is the stacked cache
    [num_layers, B, S, Hkv, D] and only this layer's slots are written and read.

    keys_valid: [B, S] (or [B, T] without cache). Queries at slot cache_index + t attend to valid
    slots <= their own. Returns (out, new_layer_kv).
    """
    cfg = self.cfg
    b, t, _ = x.shape
    hd = cfg.resolved_head_dim
    q = _dense(cfg.num_heads * hd, 'q_proj', cfg, cfg.attention_bias, self.constrain)(x).reshape(b, t, cfg.num_heads, hd)
    k = _dense(cfg.num_kv_heads * hd, 'k_proj', cfg, cfg.attention_bias, self.constrain)(x).reshape(b, t, cfg.num_kv_heads, hd)
    v = _dense(cfg.num_kv_heads * hd, 'v_proj', cfg, cfg.attention_bias, self.constrain)(x).reshape(b, t, cfg.num_kv_heads, hd)
    # Plain rotary keeps the original expression (bit-identical to before); scaling needs the table.
    rope = rotary_inv_freq(cfg, hd) if cfg.rope_scaling else cfg.rope_theta
    q = apply_rotary(q, positions, rope)
    k = apply_rotary(k, positions, rope)

    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D], the cache's layout.
    if layer_kv is None:
      keys, values, new_kv = k, v, None
    elif layer is None:
      keys = jax.lax.dynamic_update_slice(layer_kv[0], k.astype(layer_kv[0].dtype), (0, 0, cache_index, 0))
      values = jax.lax.dynamic_update_slice(layer_kv[1], v.astype(layer_kv[1].dtype), (0, 0, cache_index, 0))
      new_kv = (keys, values)
    else:
      start = (layer, 0, 0, cache_index, 0)
      all_k = jax.lax.dynamic_update_slice(layer_kv[0], k[None].astype(layer_kv[0].dtype), start)
      all_v = jax.lax.dynamic_update_slice(layer_kv[1], v[None].astype(layer_kv[1].dtype), start)
      keys = jax.lax.dynamic_index_in_dim(all_k, layer, 0, keepdims=False)
      values = jax.lax.dynamic_index_in_dim(all_v, layer, 0, keepdims=False)
      new_kv = (all_k, all_v)
    out = attend(q, keys, values, keys_valid, cache_index)
    return _dense(cfg.hidden_size, 'o_proj', cfg, constrain=self.constrain)(out.reshape(b, t, cfg.num_heads * hd)), new_kv


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, keys_valid: jax.Array,
           cache_index) -> jax.Array:
  """Masked softmax attention, [B, T, H, D] queries over [B, Hkv, S, D] keys/values -> [B, T, H, D].

  Grouped-query heads are folded into the query axis, so both products are plain batched matmuls
  over (row, kv head): [B, Hkv, G*T, D] x [B, Hkv, S, D], a layout every XLA backend runs as one
  GEMM call per batch entry. Scores and the softmax are float32.
  """
  b, t, h, d = q.shape
  kh, s = keys.shape[1], keys.shape[2]
  g = h // kh
  query_slot = cache_index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= query_slot[:, None]  # [T, S]
  mask = causal[None, :, :] & keys_valid[:, None, :]  # [B, T, S]
  qg = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
  scores = jnp.einsum('bkqd,bksd->bkqs', qg, keys, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kh, g, t, s) / jnp.sqrt(d).astype(jnp.float32)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype).reshape(b, kh, g * t, s)
  out = jnp.einsum('bkqs,bksd->bkqd', probs, values)  # [B, Hkv, G*T, D]
  return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class MLP(nn.Module):
  cfg: LlamaConfig
  constrain: RowConstraint = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = _dense(cfg.intermediate_size, 'gate_proj', cfg, constrain=self.constrain)(x)
    up = _dense(cfg.intermediate_size, 'up_proj', cfg, constrain=self.constrain)(x)
    return _dense(cfg.hidden_size, 'down_proj', cfg, constrain=self.constrain)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  cfg: LlamaConfig
  scanned: bool = False  # Called by nn.scan: x is the carry (x, stacked (k, v) or None, layer index).
  constrain: RowConstraint = None  # See Llama.constrain.

  @nn.compact
  def __call__(self, x, positions, keys_valid, layer_kv, cache_index):
    cfg = self.cfg
    layer = None
    if self.scanned:
      x, layer_kv, layer = x
    x = _pin(x, self.constrain)
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    h, new_kv = Attention(cfg, self.constrain, name='self_attn')(
        norm('input_layernorm')(x), positions, keys_valid, layer_kv, cache_index, layer)
    x = x + h
    x = x + MLP(cfg, self.constrain, name='mlp')(norm('post_attention_layernorm')(x))
    if self.scanned:
      return (x, new_kv, layer + 1), None
    return x, new_kv


class Llama(nn.Module):
  """Decoder-only LM. Call with a cache to decode, without one to score whole sequences.

  constrain: inside jit on a mesh, pins every layer's input and projection outputs ([B, T, ...]) to
  the batch axes (e.g. Placement.constrain_rows); None leaves the layout to XLA. Without it, on
  v5p-32 with scanned layers and remat_policy='save_dots', XLA kept the projections that the
  backward pass reads stacked over all layers for the whole batch on every chip (bf16[L, 128, T, F]
  rather than [L, 8, T, F]): 5x the temporaries of the unrolled program. Values are unchanged.
  """
  cfg: LlamaConfig
  constrain: RowConstraint = None

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: Optional[KVCache] = None,
               return_hidden: bool = False) -> tuple[jax.Array, Optional[KVCache]]:
    """tokens, positions, token_valid: [B, T]. Returns (logits [B, T, V] float32, new cache).

    With return_hidden, returns the final-norm hidden states [B, T, d] (float32) instead of logits,
    without creating or using lm_head (reward models put their own head on them).

    Without a cache, attention is causal over these T tokens, ignoring invalid (padding) ones. With a
    cache, the T tokens are written into slots [cache.index, cache.index + T) and attend to every
    valid earlier slot.
    """
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name='embed_tokens', dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, embedding_init=nn.initializers.normal(0.02))
    x = embed(tokens)
    if cache is None:
      keys_valid, cache_index = token_valid, 0
    else:
      keys_valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
      cache_index = cache.index
    policy = jax.checkpoint_policies.save_only_these_names(PROJECTION) if cfg.remat_policy == 'save_dots' else None
    layer = nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers, policy=policy) if cfg.remat else DecoderLayer
    if cfg.scan_layers:
      stack = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_layers)
      kv = None if cache is None else (cache.k, cache.v)
      (x, kv, _), _ = stack(cfg, scanned=True, constrain=self.constrain, name='layers')(
          (x, kv, jnp.zeros((), jnp.int32)), positions, keys_valid, None, cache_index)
      new_k, new_v = (None, None) if cache is None else kv
    else:
      new_k, new_v = [], []
      for i in range(cfg.num_layers):
        layer_kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = layer(cfg, constrain=self.constrain, name=f'layers_{i}')(x, positions, keys_valid, layer_kv, cache_index)
        if cache is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
      new_k, new_v = tuple(new_k), tuple(new_v)
    x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name='norm')(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=new_k, v=new_v, valid=keys_valid, index=cache.index + tokens.shape[1])
    if return_hidden:
      return x.astype(jnp.float32), new_cache
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(cfg.vocab_size, 'lm_head', cfg)(x)
    return logits.astype(jnp.float32), new_cache


def compute_params(params: Any, cfg: LlamaConfig) -> Any:
  """params with every matrix (kernels, embeddings: >= 2-D floats) cast to the activation dtype.

  Every use of a matrix casts it to cfg.dtype anyway (Dense, Embed), so the values computed are the
  same; casting once at the top of a program means FSDP all-gathers, and decode steps read, bf16
  rather than float32 master weights (half the bytes). Norm scales (1-D) stay as they are: RMSNorm
  reads them in float32. Differentiable: gradients flow back to the float32 params.
  """
  dtype = jnp.dtype(cfg.dtype)
  cast = lambda x: x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, params)


def init_params(cfg: LlamaConfig, rng: jax.Array) -> dict:
  """Random parameters (float32 by default), as the `params` collection."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  return Llama(cfg).init(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens, bool))['params']


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
