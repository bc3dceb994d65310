"""pilaf's coin at any batch size: every prompt gets a vanilla pair with probability exactly
vanilla_fraction, pairs keep their prompt ids, and the cost counts every row that ran."""
import dataclasses

import jax
import numpy as np
import pytest

from conftest import EOS, PAD, TINY_ALLOWED, prompt_batch
from pilaf_jax.batches import PI_MINUS, PI_PLUS, POLICY
from pilaf_jax.sampling import DecodeSettings, SamplerContext, make_sampler

DRAWS = 400


@pytest.fixture(scope='module')
def ctx(tiny_pair):
  (policy, pp), (ref, rp) = tiny_pair
  return SamplerContext(policy=policy, ref=ref, settings=DecodeSettings(2, EOS, PAD), beta=0.5,
                        allowed_tokens=TINY_ALLOWED), pp, rp


@pytest.mark.parametrize('batch,fraction', [(1, 0.5), (5, 0.5), (3, 0.25), (4, 0.5)])
def test_each_prompt_is_vanilla_with_probability_fraction(ctx, batch, fraction):
  ctx, pp, rp = ctx
  ctx = dataclasses.replace(ctx, vanilla_fraction=fraction)
  sample = make_sampler('pilaf', ctx)
  prompts = prompt_batch(batch, length=3, seed=1)
  prompts = prompts.replace(ids=np.arange(100, 100 + batch, dtype=np.int32))
  vanilla = np.zeros(batch)
  draws = jax.vmap(sample, in_axes=(None, None, None, 0))(pp, rp, prompts, jax.random.split(jax.random.key(0), DRAWS))
  draws = jax.device_get(draws)  # One copy to numpy: indexing device arrays draw by draw dispatches per leaf.
  for d in range(DRAWS):
    pairs = jax.tree.map(lambda x: np.asarray(x[d]), draws)
    source, ids = pairs.source, pairs.prompts.ids
    # Pairs are vanilla (policy, policy) or mixed (pi_plus, pi_minus), never anything else.
    is_vanilla = (source == POLICY).all(1)
    assert (is_vanilla | ((source[:, 0] == PI_PLUS) & (source[:, 1] == PI_MINUS))).all()
    # Every prompt appears once, with its own tokens.
    assert sorted(ids.tolist()) == list(range(100, 100 + batch))
    np.testing.assert_array_equal(np.asarray(pairs.prompts.tokens), np.asarray(prompts.tokens)[ids - 100])
    vanilla[ids - 100] += is_vanilla
    exact = batch * fraction
    if exact == int(exact):  # Stratified: exactly B * f vanilla pairs in every batch.
      assert is_vanilla.sum() == exact
    else:  # The boundary prompt was decoded both ways: its discarded pair is counted as it ran.
      assert int(pairs.cost.policy_decode_sequences) == 2 * (int(exact) + 1) + 2 * (batch - int(exact))
  # Per prompt, P(vanilla) = fraction (binomial, 5 sigma); so is the average over prompts.
  sd = np.sqrt(fraction * (1 - fraction) / DRAWS)
  assert np.all(np.abs(vanilla / DRAWS - fraction) < 5 * sd), vanilla / DRAWS
  assert abs(vanilla.mean() / DRAWS - fraction) < 5 * sd / np.sqrt(batch)
