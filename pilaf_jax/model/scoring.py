"""Teacher-forced log-probabilities of responses: the quantity DPO, KL and best-of-N all use."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from pilaf_jax.model.llama import Llama, compute_params


def masked_log_softmax(logits: jax.Array, allowed_tokens: Optional[jax.Array]) -> jax.Array:
  """log_softmax over the tokens a response may contain (all of them when allowed_tokens is None).

  The same restriction is applied when sampling and when scoring, so that sampler log-probs equal
  teacher-forced log-probs.
  """
  if allowed_tokens is not None:
    logits = jnp.where(allowed_tokens, logits, -jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def pick_tokens(values: jax.Array, tokens: jax.Array) -> jax.Array:
  """values[..., tokens]: [..., V] and [...] -> [...], the exact entries, picked with a one-hot max.

  Not a gather: its gradient is a scatter-add, and on CPU it is slower even forward. A -inf entry
  stays -inf (a one-hot where-sum would give nan there).
  """
  hit = tokens[..., None] == jnp.arange(values.shape[-1], dtype=tokens.dtype)
  return jnp.max(jnp.where(hit, values, -jnp.inf), axis=-1)


def token_logprobs(logits: jax.Array, tokens: jax.Array,
                   allowed_tokens: Optional[jax.Array] = None) -> jax.Array:
  """log_softmax(logits)[..., tokens] (restricted to allowed_tokens), without the full log_softmax.

  logits [..., V], tokens [...] -> [...]. The token's logit minus the logsumexp: the [..., V]
  log-probabilities are never materialised, and the token is picked with a one-hot compare instead
  of a gather, so the backward pass is elementwise (a gather's gradient is a scatter-add, slow on
  CPU). Equal to masked_log_softmax + take_along_axis up to float rounding.
  """
  if allowed_tokens is not None:
    logits = jnp.where(allowed_tokens, logits, -jnp.inf)
  return pick_tokens(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)


def sequence_inputs(prompt_tokens, prompt_mask, response_tokens, response_mask):
  """Concatenates left-padded prompts [B, P] with right-padded responses [B, R].

  Returns (tokens, positions, valid), each [B, P + R]; positions count valid tokens only, which is
  exactly what the cached decoder uses.
  """
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
  valid = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(bool)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  return tokens, positions, valid


def response_logprobs(model: Llama, params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      response_tokens: jax.Array, response_mask: jax.Array,
                      allowed_tokens: Optional[jax.Array] = None,
                      constrain_rows: Optional[Callable[[Any], Any]] = None) -> jax.Array:
  """Per-token log pi(y_t | x, y_<t) of every response token, [B, R]; 0 where response_mask is 0.

  constrain_rows: pins the [B, T, V] logits (and so their gradient) to the batch axes of a mesh,
  so that XLA never materialises them whole on one chip (see dpo_step); with
  model.remat_policy='save_dots' also every layer's input and projection outputs (Llama.constrain),
  the values that policy keeps for the backward pass.
  """
  tokens, positions, valid = sequence_inputs(prompt_tokens, prompt_mask, response_tokens, response_mask)
  if constrain_rows is not None and model.cfg.remat and model.cfg.remat_policy == 'save_dots':
    # Measured only there (docs/scale_out.md); full remat keeps its compiled layout as it was.
    model = model.clone(constrain=constrain_rows)
  logits, _ = model.apply({'params': compute_params(params, model.cfg)}, tokens, positions, valid)
  if constrain_rows is not None:
    logits = constrain_rows(logits)
  p = prompt_tokens.shape[1]
  # The logits at position P - 1 + t predict response token t.
  token_lp = token_logprobs(logits[:, p - 1:-1], response_tokens, allowed_tokens)
  return jnp.where(response_mask, token_lp, 0.0)
