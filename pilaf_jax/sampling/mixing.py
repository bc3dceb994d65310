"""Token-level mixing of two models and the sampling filters applied after it."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mix_logits(policy_logits: jax.Array, ref_logits: jax.Array, coef) -> jax.Array:
  """Unnormalised log-probs of softmax(coef * log_softmax(policy) + (1 - coef) * log_softmax(ref)).

  Batched over leading axes; coef is a scalar or has the leading shape. coef = 1 + beta gives
  pi_plus, 1 - beta pi_minus, 1 the policy and 0 the reference. Each model is normalised first, so
  the mixture does not depend on either model's logit offset. A token impossible under either model
  (-inf) stays impossible (pi_ref^-beta is undefined there).
  """
  lp_policy = jax.nn.log_softmax(policy_logits, axis=-1)
  lp_ref = jax.nn.log_softmax(ref_logits, axis=-1)
  coef = jnp.asarray(coef, lp_policy.dtype)
  if coef.ndim:
    coef = coef[..., None]
  finite = jnp.isfinite(lp_policy) & jnp.isfinite(lp_ref)
  mixed = coef * jnp.where(finite, lp_policy, 0.0) + (1 - coef) * jnp.where(finite, lp_ref, 0.0)
  return jnp.where(finite, mixed, -jnp.inf)


def sample_tokens(key: jax.Array, logits: jax.Array, greedy: bool = False) -> jax.Array:
  """One draw from softmax(logits) per row, int32 [...] for logits [..., V]; greedy: the arg-max.

  Token for token what jax.random.categorical(key, logits, axis=-1) draws (the same Gumbel noise, the
  first index of the maximum), with the argmax as a max and a min: XLA:CPU runs argmax's
  (value, index) reduction one element at a time, and it cost more than the noise itself.
  greedy=True (temperature 0) adds no noise: jnp.argmax, the first index of the largest logit.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  perturbed = jax.random.gumbel(key, logits.shape, logits.dtype) + logits
  top = jnp.max(perturbed, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, perturbed.shape, perturbed.ndim - 1)
  return jnp.min(jnp.where(perturbed == top, index, logits.shape[-1] - 1), axis=-1)


def greedy_logits(logits: jax.Array) -> jax.Array:
  """The temperature -> 0 limit as logits: 0 at the first index of each row's maximum, -inf elsewhere.

  So the sampled distribution is the point mass that sample_tokens(greedy=True) picks, and its
  log-prob (sampling_logprobs) is 0. One argmax reduction, not a max and an equality test: XLA may
  recompute the logits separately for each consumer (a mixture's multiply-adds contracted
  differently), and a recomputed maximum need not equal any recomputed logit.
  """
  first = jnp.argmax(logits, axis=-1)[..., None]
  index = jax.lax.broadcasted_iota(first.dtype, logits.shape, logits.ndim - 1)
  return jnp.where(index == first, 0.0, -jnp.inf).astype(logits.dtype)


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Temperature, then top-k, then nucleus (top-p) filtering; removed tokens get -inf.

  temperature == 1, top_k == 0 and top_p == 1 leave the logits unchanged (exact sampling).
  temperature == 0 is greedy decoding: only the first arg-max survives (greedy_logits; top-k and
  top-p always keep it, so they change nothing).
  """
  if temperature == 0:
    return greedy_logits(logits)
  if temperature != 1.0:
    logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the first token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return logits
