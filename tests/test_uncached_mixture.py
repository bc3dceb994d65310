"""decode_uncached (no KV cache, TRL Nash-MD style) samples what the cached two-model decode samples.

Both loops draw token t with jax.random.categorical(fold_in(rng, t), logits), so under the same rng
they pick the same token whenever their logits agree; the logits differ only by float rounding
(different matmul shapes), which could in principle flip a near-tie. The checks therefore ask for
identical tokens on at least 95% of rows (in practice all of them: on CPU the log-probs differ by
~2e-6 and no token flips) and, wherever the sampled prefixes agree, per-token log-probs equal to
1e-4.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pilaf_jax.batches import PromptBatch
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, decode
from pilaf_jax.sampling.uncached import decode_uncached

VOCAB, EOS, PAD = 16, 2, 0
PARAM_SCALE = 3.0  # Random init x3: peaked next-token distributions, early EOS in some rows.
LOGPROB_FIELDS = ('policy_logprobs', 'ref_logprobs', 'sampling_logprobs')


def _model() -> Llama:
  return Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2))


def _params(model: Llama, seed: int, scale: float):
  """Random init, scaled up so the next-token distributions are peaked rather than ~uniform."""
  return jax.tree.map(lambda x: x * scale, init_params(model.cfg, jax.random.key(seed)))


def _prompts(n: int, p: int, seed: int) -> PromptBatch:
  """Left-padded prompts of varying length (1..p real tokens), so positions are exercised too."""
  k_tok, k_len = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k_tok, (n, p), 3, VOCAB, jnp.int32)
  lengths = jax.random.randint(k_len, (n,), 1, p + 1)
  mask = jnp.arange(p)[None, :] >= (p - lengths)[:, None]
  return PromptBatch(jnp.where(mask, tokens, PAD), mask)


def _run(fn, layout: RowLayout, settings: DecodeSettings, rng, coef, prompts, allowed=None, **kw):
  model = _model()
  policy_params, ref_params = _params(model, 0, PARAM_SCALE), _params(model, 1, PARAM_SCALE)
  run = jax.jit(functools.partial(fn, model, model, layout=layout, settings=settings,
                                  allowed_tokens=allowed, **kw))
  return jax.device_get(run(policy_params, ref_params, prompts, coef, rng))


def _assert_match(cached, uncached, min_row_agreement: float = 0.95):
  tok_c, tok_u = np.asarray(cached.tokens), np.asarray(uncached.tokens)
  same_row = np.all(tok_c == tok_u, axis=1) & np.all(cached.mask == uncached.mask, axis=1)
  assert same_row.mean() >= min_row_agreement, (
      f'only {same_row.sum()}/{len(same_row)} rows identical')
  # Where the sampled prefixes agree (up to and including t), every per-token log-prob must agree.
  prefix_same = np.cumprod(tok_c == tok_u, axis=1).astype(bool)
  for field in LOGPROB_FIELDS:
    a, b = np.asarray(getattr(cached, field)), np.asarray(getattr(uncached, field))
    np.testing.assert_allclose(np.where(prefix_same, a, 0.0), np.where(prefix_same, b, 0.0),
                               atol=1e-4, rtol=0, err_msg=field)
  if same_row.all():
    assert int(cached.steps) == int(uncached.steps)
  return same_row


def test_uncached_matches_cached_all_row_groups():
  """policy-only, mixed (pi_plus and pi_minus) and reference-only rows in one batch."""
  layout = RowLayout(policy_only=8, mixed=16, ref_only=8)
  settings = DecodeSettings(max_new_tokens=12, eos_ids=EOS, pad_id=PAD)
  prompts = _prompts(layout.total, 6, seed=2)
  coef = jnp.concatenate([jnp.full((8,), 1.5), jnp.full((8,), 0.5)])
  rng = jax.random.key(7)
  cached = _run(decode, layout, settings, rng, coef, prompts)
  uncached = _run(decode_uncached, layout, settings, rng, coef, prompts)
  _assert_match(cached, uncached)
  # The test must exercise EOS: some rows end early, and the two loops agree where.
  assert (~cached.mask).any() and cached.mask[:, 0].all()
  # Rows a model did not run on carry 0 log-probs, as in decode().
  assert np.all(uncached.ref_logprobs[:layout.policy_only] == 0)
  assert np.all(uncached.policy_logprobs[layout.policy_only + layout.mixed:] == 0)


def test_uncached_mixed_rows_with_filters_allowed_tokens_and_buckets():
  """The pi_plus / pi_minus layout under temperature, top-k, top-p, an allowed-token mask and a
  bucketed (growing) prefix."""
  settings = DecodeSettings(max_new_tokens=10, eos_ids=EOS, pad_id=PAD, temperature=0.8, top_k=6,
                            top_p=0.9)
  layout = RowLayout(mixed=24)
  prompts = _prompts(layout.total, 5, seed=3)
  coef = jnp.array([1.1, 0.9] * 12)
  allowed = jnp.arange(VOCAB) >= EOS
  rng = jax.random.key(11)
  cached = _run(decode, layout, settings, rng, coef, prompts, allowed)
  uncached = _run(decode_uncached, layout, settings, rng, coef, prompts, allowed, prefix_bucket=3)
  _assert_match(cached, uncached)
  assert not np.isin(np.asarray(uncached.tokens)[np.asarray(uncached.mask)], [0, 1]).any()


def test_uncached_steps_stop_when_all_rows_end():
  """Only EOS allowed: every row ends at step 0 and the (bucketed) loop stops after one step."""
  settings = DecodeSettings(max_new_tokens=8, eos_ids=EOS, pad_id=PAD)
  only_eos = jnp.arange(VOCAB) == EOS
  ro = _run(decode_uncached, RowLayout(mixed=4), settings, jax.random.key(0), jnp.full((4,), 1.2),
            _prompts(4, 4, seed=4), only_eos, prefix_bucket=3)
  assert int(ro.steps) == 1
  assert np.all(ro.tokens[:, 0] == EOS) and np.all(ro.mask[:, 0]) and not ro.mask[:, 1:].any()


def test_uncached_rejects_bad_layout():
  settings = DecodeSettings(max_new_tokens=4, eos_ids=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match='layout'):
    _run(decode_uncached, RowLayout(mixed=3), settings, jax.random.key(0), jnp.ones((3,)),
         _prompts(4, 4, seed=0))
