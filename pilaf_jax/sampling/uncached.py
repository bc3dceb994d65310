"""The two-model token-level mixture decoded WITHOUT a KV cache: the speed baseline for decode.py.

This is how TRL's Nash-MD `GeometricMixtureWrapper` samples from the geometric mixture: generation
runs with `use_cache=False`, so at every new token both models re-read the whole prefix (prompt +
tokens so far) and only the last position's logits are used. Here the prefix lives in a fixed-size
buffer [N, P + R] with a validity mask, so shapes stay static inside one jitted lax.while_loop.

Everything else is decode.decode(): the same RowLayout (all three groups), the same mixing, filters
and per-step key `jax.random.fold_in(rng, t)`, the same Rollout. Under the same rng the logits agree
with the cached loop up to float rounding, so the samples are in practice identical (see
tests/test_uncached_mixture.py); only the cost differs: O(R * (P + R)) token evaluations per model
instead of O(P + R).

prefix_bucket trades a few extra compiled loop bodies for less wasted work: with prefix_bucket = b
the steps run in chunks of b, and chunk k only feeds the first P + (k + 1) * b buffer slots, which
approximates a growing prefix (what HF's cache-less generate re-runs). 0 feeds the whole buffer at
every step.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pilaf_jax.batches import PromptBatch
from pilaf_jax.model.llama import Llama
from pilaf_jax.model.scoring import masked_log_softmax
from pilaf_jax.sampling.decode import DecodeSettings, Rollout, RowLayout, draw_token


def _next_token_logits(model: Llama, params, tokens: jax.Array, valid: jax.Array,
                       slot: jax.Array) -> jax.Array:
  """Runs the model on the whole (prefix) buffer and returns the logits at `slot`, [N, V].

  Positions count valid tokens only, exactly as the cached loop assigns them; slots after `slot`
  are either invalid or causally masked, so they do not change the result.
  """
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  logits, _ = model.apply({'params': params}, tokens, positions, valid)
  return jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)


def decode_uncached(policy: Llama, ref: Llama, policy_params, ref_params, prompts: PromptBatch,
                    mix_coef: jax.Array, rng: jax.Array, *, layout: RowLayout,
                    settings: DecodeSettings, allowed_tokens: Optional[jax.Array] = None,
                    prefix_bucket: int = 0) -> Rollout:
  """decode.decode() without a KV cache: every step re-runs the prefix through both models.

  Same arguments and result as decode.decode(); jit it with the modules, layout, settings and
  prefix_bucket static. prompts: [N, P] left-padded, N == layout.total. mix_coef: [layout.mixed].
  """
  n, p = prompts.tokens.shape
  if n != layout.total:
    raise ValueError(f'{n} prompt rows for a layout of {layout.total}.')
  if prefix_bucket < 0:
    raise ValueError(f'prefix_bucket={prefix_bucket} must be >= 0.')
  r = settings.max_new_tokens
  pol_rows, ref_rows = layout.policy_rows, layout.ref_rows
  run_policy, run_ref = layout.policy_only + layout.mixed > 0, layout.mixed + layout.ref_only > 0

  def make_body(length: int):
    """One decode step that feeds the first `length` buffer slots to each model."""
    def body(carry):
      t, done, buf_tokens, buf_valid, out = carry
      # Response token t is predicted at slot P - 1 + t: the last valid slot of every live row (the
      # prompt is left-padded, so its last slot is real, and tokens 0..t-1 follow it). Rows that
      # already ended read a stale slot; their samples are discarded below as in decode().
      slot = p - 1 + t
      tokens, valid = buf_tokens[:, :length], buf_valid[:, :length]
      lp_pol = lp_ref = None
      if run_policy:
        lp_pol = masked_log_softmax(_next_token_logits(policy, policy_params, tokens[pol_rows],
                                                       valid[pol_rows], slot), allowed_tokens)
      if run_ref:
        lp_ref = masked_log_softmax(_next_token_logits(ref, ref_params, tokens[ref_rows],
                                                       valid[ref_rows], slot), allowed_tokens)
      token, new = draw_token(t, done, lp_pol, lp_ref, rng, layout, mix_coef, settings, pol_rows, ref_rows)
      live = new['mask']
      out = {k: out[k].at[:, t].set(jnp.where(live, new[k], out[k][:, t])) for k in out}
      done = done | settings.is_stop(token)
      # Append the sampled token at slot P + t (invalid for rows that had already ended).
      buf_tokens = jax.lax.dynamic_update_slice(buf_tokens, token[:, None], (0, p + t))
      buf_valid = jax.lax.dynamic_update_slice(buf_valid, live[:, None], (0, p + t))
      return t + 1, done, buf_tokens, buf_valid, out
    return body

  def make_cond(end: int):
    def cond(carry):
      t, done = carry[0], carry[1]
      return (t < end) & ~jnp.all(done)
    return cond

  out = dict(tokens=jnp.full((n, r), settings.pad_id, jnp.int32), mask=jnp.zeros((n, r), bool),
             policy_logprobs=jnp.zeros((n, r), jnp.float32), ref_logprobs=jnp.zeros((n, r), jnp.float32),
             sampling_logprobs=jnp.zeros((n, r), jnp.float32))
  buf_tokens = jnp.concatenate(
      [prompts.tokens.astype(jnp.int32), jnp.full((n, r), settings.pad_id, jnp.int32)], axis=1)
  buf_valid = jnp.concatenate([prompts.mask.astype(bool), jnp.zeros((n, r), bool)], axis=1)
  carry = (jnp.zeros((), jnp.int32), jnp.zeros((n,), bool), buf_tokens, buf_valid, out)

  bucket = prefix_bucket if 0 < prefix_bucket < r else r
  for start in range(0, r, bucket):
    end = min(start + bucket, r)
    # Steps start..end-1 read slots up to P - 2 + end; P + end slots cover them (whole buffer last).
    carry = jax.lax.while_loop(make_cond(end), make_body(min(p + end, p + r)), carry)
  t, _, _, _, out = carry
  return Rollout(steps=t, **out)
