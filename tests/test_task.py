"""The synthetic task: a fixed hidden world, valid behaviour responses, the oracle, the Task protocol."""
import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax import default_config
from pilaf_jax.labelling.oracles import make_label_rule
from pilaf_jax.tasks import (BOS, EOS, EVAL, PAD, TRAIN, SyntheticTaskConfig, Task, make_task, make_world,
                             oracle_reward, sample_behaviour, sample_prompts)
from pilaf_jax.tasks.synthetic import topic_posterior


def _world(world_seed: int = 1234):
  cfg = default_config.get_config().task
  cfg.synthetic.world_seed = world_seed
  return make_world(SyntheticTaskConfig.from_config(cfg))


def test_world_is_fixed_by_its_seed():
  a, b = _world(), _world()
  np.testing.assert_array_equal(a.utility, b.utility)
  assert not np.array_equal(_world(7).utility, a.utility)


def test_synthetic_task_protocol_prompts_are_fixed_by_id():
  """A prompt is the same whatever batch it is drawn in; ids number the split; held-out prompts do
  not depend on the run's seed, training prompts do."""
  config = default_config.get_config()
  task = make_task(config, jax.random.key(0))
  assert isinstance(task, Task) and task.eos_ids == (EOS,) and task.pad_id == PAD
  big = task.prompts(TRAIN, 0, 8)
  np.testing.assert_array_equal(big.ids, np.arange(8))
  small = task.prompts(TRAIN, 3, 2)  # Prompts 6 and 7.
  np.testing.assert_array_equal(small.ids, [6, 7])
  np.testing.assert_array_equal(small.tokens, big.tokens[6:8])
  assert task.describe(TRAIN, 7) == ' '.join(map(str, big.tokens[7]))
  other_seed = make_task(config, jax.random.key(1))
  assert not np.array_equal(other_seed.prompts(TRAIN, 0, 8).tokens, big.tokens)
  np.testing.assert_array_equal(other_seed.prompts(EVAL, 0, 8).tokens, task.prompts(EVAL, 0, 8).tokens)
  assert not np.array_equal(task.prompts(EVAL, 0, 8).tokens, big.tokens)
  # The task's reward is the hidden reward of the prompt's tokens.
  responses = np.asarray([[5, 9, EOS, PAD]] * 8, np.int32)
  mask = responses != PAD
  np.testing.assert_allclose(task.rewards(TRAIN, big, responses, mask),
                             oracle_reward(task.world, big, jnp.asarray(responses), jnp.asarray(mask)), rtol=1e-6)


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
  rows = prompts.repeat(n)
  rewards = jnp.stack([oracle_reward(world, rows, responses[:, i], mask[:, i]) for i in (0, 1)], 1)
  labels = make_label_rule('bradley_terry')(rewards, jax.random.key(3))
  p = float(jax.nn.sigmoid(rewards[0, 0] - rewards[0, 1]))
  assert abs(float(labels.mean()) - p) < 5 * np.sqrt(p * (1 - p) / n)
  det = make_label_rule('deterministic')(rewards, jax.random.key(3))
  assert bool((det == (rewards[:, 0] > rewards[:, 1])).all())
  # Exact ties go either way, about half each.
  tie = make_label_rule('deterministic')(jnp.zeros((n, 2)), jax.random.key(4))
  assert abs(float(tie.mean()) - 0.5) < 5 * np.sqrt(0.25 / n)
