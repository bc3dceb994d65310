"""The synthetic task: a fixed hidden world, valid behaviour responses, the oracle."""
import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax import default_config
from pilaf_jax.batches import PairBatch, SamplingCost
from pilaf_jax.labelling.oracles import make_oracle
from pilaf_jax.tasks import BOS, EOS, PAD, make_task, oracle_reward, sample_behaviour, sample_prompts
from pilaf_jax.tasks.synthetic import topic_posterior


def _world():
  return make_task(default_config.get_config().task)


def test_world_is_fixed_by_its_seed():
  a, b = _world(), _world()
  np.testing.assert_array_equal(a.utility, b.utility)
  cfg = default_config.get_config().task
  cfg.world_seed = 7
  assert not np.array_equal(make_task(cfg).utility, a.utility)


def test_prompts_and_behaviour_are_well_formed():
  world = _world()
  prompts, topics = sample_prompts(world, jax.random.key(0), 512)
  assert prompts.tokens.shape == (512, 8) and (prompts.tokens[:, 0] == BOS).all()
  assert (prompts.tokens[:, 1:] >= 3).all()
  # The oracle recovers the hidden topic from the prompt.
  assert (topic_posterior(world, prompts).argmax(-1) == topics).mean() > 0.95
  tokens, mask = sample_behaviour(world, jax.random.key(1), prompts, topics)
  lengths = mask.sum(1)
  assert (lengths >= 3).all() and (lengths <= 16).all()
  last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], 1)[:, 0]
  assert (last == EOS).all() and (jnp.where(mask, 0, tokens) == PAD).all()


def test_oracle_reward_by_hand():
  world = _world()
  prompts, topics = sample_prompts(world, jax.random.key(0), 1)
  k = int(topics[0])
  responses = jnp.array([[5, 9, EOS, PAD]])
  mask = jnp.array([[True, True, True, False]])
  post = np.asarray(topic_posterior(world, prompts))[0]
  expected = 4.0 * sum(post[j] * (world.utility[j, 5] + world.utility[j, 9]) for j in range(8)) / (2 + 2)
  np.testing.assert_allclose(oracle_reward(world, prompts, responses, mask)[0], expected, rtol=1e-5)
  assert post[k] > 0.5


def test_bradley_terry_label_frequencies():
  """P(a preferred) = sigmoid(r_a - r_b): checked on one pair repeated (binomial, 5 sigma)."""
  world = _world()
  prompts, _ = sample_prompts(world, jax.random.key(0), 1)
  n = 20_000
  a = jnp.array([5, 9, 11, EOS])
  b = jnp.array([6, 7, EOS, PAD])
  responses = jnp.broadcast_to(jnp.stack([a, b])[None], (n, 2, 4))
  mask = responses != PAD
  pairs = PairBatch(prompts=prompts.repeat(n), responses=responses, response_mask=mask,
                    policy_logprobs=jnp.zeros((n, 2, 4)), ref_logprobs=jnp.zeros((n, 2, 4)),
                    source=jnp.zeros((n, 2), jnp.int8), cost=SamplingCost.zero())
  reward_fn = lambda p, y, m: oracle_reward(world, p, y, m)
  labels, rewards = make_oracle('bradley_terry', reward_fn)(pairs, jax.random.key(3))
  p = float(jax.nn.sigmoid(rewards[0, 0] - rewards[0, 1]))
  assert abs(float(labels.mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)
  det, _ = make_oracle('deterministic', reward_fn)(pairs, jax.random.key(3))
  assert bool((det == (rewards[:, 0] > rewards[:, 1])).all())
