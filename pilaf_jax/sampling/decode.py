"""The two-model decode loop: policy and reference KV caches advanced together, mixed per token.

Rows of a decode batch come in three contiguous groups (a static RowLayout):

    [ policy only | mixed: both models, coef per row | reference only ]

The policy runs on the first two groups and the reference on the last two, so a vanilla pair never
pays for the reference and a hybrid pair pays for each model once. The loop is one jitted
lax.while_loop: no host round-trip per token, static shapes, early exit once every row hit EOS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PromptBatch
from pilaf_jax.model.llama import KVCache, Llama, compute_params, unstack_layer_params
from pilaf_jax.model.scoring import masked_log_softmax, pick_tokens
from pilaf_jax.sampling.mixing import filter_logits, mix_logits, sample_tokens


@dataclasses.dataclass(frozen=True)
class RowLayout:
  policy_only: int = 0
  mixed: int = 0
  ref_only: int = 0

  @property
  def total(self) -> int:
    return self.policy_only + self.mixed + self.ref_only

  @property
  def policy_rows(self) -> slice:
    return slice(0, self.policy_only + self.mixed)

  @property
  def ref_rows(self) -> slice:
    return slice(self.policy_only, self.total)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """max_new_tokens: R. eos_ids: the stop tokens, one id or several (Llama-3 instruct ends with
  either <|eot_id|> or <|end_of_text|>); the first is the canonical one. temperature 0 decodes
  greedily: the first arg-max of the (mixed, filtered) logits, no noise."""
  max_new_tokens: int
  eos_ids: Union[int, tuple[int, ...]]
  pad_id: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  # Cost analysis only (tools/aot.py): > 0 runs exactly this many decode steps, unrolled, without
  # the while loop or its early exit (XLA's cost analysis counts a loop body once). 0: the loop.
  unroll_steps: int = 0
  # Models with scanned layers (model.scan_layers) decode with their layers unrolled over per-layer
  # weights, sliced once per call. Under a layer scan XLA:CPU copies each layer's weights out of
  # the stack before its matmuls, at every step: decoding, which reads every weight per token,
  # then moves them three times. Same tokens; compiles the layer num_layers times.
  unroll_layers: bool = False

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f'temperature={self.temperature!r} must be >= 0 (0: greedy, the first arg-max).')
    ids = (self.eos_ids,) if isinstance(self.eos_ids, (int, np.integer)) else tuple(self.eos_ids)
    if not ids:
      raise ValueError('DecodeSettings needs at least one stop token (eos_ids).')
    object.__setattr__(self, 'eos_ids', tuple(int(i) for i in ids))

  @classmethod
  def from_sampler_config(cls, sampler, *, max_new_tokens: int, eos_ids, pad_id: int,
                          unroll_steps: int = 0) -> 'DecodeSettings':
    """The settings a run decodes with, from config.sampler (the run and tools/programs.py alike)."""
    return cls(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
               temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p,
               unroll_steps=unroll_steps, unroll_layers=sampler.unroll_layers)

  @property
  def eos_id(self) -> int:
    return self.eos_ids[0]

  def is_stop(self, tokens: jax.Array) -> jax.Array:
    """True where a token ends its response."""
    return jnp.isin(tokens, jnp.asarray(self.eos_ids, tokens.dtype))


@flax.struct.dataclass
class Rollout:
  """Decoded responses, [N, R] each. EOS is included in mask; PAD follows it.

  policy_logprobs / ref_logprobs: log-prob of each token under each model (temperature 1, no
  filters: the models themselves), 0 for rows a model did not run on. sampling_logprobs: under the
  distribution actually sampled from (after mixing and filters).
  """
  tokens: jax.Array
  mask: jax.Array
  policy_logprobs: jax.Array
  ref_logprobs: jax.Array
  sampling_logprobs: jax.Array
  steps: jax.Array  # Decode steps run (< R when every row ended early).


def layout_logprobs(layout: RowLayout, lp_pol: Optional[jax.Array], lp_ref: Optional[jax.Array],
                    mix_coef: jax.Array) -> jax.Array:
  """The sampling distribution of every row, [N, V]: the policy's, the mixture's, the reference's.

  lp_pol covers the policy rows (policy-only then mixed), lp_ref the reference rows (mixed then
  reference-only).
  """
  parts = []
  if layout.policy_only:
    parts.append(lp_pol[:layout.policy_only])
  if layout.mixed:
    parts.append(mix_logits(lp_pol[layout.policy_only:], lp_ref[:layout.mixed], mix_coef))
  if layout.ref_only:
    parts.append(lp_ref[layout.mixed:])
  return jnp.concatenate(parts, axis=0)


def per_layer(model: Llama, params) -> tuple[Llama, Any]:
  """(model, params) with the layers unrolled: a scanned model's stack sliced into layers_0 ... ."""
  if not model.cfg.scan_layers:
    return model, params
  return model.clone(cfg=dataclasses.replace(model.cfg, scan_layers=False)), unstack_layer_params(params)


def _prefill(model: Llama, params, prompts: PromptBatch, positions, slots: int):
  cache = KVCache.zeros(model.cfg, prompts.size, slots)
  logits, cache = model.apply({'params': params}, prompts.tokens, positions, prompts.mask, cache)
  return logits[:, -1], cache


def draw_token(t, done, lp_pol, lp_ref, rng, layout: RowLayout, mix_coef, settings: DecodeSettings,
               pol_rows, ref_rows) -> tuple[jax.Array, dict]:
  """Response token t of every row (pad where done) from the layout's mixture, filtered, and what is
  recorded of it: (token, {tokens, mask, sampling_logprobs, policy_logprobs, ref_logprobs}), the
  log-probs of a model that did not run (lp_* None) being zeros. Shared by both decoders."""
  n = done.shape[0]
  logits = filter_logits(layout_logprobs(layout, lp_pol, lp_ref, mix_coef), settings.temperature,
                         settings.top_k, settings.top_p)
  token = sample_tokens(jax.random.fold_in(rng, t), logits, greedy=settings.temperature == 0)
  token = jnp.where(done, settings.pad_id, token)
  new = dict(tokens=token, mask=~done, sampling_logprobs=pick_tokens(jax.nn.log_softmax(logits, axis=-1), token),
             policy_logprobs=jnp.zeros((n,), jnp.float32), ref_logprobs=jnp.zeros((n,), jnp.float32))
  if lp_pol is not None:
    new['policy_logprobs'] = new['policy_logprobs'].at[pol_rows].set(pick_tokens(lp_pol, token[pol_rows]))
  if lp_ref is not None:
    new['ref_logprobs'] = new['ref_logprobs'].at[ref_rows].set(pick_tokens(lp_ref, token[ref_rows]))
  return token, new


def decode(policy: Llama, ref: Llama, policy_params, ref_params, prompts: PromptBatch,
           mix_coef: jax.Array, rng: jax.Array, *, layout: RowLayout, settings: DecodeSettings,
           allowed_tokens: Optional[jax.Array] = None) -> Rollout:
  """Samples one response per prompt row. Pure: jit it with the modules, layout, settings static.

  prompts: [N, P] with N == layout.total. mix_coef: [layout.mixed], the coef of mix_logits for each
  mixed row (1 + beta: pi_plus, 1 - beta: pi_minus).
  """
  n, p = prompts.tokens.shape
  if n != layout.total:
    raise ValueError(f'{n} prompt rows for a layout of {layout.total}.')
  if settings.unroll_layers:
    policy, policy_params = per_layer(policy, policy_params)
    ref, ref_params = per_layer(ref, ref_params)
  # Every step reads every weight: in the activation dtype, once (same values; half the bytes for
  # float32 master weights under bfloat16 activations).
  policy_params, ref_params = compute_params(policy_params, policy.cfg), compute_params(ref_params, ref.cfg)
  r = settings.max_new_tokens
  slots = p + r
  positions = jnp.maximum(jnp.cumsum(prompts.mask, axis=1) - 1, 0)
  prompt_len = prompts.mask.sum(axis=1).astype(jnp.int32)
  pol_rows, ref_rows = layout.policy_rows, layout.ref_rows
  run_policy, run_ref = layout.policy_only + layout.mixed > 0, layout.mixed + layout.ref_only > 0

  pol_logits = pol_cache = ref_logits = ref_cache = None
  if run_policy:
    pol_logits, pol_cache = _prefill(policy, policy_params, prompts.take(pol_rows), positions[pol_rows], slots)
  if run_ref:
    ref_logits, ref_cache = _prefill(ref, ref_params, prompts.take(ref_rows), positions[ref_rows], slots)

  def sample(t, done, pol_logits, ref_logits, out):
    """Draws response token t of every row and records it; returns (token, valid, done, out)."""
    lp_pol = masked_log_softmax(pol_logits, allowed_tokens) if run_policy else None
    lp_ref = masked_log_softmax(ref_logits, allowed_tokens) if run_ref else None
    token, new = draw_token(t, done, lp_pol, lp_ref, rng, layout, mix_coef, settings, pol_rows, ref_rows)
    valid = new['mask']
    out = {k: jax.lax.dynamic_update_index_in_dim(
        out[k], jnp.where(valid, new[k], jax.lax.dynamic_index_in_dim(out[k], t, 1, False)), t, 1)
           for k in out}
    return token, valid, done | settings.is_stop(token), out

  def body(carry):
    t, done, pol_logits, pol_cache, ref_logits, ref_cache, out = carry
    token, valid, done, out = sample(t, done, pol_logits, ref_logits, out)
    # Feed the sampled token: it sits at slot P + t and position prompt_len + t.
    step_pos = (prompt_len + t)[:, None]
    if run_policy:
      pol_logits, pol_cache = policy.apply({'params': policy_params}, token[pol_rows, None],
                                           step_pos[pol_rows], valid[pol_rows, None], pol_cache)
      pol_logits = pol_logits[:, -1]
    if run_ref:
      ref_logits, ref_cache = ref.apply({'params': ref_params}, token[ref_rows, None],
                                        step_pos[ref_rows], valid[ref_rows, None], ref_cache)
      ref_logits = ref_logits[:, -1]
    return t + 1, done, pol_logits, pol_cache, ref_logits, ref_cache, out

  def cond(carry):
    # The last token (t = R - 1) is sampled after the loop: nothing reads the forward pass of it.
    t, done = carry[0], carry[1]
    return (t < r - 1) & ~jnp.all(done)

  out = dict(tokens=jnp.full((n, r), settings.pad_id, jnp.int32), mask=jnp.zeros((n, r), bool),
             policy_logprobs=jnp.zeros((n, r), jnp.float32), ref_logprobs=jnp.zeros((n, r), jnp.float32),
             sampling_logprobs=jnp.zeros((n, r), jnp.float32))
  carry = (jnp.zeros((), jnp.int32), jnp.zeros((n,), bool), pol_logits, pol_cache, ref_logits,
           ref_cache, out)
  if settings.unroll_steps:
    for _ in range(settings.unroll_steps):
      carry = body(carry)
  else:
    carry = jax.lax.while_loop(cond, body, carry)
  t, done, pol_logits, _, ref_logits, _, out = carry
  # The final step (t < R, since the loop stops at R - 1): rows already done record nothing, so
  # running it when every row has ended changes no output; it only counts as a step when it samples.
  live = ~jnp.all(done)
  _, _, _, out = sample(t, done, pol_logits, ref_logits, out)
  t = t + live.astype(t.dtype)
  return Rollout(steps=t, **out)
