"""The DPO loss against hand-computed values, and the update step."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from conftest import prompt_batch, score_responses, tiny_model
from pilaf_jax.batches import PairBatch, PreferenceBatch, SamplingCost
from pilaf_jax.learning.dpo import dpo_loss, dpo_step
from pilaf_jax.learning.train_state import init_train_state, make_optimizer


def test_dpo_loss_hand_computed():
  # beta * [(pc - rc) - (pr - rr)] = 0.1 * [(-3 - -4) - (-5 - -4)] = 0.2.
  loss, m = dpo_loss(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]), jnp.array([-4.0]), 0.1)
  np.testing.assert_allclose(loss, math.log1p(math.exp(-0.2)), rtol=1e-6)
  np.testing.assert_allclose(m['implicit_margin'], 0.2, rtol=1e-6)
  np.testing.assert_allclose(m['chosen_reward'], 0.1, rtol=1e-6)
  # A batch: the mean of per-pair losses; margin 0 gives log 2.
  loss, m = dpo_loss(jnp.array([-1.0, -2.0]), jnp.array([-1.0, -1.0]), jnp.array([-1.0, -1.0]),
                     jnp.array([-1.0, -3.0]), 0.5)
  margins = np.array([0.0, 0.5 * ((-2 + 1) - (-1 + 3))])
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-margins))), rtol=1e-6)
  np.testing.assert_allclose(m['implicit_accuracy'], 0.0)


def test_chosen_rejected_follows_labels():
  x = jnp.arange(6.0).reshape(3, 2)
  batch = PreferenceBatch(pairs=None, a_preferred=jnp.array([True, False, True]))
  chosen, rejected = batch.chosen_rejected(x)
  np.testing.assert_array_equal(chosen, [0, 3, 4])
  np.testing.assert_array_equal(rejected, [1, 2, 5])


def _pairs(model, params, b=8, r=4, seed=0):
  """Random pairs over an 11-token vocabulary (distinct prompts and responses)."""
  rs = np.random.RandomState(seed)
  prompts = prompt_batch(b, length=4, seed=seed, vocab=11)
  responses = jnp.asarray(rs.randint(3, 11, size=(b, 2, r)), jnp.int32)
  mask = jnp.ones((b, 2, r), bool)
  allowed = None
  ref_lp = jnp.stack([score_responses(model, params, prompts.tokens, prompts.mask, responses[:, i],
                                      mask[:, i], allowed) for i in (0, 1)], 1)
  return PairBatch(prompts=prompts, responses=responses, response_mask=mask, policy_logprobs=ref_lp,
                   ref_logprobs=ref_lp, source=jnp.zeros((b, 2), jnp.int8), cost=SamplingCost.zero())


def test_dpo_step_starts_at_log2_and_learns_preferences():
  model, params = tiny_model(0, vocab=11, scale=2.0)
  pairs = _pairs(model, params)
  labels = PreferenceBatch(pairs, jnp.asarray(np.random.RandomState(1).rand(8) > 0.5))
  tx = make_optimizer(1e-2, 1)
  step = jax.jit(functools.partial(dpo_step, model=model, tx=tx, beta=0.5))
  state = init_train_state(params, tx)
  state, m = step(state, labels)
  np.testing.assert_allclose(m['dpo_loss'], math.log(2), rtol=1e-5)  # Policy == reference.
  for _ in range(59):
    state, m = step(state, labels)
  assert float(m['dpo_loss']) < 0.3 and float(m['implicit_accuracy']) == 1.0
  assert int(state.step) == 60
