"""Every sampler's output distribution against its definition, on a vocabulary small enough to
enumerate every response; cost accounting; bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (EOS, PAD, TINY_ALLOWED, chi2_pvalue, enumerate_tiny, prompt_batch, response_ids,
                      sequence_logprobs, tiny_model, token_mixture_probs)
from pilaf_jax.batches import PI_MINUS, PI_PLUS, POLICY, REFERENCE
from pilaf_jax.sampling import DecodeSettings, RowLayout, SamplerContext, decode, make_sampler
from pilaf_jax.sampling.samplers import num_responses, t_pilaf_distributions

R = 3
BETA = 0.5  # Larger than the paper's 0.1 so pi_plus / pi_minus differ clearly from the policy.
N = 6000


@pytest.fixture(scope='module')
def setup(tiny_pair):
  (policy, pp), (ref, rp) = tiny_pair
  ctx = SamplerContext(policy=policy, ref=ref, settings=DecodeSettings(R, EOS, PAD), beta=BETA,
                       allowed_tokens=TINY_ALLOWED, best_of_n=4)
  prompt = prompt_batch(1, length=3, seed=3)
  tokens, mask = enumerate_tiny(R)
  exact = {
      'policy': np.exp(sequence_logprobs(policy, pp, prompt, tokens, mask)),
      'ref': np.exp(sequence_logprobs(ref, rp, prompt, tokens, mask)),
      'plus': token_mixture_probs(policy, pp, ref, rp, prompt, tokens, mask, 1 + BETA),
      'minus': token_mixture_probs(policy, pp, ref, rp, prompt, tokens, mask, 1 - BETA),
  }
  return ctx, pp, rp, prompt, tokens, mask, exact


def _run(setup, name, n=N, seed=0, **ctx_changes):
  ctx, pp, rp, prompt, tokens, _, _ = setup
  ctx = dataclasses.replace(ctx, **ctx_changes)
  pairs = make_sampler(name, ctx)(pp, rp, prompt.repeat(n), jax.random.key(seed))
  ids = np.stack([response_ids(pairs.responses[:, i], tokens) for i in (0, 1)], 1)
  return pairs, ids


def test_vanilla_pairs_follow_the_policy(setup):
  pairs, ids = _run(setup, 'vanilla')
  exact = setup[-1]
  assert chi2_pvalue(ids[:, 0], exact['policy']) > 1e-3
  assert chi2_pvalue(ids[:, 1], exact['policy']) > 1e-3
  assert (np.asarray(pairs.source) == POLICY).all()


def test_pilaf_half_vanilla_half_plus_minus(setup):
  pairs, ids = _run(setup, 'pilaf')
  exact = setup[-1]
  source = np.asarray(pairs.source)
  vanilla = source[:, 0] == POLICY
  assert vanilla.sum() == N // 2  # Stratified: exactly half.
  assert ((source[~vanilla, 0] == PI_PLUS) & (source[~vanilla, 1] == PI_MINUS)).all()
  assert (source[vanilla] == POLICY).all()
  assert chi2_pvalue(ids[vanilla, 0], exact['policy']) > 1e-3
  assert chi2_pvalue(ids[vanilla, 1], exact['policy']) > 1e-3
  assert chi2_pvalue(ids[~vanilla, 0], exact['plus']) > 1e-3
  assert chi2_pvalue(ids[~vanilla, 1], exact['minus']) > 1e-3
  # Power: pi_plus is not the policy.
  assert chi2_pvalue(ids[~vanilla, 0], exact['policy']) < 1e-6


def test_pilaf_assigns_vanilla_pairs_to_random_prompts(setup):
  ctx, pp, rp = setup[:3]
  prompts = prompt_batch(64, length=16, seed=4)
  rows = [tuple(t) for t in np.asarray(prompts.tokens).tolist()]
  assert len(set(rows)) == 64  # Distinct prompts, so each pair can be traced to its input row.
  vanilla_sets = []
  sample = make_sampler('pilaf', ctx)  # One jitted sampler (one compilation) for both seeds.
  for seed in (0, 1):
    pairs = sample(pp, rp, prompts, jax.random.key(seed))
    origin = [rows.index(tuple(t)) for t in np.asarray(pairs.prompts.tokens).tolist()]
    assert sorted(origin) == list(range(64))  # A permutation: every prompt gets exactly one pair.
    vanilla = {o for o, s in zip(origin, np.asarray(pairs.source)[:, 0]) if s == POLICY}
    assert len(vanilla) == 32 and vanilla != set(range(32)) and vanilla != set(range(32, 64))
    vanilla_sets.append(vanilla)
  assert vanilla_sets[0] != vanilla_sets[1]


def test_hybrid_second_response_follows_the_reference(setup):
  pairs, ids = _run(setup, 'hybrid')
  exact = setup[-1]
  assert chi2_pvalue(ids[:, 0], exact['policy']) > 1e-3
  assert chi2_pvalue(ids[:, 1], exact['ref']) > 1e-3
  assert chi2_pvalue(ids[:, 1], exact['policy']) < 1e-6
  assert (np.asarray(pairs.source) == [POLICY, REFERENCE]).all()


def test_best_of_n_picks_argmax_and_argmin(setup):
  ctx, pp, rp, _, _, _, _ = setup
  prompts = prompt_batch(32, length=3, seed=5)
  pairs = make_sampler('best_of_n', ctx)(pp, rp, prompts, jax.random.key(9))
  # Recompute the N candidates with the same rng, and their implicit rewards by teacher forcing.
  n = ctx.best_of_n
  rows = prompts.repeat(n)

  @jax.jit  # One compilation rather than an op-by-op run of the decode loop and both scorings.
  def recompute(pp, rp, rows):
    ro = decode(ctx.policy, ctx.ref, pp, rp, rows, jnp.zeros((0,)), jax.random.key(9),
                layout=RowLayout(policy_only=n * 32), settings=ctx.settings, allowed_tokens=ctx.allowed)
    return ro, BETA * (ctx.score(ctx.policy, pp, rows, ro.tokens, ro.mask).sum(-1)
                       - ctx.score(ctx.ref, rp, rows, ro.tokens, ro.mask).sum(-1))

  ro, implicit = recompute(pp, rp, rows)
  implicit = np.asarray(implicit).reshape(n, 32)
  candidates = np.asarray(ro.tokens).reshape(n, 32, R)
  chosen_reward = BETA * (np.asarray(pairs.policy_logprobs).sum(-1) - np.asarray(pairs.ref_logprobs).sum(-1))
  np.testing.assert_allclose(chosen_reward[:, 0], implicit.max(0), atol=1e-4)
  np.testing.assert_allclose(chosen_reward[:, 1], implicit.min(0), atol=1e-4)
  for i in range(32):
    assert np.asarray(pairs.responses[i, 0]).tolist() == candidates[implicit[:, i].argmax(), i].tolist()


def test_t_pilaf_exact_probabilities(setup):
  ctx, pp, rp, prompt, tokens, _, exact = setup
  d = t_pilaf_distributions(ctx, pp, rp, prompt)
  for name in ('policy', 'ref', 'plus', 'minus'):
    np.testing.assert_allclose(np.exp(np.asarray(d[name], np.float64)).sum(), 1.0, atol=1e-5)
  # Brute force: Z_plus = sum_y pi^(1+b) ref^(-b), Z_minus = sum_y pi^(1-b) ref^b.
  p, r = exact['policy'], exact['ref']
  z_plus = np.sum(p ** (1 + BETA) * r ** (-BETA))
  z_minus = np.sum(p ** (1 - BETA) * r ** BETA)
  np.testing.assert_allclose(float(d['vanilla_weight'][0]), 1 / (1 + z_plus * z_minus), rtol=1e-4)
  np.testing.assert_allclose(np.exp(d['plus'][0]), p ** (1 + BETA) * r ** (-BETA) / z_plus, rtol=1e-4)


def test_t_pilaf_samples_follow_the_exact_mixture(setup):
  ctx, pp, rp, prompt, tokens, _, exact = setup
  d = t_pilaf_distributions(ctx, pp, rp, prompt)
  pairs, ids = _run(setup, 't_pilaf', n=N)
  vanilla = np.asarray(pairs.source)[:, 0] == POLICY
  w = float(d['vanilla_weight'][0])
  assert abs(vanilla.mean() - w) < 5 * np.sqrt(w * (1 - w) / N)
  assert chi2_pvalue(ids[~vanilla, 0], np.exp(np.asarray(d['plus'][0], np.float64))) > 1e-3
  assert chi2_pvalue(ids[~vanilla, 1], np.exp(np.asarray(d['minus'][0], np.float64))) > 1e-3
  assert chi2_pvalue(ids[vanilla, 0], exact['policy']) > 1e-3


@pytest.mark.parametrize('name,sequences', [('vanilla', 2), ('pilaf', 3), ('hybrid', 2), ('best_of_n', 4)])
def test_costs_are_counted_from_what_ran(setup, name, sequences):
  ctx, pp, rp, _, _, _, _ = setup
  prompts = prompt_batch(16, length=3, seed=2, left_pad=(1, 2))
  pairs = make_sampler(name, ctx)(pp, rp, prompts, jax.random.key(0))
  cost = pairs.cost.as_dict()
  assert cost['pairs'] == 16 and cost['oracle_responses'] == 32  # Two labels per pair, always.
  assert (cost['policy_decode_sequences'] + cost['ref_decode_sequences']) / 16 == sequences
  if name == 'vanilla':
    # Each response: its prompt's valid tokens (prefill) plus its own tokens.
    expected = 2 * int(prompts.mask.sum()) + int(pairs.response_mask.sum())
    assert cost['policy_decode_tokens'] == expected == cost['ref_scoring_tokens']
    assert cost['ref_decode_tokens'] == 0
  if name == 'pilaf':
    mixed = np.asarray(pairs.source)[:, 0] != POLICY
    prompt_tokens = np.asarray(pairs.prompts.mask.sum(1))
    response_tokens = np.asarray(pairs.response_mask.sum(2))
    assert cost['ref_decode_tokens'] == int(2 * prompt_tokens[mixed].sum() + response_tokens[mixed].sum())
    assert cost['policy_decode_tokens'] == int(2 * prompt_tokens.sum() + response_tokens.sum())


def test_table1_costs_at_the_paper_n():
  """best_of_n with the paper's N = 8 costs 8 decode sequences per pair."""
  model, params = tiny_model(0)
  ctx = SamplerContext(policy=model, ref=model, settings=DecodeSettings(2, EOS, PAD), beta=0.1,
                       allowed_tokens=TINY_ALLOWED, best_of_n=8)
  pairs = make_sampler('best_of_n', ctx)(params, params, prompt_batch(4), jax.random.key(0))
  assert (pairs.cost.policy_decode_sequences + pairs.cost.ref_decode_sequences) / 4 == 8


def test_bad_sampler_input(setup):
  ctx = setup[0]
  with pytest.raises(ValueError, match='allowed'):
    make_sampler('nope', ctx)
  with pytest.raises(ValueError, match='best_of_n=1'):
    make_sampler('best_of_n', dataclasses.replace(ctx, best_of_n=1))
  other, _ = tiny_model(0, vocab=7)
  with pytest.raises(ValueError, match='vocab_size=7'):
    make_sampler('pilaf', dataclasses.replace(ctx, ref=other))
  big = dataclasses.replace(ctx, settings=DecodeSettings(16, EOS, PAD),
                            allowed_tokens=np.arange(64) >= EOS)
  with pytest.raises(ValueError, match=r'61 content tokens and response_len=16 give .* responses'):
    make_sampler('t_pilaf', big)
  assert num_responses(2, 3) == 15
