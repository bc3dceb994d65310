"""The rare-reward enumerable task (pilaf_jax/tasks/rare.py) and the map built on it.

- The exact behaviour table equals the frequencies of the task's own SFT sampler (within 4.5 SE);
  the reward table equals the task's oracle on every response.
- Bad config fields fail early with one line naming the field.
- The warm start fits pi_lambda ~ pi_ref exp(lambda r*/beta) on a small network.
- The map: at lambda = 0 every sampler is vanilla (ratios exactly 1), and J* - J = beta KL(pi* || pi_start).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pilaf_jax.analysis import rare_map
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params
from pilaf_jax.model.scoring import response_logprobs
from pilaf_jax.sampling.samplers import enumerate_responses
from pilaf_jax.tasks import TASKS, rare

Z = 4.5


def _config(**fields):
  c = ml_collections.ConfigDict()
  c.beta = 0.5
  c.task = ml_collections.ConfigDict(dict(name='rare', vocab_size=6, prompt_len=4, response_len=3))
  c.task.rare = rare.default_fields()
  c.task.rare.update(fields)
  c.model = ml_collections.ConfigDict(dict(vocab_size=6))
  return c


def _responses(cfg):
  return enumerate_responses(np.arange(cfg.vocab_size) >= rare.EOS, rare.EOS, rare.PAD, cfg.response_len)


def test_behaviour_table_matches_the_sft_sampler():
  task = TASKS['rare'](_config(good_prob=0.2, topic_spread=1.5), jax.random.key(0))
  cfg = task.cfg
  tokens, mask = _responses(cfg)
  table = rare.behaviour_logprobs(cfg, tokens, mask)
  np.testing.assert_allclose(np.exp(table).sum(-1), 1.0, atol=1e-12)
  n = 20000
  prompts, responses, rmask = jax.jit(task.sft_batch, static_argnums=1)(jax.random.key(1), n)
  topics = np.asarray(prompts.tokens[:, -1]) - rare.FIRST_CONTENT
  key = lambda t, m: tuple(np.where(m, t, -1))
  index = {key(t, m): i for i, (t, m) in enumerate(zip(tokens, mask))}
  counts = np.zeros_like(table)
  for k, t, m in zip(topics, np.asarray(responses), np.asarray(rmask)):
    counts[k, index[key(t, m)]] += 1
  for k in range(cfg.num_topics):
    nk = counts[k].sum()
    p = np.exp(table[k])
    se = np.sqrt(p * (1 - p) / nk)
    assert np.all(np.abs(counts[k] / nk - p) < Z * se + 1e-9), k


def test_reward_table_equals_the_oracle():
  task = TASKS['rare'](_config(reward_scale=3.0, noise_utility=0.5), jax.random.key(0))
  tokens, mask = _responses(task.cfg)
  table = rare.reward_table(task.cfg, tokens, mask)
  prompts = task.all_topic_prompts()
  e = tokens.shape[0]
  got = task.rewards('eval', jax.tree.map(lambda x: np.repeat(np.asarray(x), e, 0), prompts),
                     np.tile(tokens, (task.cfg.num_topics, 1)), np.tile(mask, (task.cfg.num_topics, 1)))
  np.testing.assert_allclose(got.reshape(task.cfg.num_topics, e), table, atol=1e-5)
  # The good token is worth reward_scale; the held-out prompts hold every topic.
  assert table[0, index_of(tokens, mask, [rare.FIRST_CONTENT])] == pytest.approx(3.0)
  batch = task.prompts('eval', 0, 64)
  assert set(np.asarray(batch.tokens[:, -1]).tolist()) == {3, 4, 5}


def index_of(tokens, mask, body):
  want = list(body) + [rare.EOS]
  for i, (t, m) in enumerate(zip(tokens, mask)):
    if list(t[m]) == want:
      return i
  raise KeyError(body)


@pytest.mark.parametrize('fields, message', [
    (dict(start_lambda=1.5), 'task.rare.start_lambda=1.5 must lie in [0, 1]'),
    (dict(good_prob=0.5, topic_spread=3.0), 'each must lie in (0, 1)'),
    (dict(reward_scale=0.0), 'task.rare.reward_scale=0.0 must be > 0'),
    (dict(nonsense=1), "task.rare has unknown fields ['nonsense']"),
])
def test_bad_fields_fail_early(fields, message):
  c = _config()
  with c.task.rare.unlocked():
    c.task.rare.update(fields)
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')
                     .replace(']', r'\]')):
    TASKS['rare'](c, jax.random.key(0))


def test_warm_start_fits_the_tilted_policy(tmp_path):
  c = _config(start_lambda=0.6, start_steps=150, start_learning_rate=1e-2, reward_scale=2.0)
  task = rare.RareTask(rare.RareTaskConfig.from_config(c), jax.random.key(0), str(tmp_path))
  model = Llama(LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1))
  ref = init_params(model.cfg, jax.random.key(3))
  tokens, mask = _responses(task.cfg)
  prompts = task.all_topic_prompts()
  k, e = task.cfg.num_topics, tokens.shape[0]
  allowed = jnp.asarray(task.allowed_tokens)

  def logp(p):
    return np.asarray(response_logprobs(model, p, jnp.repeat(prompts.tokens, e, 0), jnp.repeat(prompts.mask, e, 0),
                                        jnp.tile(tokens, (k, 1)), jnp.tile(mask, (k, 1)), allowed).sum(-1)
                      .reshape(k, e), np.float64)
  r = rare.reward_table(task.cfg, tokens, mask)
  target = jax.nn.log_softmax(logp(ref) + 0.6 * r / 0.5, -1)
  kl = lambda lp: float(np.mean(np.sum(np.exp(target) * (target - lp), -1)))
  start = task.initial_policy(model, ref)
  assert kl(logp(ref)) > 0.3 and kl(logp(start)) < 0.05 * kl(logp(ref)), (kl(logp(ref)), kl(logp(start)))
  # Kept beside the reference: a second call reads the same parameters back.
  assert len(list((tmp_path / 'warm_start').iterdir())) == 1
  again = task.initial_policy(model, ref)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  at_ref = TASKS['rare'](_config(start_lambda=0.0), jax.random.key(0)).initial_policy(model, ref)
  assert at_ref is ref


def test_map_cells_are_exact_at_the_reference_and_satisfy_the_optimum_identity():
  at_ref = rare_map.cell(0.5, 2.0, 0.0)
  for name in rare_map.VARIANTS:
    assert at_ref['samplers'][name]['relative_gain'] == pytest.approx(1.0, abs=1e-9), name
  c = rare_map.cell(0.5, 2.0, 0.5)
  # J* - J(pi) = beta KL(pi || pi*) for the regularised objective; check it against the cell's J.
  from pilaf_jax.analysis import theory
  cfg = rare.RareTaskConfig(vocab_size=6, prompt_len=4, response_len=4, beta=0.5,
                            **{**dict(rare.default_fields()), 'reward_scale': 2.0})
  tokens, mask = enumerate_responses(np.arange(6) >= rare.EOS, rare.EOS, rare.PAD, 4)
  ref = rare.behaviour_logprobs(cfg, tokens, mask)
  r = rare.reward_table(cfg, tokens, mask)
  start = np.asarray(jax.nn.log_softmax(ref + 0.5 * r / 0.5, -1))
  star = np.asarray(jax.nn.log_softmax(ref + r / 0.5, -1))
  gap = theory.optimum(ref, r, 0.5) - c['J']
  assert gap == pytest.approx(0.5 * np.mean(np.sum(np.exp(start) * (start - star), -1)), rel=1e-6)
  assert c['kl_star_ref'] > 5  # Good responses are rare: the optimum is far from the reference.
