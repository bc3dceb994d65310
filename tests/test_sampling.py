"""mix_logits, sampling filters and the two-model decode loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (EOS, PAD, TINY_ALLOWED, chi2_pvalue, enumerate_tiny, prompt_batch, response_ids,
                      score_responses, sequence_logprobs, token_mixture_probs)
from pilaf_jax.sampling import DecodeSettings, RowLayout, decode, filter_logits, mix_logits

_decode = jax.jit(decode, static_argnames=('policy', 'ref', 'layout', 'settings'))


def test_mix_logits_formula_and_endpoints():
  rs = np.random.RandomState(0)
  p, r = rs.randn(3, 7).astype(np.float32), rs.randn(3, 7).astype(np.float32) + 5.0
  lsm = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  for coef in (1.1, 0.9, 0.3):
    np.testing.assert_allclose(jax.nn.log_softmax(mix_logits(p, r, coef)),
                               lsm(coef * lsm(p) + (1 - coef) * lsm(r)), atol=1e-5)
  np.testing.assert_array_equal(mix_logits(p, r, 1.0), jax.nn.log_softmax(p))
  np.testing.assert_array_equal(mix_logits(p, r, 0.0), jax.nn.log_softmax(r))
  # Per-row coefficients broadcast over leading axes.
  coefs = jnp.array([1.1, 0.9, 1.0])
  rows = mix_logits(p, r, coefs)
  for i in range(3):
    np.testing.assert_allclose(rows[i], mix_logits(p[i], r[i], float(coefs[i])), atol=1e-6)
  # Invariant to each model's logit offset (it normalises first).
  np.testing.assert_allclose(mix_logits(p + 3.0, r - 2.0, 1.1), mix_logits(p, r, 1.1), atol=1e-5)


def test_mix_logits_keeps_impossible_tokens_impossible():
  p = jnp.array([0.0, 1.0, -jnp.inf])
  r = jnp.array([0.5, -jnp.inf, 0.0])
  out = mix_logits(p, r, 1.1)
  assert np.isfinite(out[0]) and out[1] == -np.inf and out[2] == -np.inf
  assert not np.isnan(np.asarray(out)).any()


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))
  assert np.isfinite(filter_logits(logits, top_k=2)).sum() == 2
  kept = np.isfinite(filter_logits(logits, top_p=0.7))  # 0.5 < 0.7 <= 0.75: two tokens.
  np.testing.assert_array_equal(kept, [True, True, False, False])
  kept = np.isfinite(filter_logits(logits, top_p=0.5))  # The top token alone reaches 0.5.
  np.testing.assert_array_equal(kept, [True, False, False, False])
  np.testing.assert_allclose(filter_logits(logits, temperature=2.0), logits / 2.0)
  np.testing.assert_array_equal(filter_logits(logits), logits)


def _settings(r=4, **kw):
  return DecodeSettings(max_new_tokens=r, eos_ids=EOS, pad_id=PAD, **kw)


def test_sampler_logprobs_equal_teacher_forced(tiny_pair):
  (policy, pp), (ref, rp) = tiny_pair
  layout = RowLayout(policy_only=3, mixed=4, ref_only=3)
  prompts = prompt_batch(10, length=4, left_pad=(1, 0, 2, 0, 0, 1, 0, 0, 3, 0))
  coef = jnp.array([1.1, 1.1, 0.9, 0.9])
  ro = _decode(policy, ref, pp, rp, prompts, coef, jax.random.key(0), layout=layout,
               settings=_settings(6), allowed_tokens=jnp.asarray(TINY_ALLOWED))
  allowed = jnp.asarray(TINY_ALLOWED)
  tf_policy = score_responses(policy, pp, prompts.tokens, prompts.mask, ro.tokens, ro.mask, allowed)
  tf_ref = score_responses(ref, rp, prompts.tokens, prompts.mask, ro.tokens, ro.mask, allowed)
  np.testing.assert_allclose(ro.policy_logprobs[:7], tf_policy[:7], atol=1e-5)
  np.testing.assert_allclose(ro.ref_logprobs[3:], tf_ref[3:], atol=1e-5)
  assert (ro.policy_logprobs[7:] == 0).all() and (ro.ref_logprobs[:3] == 0).all()
  # The sampling log-prob of a mixed row is the mixture's; of a policy row, the policy's.
  np.testing.assert_allclose(ro.sampling_logprobs[:3], tf_policy[:3], atol=1e-5)
  np.testing.assert_allclose(ro.sampling_logprobs[7:], tf_ref[7:], atol=1e-5)
  # Responses: EOS ends a row, PAD follows, the mask covers EOS.
  tokens, mask = np.asarray(ro.tokens), np.asarray(ro.mask)
  for row_tokens, row_mask in zip(tokens, mask):
    n = row_mask.sum()
    assert row_mask[:n].all() and not row_mask[n:].any()
    assert (row_tokens[n:] == PAD).all()
    assert (row_tokens[:n - 1] != EOS).all()
    assert n == 6 or row_tokens[n - 1] == EOS


def test_coef_one_is_token_identical_to_vanilla(tiny_pair):
  (policy, pp), (ref, rp) = tiny_pair
  prompts = prompt_batch(16, length=3)
  kwargs = dict(settings=_settings(5), allowed_tokens=jnp.asarray(TINY_ALLOWED))
  vanilla = _decode(policy, ref, pp, rp, prompts, jnp.zeros((0,)), jax.random.key(7),
                    layout=RowLayout(policy_only=16), **kwargs)
  mixed = _decode(policy, ref, pp, rp, prompts, jnp.ones((16,)), jax.random.key(7),
                  layout=RowLayout(mixed=16), **kwargs)
  np.testing.assert_array_equal(vanilla.tokens, mixed.tokens)
  np.testing.assert_array_equal(vanilla.policy_logprobs, mixed.policy_logprobs)
  # And coef = 0 in the mixed group equals the reference decoding alone.
  ref_only = _decode(policy, ref, pp, rp, prompts, jnp.zeros((0,)), jax.random.key(7),
                     layout=RowLayout(ref_only=16), **kwargs)
  mixed0 = _decode(policy, ref, pp, rp, prompts, jnp.zeros((16,)), jax.random.key(7),
                   layout=RowLayout(mixed=16), **kwargs)
  np.testing.assert_array_equal(ref_only.tokens, mixed0.tokens)


def _mixture_samples(tiny_pair, coef, n, r=3):
  (policy, pp), (ref, rp) = tiny_pair
  prompt = prompt_batch(1, length=3, seed=3)
  tokens, mask = enumerate_tiny(r)
  exact = token_mixture_probs(policy, pp, ref, rp, prompt, tokens, mask, coef)
  np.testing.assert_allclose(exact.sum(), 1.0, atol=1e-6)
  ro = _decode(policy, ref, pp, rp, prompt.repeat(n), jnp.full((n,), coef), jax.random.key(11),
               layout=RowLayout(mixed=n), settings=_settings(r), allowed_tokens=jnp.asarray(TINY_ALLOWED))
  # The sequence-level geometric mixture pi^coef ref^(1-coef) / Z: a different distribution.
  seq = coef * sequence_logprobs(policy, pp, prompt, tokens, mask) + \
      (1 - coef) * sequence_logprobs(ref, rp, prompt, tokens, mask)
  seq = np.exp(seq - seq.max())
  return response_ids(ro.tokens, tokens), exact, seq / seq.sum()


@pytest.mark.parametrize('coef', [1.1, 0.9])
def test_token_level_mixture_matches_brute_force(tiny_pair, coef):
  """pi_plus / pi_minus samples follow prod_t softmax(coef log p_t + (1 - coef) log r_t) (chi-square)."""
  ids, exact, _ = _mixture_samples(tiny_pair, coef, 20_000)
  assert chi2_pvalue(ids, exact) > 1e-3


def test_mixture_test_has_power(tiny_pair):
  """The same test tells the token-level mixture from the sequence-level one (which a mixer that
  picks whole sequences, or normalises per sequence, would produce)."""
  ids, exact, sequence_level = _mixture_samples(tiny_pair, 2.0, 20_000)
  assert np.abs(sequence_level - exact).max() > 0.02
  assert chi2_pvalue(ids, exact) > 1e-3
  assert chi2_pvalue(ids, sequence_level) < 1e-6


def test_early_exit_and_static_shapes(tiny_pair):
  (policy, pp), (ref, rp) = tiny_pair
  # Only EOS allowed: every row ends at the first step and the loop stops after one step.
  only_eos = np.zeros_like(TINY_ALLOWED)
  only_eos[EOS] = True
  ro = _decode(policy, ref, pp, rp, prompt_batch(4), jnp.full((4,), 1.1), jax.random.key(0),
               layout=RowLayout(mixed=4), settings=_settings(8), allowed_tokens=jnp.asarray(only_eos))
  assert ro.tokens.shape == (4, 8) and int(ro.steps) == 1
  np.testing.assert_array_equal(ro.tokens[:, 0], EOS)
  np.testing.assert_array_equal(ro.mask.sum(1), 1)


def test_temperature_zero_is_the_first_argmax_ties_included():
  from pilaf_jax.sampling.mixing import sample_tokens
  logits = jnp.array([[0.5, 2.0, 2.0, -1.0],       # A tie: the first of the two.
                      [3.0, 3.0, 3.0, 3.0],         # All tied: index 0.
                      [-jnp.inf, 1.0, -jnp.inf, 1.0],
                      [0.1, 0.2, 0.3, 0.4]])        # The last index.
  want = [1, 0, 1, 3]
  greedy = filter_logits(logits, temperature=0.0, top_k=2, top_p=0.5)
  np.testing.assert_array_equal(greedy, np.where(np.eye(4)[want] > 0, 0.0, -np.inf))
  for seed in range(20):  # No noise: every key gives the same tokens.
    key = jax.random.key(seed)
    np.testing.assert_array_equal(sample_tokens(key, logits, greedy=True), want)
    np.testing.assert_array_equal(sample_tokens(key, greedy, greedy=True), want)
  # Temperature 1 still samples: the noise moves the tie in row 0 across keys.
  draws = {int(sample_tokens(jax.random.key(s), logits)[0]) for s in range(50)}
  assert draws >= {1, 2}
  with pytest.raises(ValueError, match=r'temperature=-0.5 must be >= 0 \(0: greedy'):
    _settings(temperature=-0.5)


def test_temperature_zero_decodes_the_argmax_of_every_row(tiny_pair):
  """Policy, mixed and reference rows alike: each token is the first arg-max of its row's
  distribution given the tokens before it (checked by teacher forcing), whatever the rng."""
  (policy, pp), (ref, rp) = tiny_pair
  layout = RowLayout(policy_only=3, mixed=4, ref_only=3)
  prompts = prompt_batch(10, length=4, left_pad=(1, 0, 2, 0, 0, 1, 0, 0, 3, 0))
  coef = jnp.array([1.1, 1.1, 0.9, 0.9])
  allowed = jnp.asarray(TINY_ALLOWED)
  run = lambda seed: _decode(policy, ref, pp, rp, prompts, coef, jax.random.key(seed), layout=layout,
                             settings=_settings(6, temperature=0.0), allowed_tokens=allowed)
  ro = run(0)
  for seed in (1, 2):
    np.testing.assert_array_equal(run(seed).tokens, ro.tokens)
  mask = np.asarray(ro.mask)
  assert mask[:, 0].all()
  np.testing.assert_array_equal(np.asarray(ro.sampling_logprobs)[mask], 0.0)

  from pilaf_jax.model.scoring import masked_log_softmax
  tokens = jnp.concatenate([prompts.tokens, ro.tokens], axis=1)
  valid = jnp.concatenate([prompts.mask, ro.mask], axis=1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  lp = lambda model, params: np.asarray(masked_log_softmax(
      model.apply({'params': params}, tokens, positions, valid)[0], allowed))
  lp_pol, lp_ref = lp(policy, pp), lp(ref, rp)
  p = prompts.tokens.shape[1]
  row_coef = np.concatenate([np.ones(3), np.asarray(coef), np.zeros(3)])
  for i in range(10):
    for t in np.flatnonzero(mask[i]):
      dist = np.asarray(mix_logits(lp_pol[i, p - 1 + t], lp_ref[i, p - 1 + t], row_coef[i]))
      assert ro.tokens[i, t] == np.argmax(dist), (i, t)
