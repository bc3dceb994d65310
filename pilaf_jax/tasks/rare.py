"""An enumerable task whose best responses are rare under the reference, with a warm start partway
to the optimum: where the samplers can differ (issue 20's "band").

- Topics: one per content token (K = vocab_size - 3). Prompt k is [BOS, g_k, ..., g_k], g_k = 3 + k.
- Behaviour (what the reference is fine-tuned on): 0..R content tokens (uniform), then EOS (none at
  length R).
  Each token is the topic's good token g_k with probability good_prob * topic_spread^k, else one of
  the other content tokens uniformly. So good responses are rare under pi_ref, and how rare (hence
  KL(pi* || pi_ref)) is set by good_prob, reward_scale and beta.
- Oracle: r*(x, y) = reward_scale * sum_t u[k, y_t], u = 1 for g_k, noise_utility * N(0, 1) (fixed
  by world_seed) for the other content tokens: the reward's sd scales with reward_scale.
- Warm start: the policy starts at pi_lambda proportional to pi_ref exp(start_lambda r* / beta), fitted
  by exact cross-entropy over every response (SFT on the reward-tilted responses, in expectation).
  start_lambda = 0 is the reference, 1 the optimum pi*; along this path r* - r_theta = (1 - lambda) r*
  up to a constant, so the residual starts small when lambda is near 1.

Fields live in config.task.rare (configs/rare.py); the shared task fields give vocab_size,
prompt_len and response_len.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pilaf_jax.batches import PromptBatch
from pilaf_jax.errors import ConfigError
from pilaf_jax.tasks.base import REFERENCE_SFT, SPLITS, TRAIN
from pilaf_jax.tasks.synthetic import check_trains_own_reference

PAD, BOS, EOS = 0, 1, 2
FIRST_CONTENT = 3
_TRAIN_STREAM, _EVAL_STREAM = 0x7A5D0, 0x7A5D1


def default_fields() -> ml_collections.ConfigDict:
  """config.task.rare with its defaults (configs/rare.py sets them)."""
  return ml_collections.ConfigDict(dict(
      world_seed=7,  # Fixes the non-good tokens' utilities and the held-out prompt stream.
      good_prob=0.05,  # Behaviour: probability that a token is the topic's good token (topic 0).
      topic_spread=1.0,  # Topic k's good-token probability is good_prob * topic_spread^k.
      reward_scale=2.0,  # r* = reward_scale * summed utility; 1 for each good token.
      noise_utility=0.3,  # Sd of the other content tokens' utilities (in units of the good token's).
      start_lambda=0.0,  # Warm start: pi ~ pi_ref exp(lambda r*/beta); 0 = the reference, 1 = pi*.
      start_steps=300,  # Adam steps of the exact warm-start fit.
      start_learning_rate=3e-3,  # Its learning rate.
  ))


@dataclasses.dataclass(frozen=True)
class RareTaskConfig:
  vocab_size: int
  prompt_len: int
  response_len: int
  beta: float
  world_seed: int
  good_prob: float
  topic_spread: float
  reward_scale: float
  noise_utility: float
  start_lambda: float
  start_steps: int
  start_learning_rate: float

  @classmethod
  def from_config(cls, config) -> 'RareTaskConfig':
    """Reads and validates config.task.rare (plus vocab_size, prompt_len, response_len, beta)."""
    if 'rare' not in config.task:
      raise ValueError("task.name='rare' needs a config.task.rare section: start from configs/rare.py.")
    given = dict(config.task.rare)
    allowed = set(default_fields().keys())
    unknown = sorted(set(given) - allowed)
    if unknown:
      raise ValueError(f'task.rare has unknown fields {unknown}; allowed: {sorted(allowed)}.')
    f = {**dict(default_fields()), **given}
    cfg = cls(vocab_size=int(config.task.vocab_size), prompt_len=int(config.task.prompt_len),
              response_len=int(config.task.response_len), beta=float(config.beta), **f)
    cfg.validate(int(config.model.vocab_size))
    return cfg

  @property
  def num_topics(self) -> int:
    return self.vocab_size - FIRST_CONTENT

  def good_probs(self) -> np.ndarray:
    return self.good_prob * self.topic_spread ** np.arange(self.num_topics)

  def validate(self, model_vocab: int) -> None:
    def need(ok, msg):
      if not ok:
        raise ValueError(msg)
    need(self.vocab_size >= 5, f'task.vocab_size={self.vocab_size}: the rare task needs >= 2 content '
         'tokens (vocab_size >= 5).')
    need(model_vocab == self.vocab_size, f'model.vocab_size={model_vocab} must equal task.vocab_size='
         f'{self.vocab_size}.')
    need(self.prompt_len >= 2, f'task.prompt_len={self.prompt_len} must be >= 2.')
    need(self.response_len >= 1, f'task.response_len={self.response_len} must be >= 1.')
    p = self.good_probs()
    need(bool(np.all((p > 0) & (p < 1))), f'task.rare.good_prob={self.good_prob} with topic_spread='
         f'{self.topic_spread} gives good-token probabilities {p.round(4).tolist()}; each must lie in (0, 1).')
    need(self.reward_scale > 0, f'task.rare.reward_scale={self.reward_scale} must be > 0.')
    need(self.noise_utility >= 0, f'task.rare.noise_utility={self.noise_utility} must be >= 0.')
    need(0 <= self.start_lambda <= 1, f'task.rare.start_lambda={self.start_lambda} must lie in [0, 1].')
    need(self.start_steps >= 0, f'task.rare.start_steps={self.start_steps} must be >= 0.')
    need(self.beta > 0, f'beta={self.beta} must be > 0.')


def utilities(cfg: RareTaskConfig) -> np.ndarray:
  """u [K, V]: 1 for each topic's good token, noise for the other content tokens, 0 for specials."""
  rs = np.random.RandomState(cfg.world_seed)
  u = np.zeros((cfg.num_topics, cfg.vocab_size))
  u[:, FIRST_CONTENT:] = cfg.noise_utility * rs.randn(cfg.num_topics, cfg.num_topics)
  u[np.arange(cfg.num_topics), FIRST_CONTENT + np.arange(cfg.num_topics)] = 1.0
  return u


def behaviour_token_logprobs(cfg: RareTaskConfig) -> np.ndarray:
  """[K, V] the behaviour's per-token distribution over content tokens, per topic."""
  k = cfg.num_topics
  p = np.zeros((k, cfg.vocab_size))
  good = cfg.good_probs()
  for t in range(k):
    p[t, FIRST_CONTENT:] = (1 - good[t]) / (k - 1)
    p[t, FIRST_CONTENT + t] = good[t]
  with np.errstate(divide='ignore'):
    return np.log(p)


def behaviour_logprobs(cfg: RareTaskConfig, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """log pi_behaviour(y | topic k) of enumerated responses (tokens, mask [E, R]), [K, E]."""
  tok = behaviour_token_logprobs(cfg)  # [K, V]
  content = mask & (tokens >= FIRST_CONTENT)
  per_token = np.where(content[None], tok[:, np.where(content, tokens, FIRST_CONTENT)], 0.0)
  return per_token.sum(-1) - np.log(cfg.response_len + 1)


def reward_table(cfg: RareTaskConfig, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """r*(k, y) of enumerated responses, [K, E]."""
  u = utilities(cfg)
  content = mask & (tokens >= FIRST_CONTENT)
  return cfg.reward_scale * np.where(content[None], u[:, tokens], 0.0).sum(-1)


def topic_prompts(cfg: RareTaskConfig, topics) -> jax.Array:
  """[n, P] prompts [BOS, g_k, ..., g_k]."""
  topics = jnp.asarray(topics, jnp.int32)
  body = jnp.broadcast_to((FIRST_CONTENT + topics)[:, None], (topics.shape[0], cfg.prompt_len - 1))
  return jnp.concatenate([jnp.full((topics.shape[0], 1), BOS, jnp.int32), body], axis=1)


def reward(cfg: RareTaskConfig, u: jax.Array, prompt_tokens: jax.Array, responses: jax.Array,
           mask: jax.Array) -> jax.Array:
  """r*(x, y) [n]: the topic is the prompt's last token."""
  topic = prompt_tokens[:, -1] - FIRST_CONTENT
  per_token = u[topic[:, None], responses]
  content = mask & (responses >= FIRST_CONTENT)
  return cfg.reward_scale * jnp.where(content, per_token, 0.0).sum(-1)


class RareTask:
  """The rare-reward world behind the Task protocol. Both prompt splits are endless streams of
  topics (prompt k of a split from fold_in(split key, k)); the held-out one follows world_seed."""

  reference_source = REFERENCE_SFT

  def __init__(self, cfg: RareTaskConfig, run_key: jax.Array, cache_dir: str = ''):
    self.cfg = cfg
    self.cache_dir = cache_dir  # Where the warm start is kept once fitted ('' = not kept).
    self.prompt_len, self.response_len = cfg.prompt_len, cfg.response_len
    self.pad_id, self.eos_ids, self.bos_id = PAD, (EOS,), BOS
    self._allowed = np.arange(cfg.vocab_size) >= EOS
    self._u = jnp.asarray(utilities(cfg), jnp.float32)
    self._behaviour = jnp.asarray(behaviour_token_logprobs(cfg), jnp.float32)
    self._keys = {TRAIN: jax.random.fold_in(run_key, _TRAIN_STREAM),
                  'eval': jax.random.fold_in(jax.random.key(cfg.world_seed), _EVAL_STREAM)}
    self._reward_fn = jax.jit(functools.partial(reward, cfg, self._u))

  @property
  def allowed_tokens(self) -> np.ndarray:
    return self._allowed

  def num_prompts(self, split: str) -> Optional[int]:
    return None

  def _topics(self, split: str, ids: np.ndarray) -> np.ndarray:
    if split not in self._keys:
      raise ValueError(f'split={split!r}; allowed: {list(SPLITS)}.')
    key = self._keys[split]
    draw = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, self.cfg.num_topics))
    return np.asarray(draw(jnp.asarray(ids, jnp.int32)))

  def prompts(self, split: str, index: int, n: int) -> PromptBatch:
    ids = np.arange(index * n, (index + 1) * n, dtype=np.int32)
    tokens = np.asarray(topic_prompts(self.cfg, self._topics(split, ids)))
    return PromptBatch(tokens, np.ones_like(tokens, bool), ids)

  def sft_batch(self, rng: jax.Array, n: int) -> tuple[PromptBatch, jax.Array, jax.Array]:
    """n behaviour demonstrations (prompts, responses [n, R], mask [n, R]); pure, for jit."""
    k_topic, k_len, k_tok = jax.random.split(rng, 3)
    r = self.cfg.response_len
    topics = jax.random.randint(k_topic, (n,), 0, self.cfg.num_topics)
    tokens = topic_prompts(self.cfg, topics)
    lengths = jax.random.randint(k_len, (n,), 0, r + 1)  # Content tokens; EOS follows when < R.
    drawn = jax.random.categorical(k_tok, self._behaviour[topics][:, None, :], shape=(n, r))
    t = jnp.arange(r)[None, :]
    responses = jnp.where(t < lengths[:, None], drawn, jnp.where(t == lengths[:, None], EOS, PAD))
    return PromptBatch(tokens, jnp.ones_like(tokens, bool)), responses.astype(jnp.int32), t <= lengths[:, None]

  def rewards(self, split: str, prompts: PromptBatch, responses: np.ndarray, mask: np.ndarray) -> np.ndarray:
    del split  # The topic is in the prompt.
    return np.asarray(self._reward_fn(jnp.asarray(prompts.tokens), jnp.asarray(responses), jnp.asarray(mask)))

  def describe(self, split: str, prompt_id: int) -> str:
    return self.describe_many(split, np.asarray([prompt_id]))[0]

  def describe_many(self, split: str, prompt_ids: np.ndarray) -> list[str]:
    tokens = np.asarray(topic_prompts(self.cfg, self._topics(split, np.asarray(prompt_ids))))
    return [' '.join(str(int(t)) for t in row) for row in tokens]

  def render_response(self, tokens: np.ndarray, mask: np.ndarray) -> str:
    return ' '.join(str(int(t)) for t, valid in zip(np.asarray(tokens), np.asarray(mask)) if valid)

  # --- the warm start ---
  def all_topic_prompts(self) -> PromptBatch:
    tokens = topic_prompts(self.cfg, np.arange(self.cfg.num_topics))
    return PromptBatch(tokens, jnp.ones_like(tokens, bool), jnp.arange(self.cfg.num_topics, dtype=jnp.int32))

  def initial_policy(self, model, ref_params, placement=None) -> dict:
    """The policy's start: ref_params fitted to pi_lambda ~ pi_ref exp(lambda r*/beta) (exact
    cross-entropy over every response of every topic); the reference itself when lambda = 0."""
    cfg = self.cfg
    if cfg.start_lambda == 0 or cfg.start_steps == 0:
      return ref_params
    cached = self._cached_start(ref_params)
    if cached is not None:
      params = cached
    else:
      params = self._fit_start(model, ref_params)
      self._save_start(params)
    if placement is not None:
      params = jax.device_put(params, placement.params)
    return params

  def _cache_path(self) -> str:
    if not self.cache_dir or '://' in self.cache_dir:
      return ''
    c = self.cfg
    key = f'{c.start_lambda:g}_{c.start_steps}_{c.start_learning_rate:g}_{c.reward_scale:g}_{c.beta:g}'
    return os.path.join(self.cache_dir, 'warm_start', key + '.npz')

  def _cached_start(self, ref_params) -> Optional[dict]:
    """The fitted start kept beside the reference it was fitted from (the fit is deterministic)."""
    path = self._cache_path()
    if not path or not os.path.exists(path):
      return None
    with np.load(path) as f:
      leaves = [f[f'leaf{i}'] for i in range(len(f.files))]
    ref_leaves, treedef = jax.tree.flatten(ref_params)
    if [x.shape for x in leaves] != [x.shape for x in ref_leaves]:
      return None
    return jax.tree.unflatten(treedef, [jnp.asarray(x, r.dtype) for x, r in zip(leaves, ref_leaves)])

  def _save_start(self, params) -> None:
    path = self._cache_path()
    if not path or jax.process_index() != 0:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, **{f'leaf{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
    os.replace(tmp, path)

  def _fit_start(self, model, ref_params) -> dict:
    cfg = self.cfg
    from pilaf_jax.model.scoring import response_logprobs
    from pilaf_jax.sampling.samplers import enumerate_responses
    tokens, mask = enumerate_responses(self._allowed, EOS, PAD, cfg.response_len)
    prompts = self.all_topic_prompts()
    k, e = cfg.num_topics, tokens.shape[0]
    pt, pm = jnp.repeat(prompts.tokens, e, 0), jnp.repeat(prompts.mask, e, 0)
    rt, rm = jnp.tile(jnp.asarray(tokens), (k, 1)), jnp.tile(jnp.asarray(mask), (k, 1))
    allowed = jnp.asarray(self._allowed)
    logp = lambda p: response_logprobs(model, p, pt, pm, rt, rm, allowed).sum(-1).reshape(k, e)
    r = self._reward_fn(pt, rt, rm).reshape(k, e)
    target = jax.nn.softmax(logp(ref_params) + cfg.start_lambda * r / cfg.beta, axis=-1)
    tx = optax.adam(cfg.start_learning_rate)

    @jax.jit
    def step(params, opt_state):
      loss, g = jax.value_and_grad(lambda p: -jnp.mean(jnp.sum(target * logp(p), -1)))(params)
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = ref_params, tx.init(ref_params)
    for _ in range(cfg.start_steps):
      params, opt_state, _ = step(params, opt_state)
    return params


def check_config(c) -> None:
  """The rare task's part of config validation: its own section, and an oracle it can serve."""
  check_trains_own_reference(c, 'rare')
  try:
    RareTaskConfig.from_config(c)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def build(config, run_key: jax.Array, placement=None, workdir: str = '') -> RareTask:
  """The task; its warm start is kept beside the run's reference (shared by a study's runs)."""
  del placement
  reference = config.sft.init_checkpoint if 'sft' in config and config.sft.init_checkpoint else (
      os.path.join(workdir, 'reference') if workdir else '')
  return RareTask(RareTaskConfig.from_config(config), run_key, reference)
