"""Rotary position embeddings (half-split, GPT-NeoX / Hugging Face convention), with Llama 3.1 scaling."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rotary_inv_freq(cfg, head_dim: int) -> np.ndarray:
  """Inverse rotary frequencies [head_dim / 2] (float32), with Llama 3.1 scaling when configured.

  cfg: a LlamaConfig (rope_theta and the rope_scaling fields; not imported here: llama imports this).

  Computed in numpy at trace time, so it is a constant of the compiled program. Follows transformers'
  `_compute_llama3_parameters`: long wavelengths are divided by the factor, short ones kept, and the
  band between is interpolated.
  """
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  inv_freq = inv_freq.astype(np.float32)
  if cfg.rope_scaling == 'llama3':
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float | np.ndarray) -> jax.Array:
  """Half-split rotary embedding. x: [B, T, H, D], positions: [B, T].

  theta: the base (plain rotary), or the inverse frequencies [D / 2] from rotary_inv_freq.
  """
  d = x.shape[-1]
  if np.ndim(theta) == 0:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  else:
    inv_freq = jnp.asarray(theta, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
