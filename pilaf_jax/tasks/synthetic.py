"""The embedded synthetic preference task: a hidden world in which RLHF has something to learn.

- Prompts: a hidden topic k, then prompt tokens drawn from that topic's token distribution.
- Behaviour (what the reference is fine-tuned on): several hidden styles of varying quality; a
  response copies prompt tokens or draws from its style's topic distribution, then ends with EOS.
- Oracle: a hidden utility u[k, token]; r*(x, y) = scale * E_{k|x}[sum_t u[k, y_t]] / (n + 2), with n
  the response's content tokens. The oracle infers the topic from the prompt (posterior over k); the
  policy never sees u, k or r*: only preference labels.

The optimum piles probability on a few high-utility tokens per topic, far from the behaviour mixture,
so raising the reward costs KL: the trade-off J = reward - beta * KL is real.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PromptBatch
from pilaf_jax.errors import require
from pilaf_jax.tasks.base import EVAL, REFERENCE_SFT, SPLITS, TRAIN

PAD, BOS, EOS = 0, 1, 2
FIRST_CONTENT = 3
_LENGTH_SMOOTHING = 2.0


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
  world_seed: int
  vocab_size: int
  prompt_len: int
  response_len: int
  num_topics: int
  num_styles: int
  copy_prob: float
  reward_scale: float

  @classmethod
  def from_config(cls, task_cfg) -> 'SyntheticTaskConfig':
    """From config.task: its shared fields (vocab_size, prompt_len, response_len) and task.synthetic."""
    values = {**dict(task_cfg), **dict(task_cfg.synthetic)}
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def check_config(c) -> None:
  """The synthetic task's part of config validation (task.synthetic and what it implies)."""
  s = c.task.synthetic
  require(c.task.vocab_size >= 4, f'task.vocab_size={c.task.vocab_size} must be >= 4 '
          '(PAD, BOS, EOS and at least one content token).')
  require(c.model.vocab_size == c.task.vocab_size,
          f'model.vocab_size={c.model.vocab_size} must equal task.vocab_size={c.task.vocab_size}.')
  check_trains_own_reference(c, 'synthetic')
  for name in ('num_topics', 'num_styles'):
    require(isinstance(s[name], int) and s[name] >= 1, f'task.synthetic.{name}={s[name]!r} must be an integer >= 1.')
  require(0.0 <= s.copy_prob <= 1.0, f'task.synthetic.copy_prob={s.copy_prob} must lie in [0, 1].')



def check_trains_own_reference(c, name: str) -> None:
  """For a task whose oracle is its hidden reward and whose reference is trained here."""
  require(c.oracle.reward in ('task', 'human'), f"oracle.reward={c.oracle.reward!r}: the {name} "
          "task's oracle is its hidden reward; use oracle.reward='task', or 'human' for people "
          '(reward models and judges read text).')
  require(not c.model.checkpoint, f'model.checkpoint={c.model.checkpoint!r}: the {name} task '
          "trains its own reference; pretrained checkpoints need task.name='chat'.")

@flax.struct.dataclass
class SyntheticWorld:
  """The hidden tables. Arrays are pytree leaves; the config is static."""
  topic_logprobs: jax.Array  # [K, V] prompt-token distribution per topic (content tokens only).
  style_logprobs: jax.Array  # [S, K, V] behaviour response-token distribution.
  utility: jax.Array  # [K, V] hidden per-topic utility of each token (0 for specials).
  cfg: SyntheticTaskConfig = flax.struct.field(pytree_node=False)

  @property
  def allowed_response_tokens(self) -> jax.Array:
    """[V] bool: content tokens and EOS (never PAD or BOS)."""
    return jnp.arange(self.cfg.vocab_size) >= EOS


def make_world(cfg: SyntheticTaskConfig) -> SyntheticWorld:
  """Draws the hidden tables from cfg.world_seed (numpy, so the world never depends on jax's PRNG)."""
  rs = np.random.RandomState(cfg.world_seed)
  k, s, v = cfg.num_topics, cfg.num_styles, cfg.vocab_size
  content = np.arange(v) >= FIRST_CONTENT

  def log_normalise(logits):
    logits = np.where(content, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))

  topic_logprobs = log_normalise(2.5 * rs.randn(k, v))
  utility = np.where(content, rs.randn(k, v), 0.0)
  # Styles range from anti-aligned to well aligned with the utility, so the behaviour mixture is
  # diverse and the reward has room to grow.
  alignment = np.linspace(-0.5, 1.5, s)
  style_logits = alignment[:, None, None] * utility[None] + 1.0 * rs.randn(s, k, v) \
      + 0.5 * topic_logprobs.clip(-20)[None]
  style_logprobs = log_normalise(style_logits)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return SyntheticWorld(f32(topic_logprobs), f32(style_logprobs), f32(utility), cfg)


def sample_prompts(world: SyntheticWorld, rng: jax.Array, n: int) -> tuple[PromptBatch, jax.Array]:
  """n prompts [BOS, t_1 .. t_{P-1}] (no padding) and their hidden topics [n]."""
  k_topic, k_tok = jax.random.split(rng)
  topics = jax.random.randint(k_topic, (n,), 0, world.cfg.num_topics)
  tokens = jax.random.categorical(k_tok, world.topic_logprobs[topics][:, None, :],
                                  shape=(n, world.cfg.prompt_len - 1))
  tokens = jnp.concatenate([jnp.full((n, 1), BOS), tokens], axis=1).astype(jnp.int32)
  return PromptBatch(tokens, jnp.ones_like(tokens, bool)), topics


def sample_behaviour(world: SyntheticWorld, rng: jax.Array, prompts: PromptBatch,
                     topics: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Responses of the hidden behaviour policy: (tokens [n, R], mask [n, R]); always end with EOS."""
  cfg = world.cfg
  n, r = prompts.size, cfg.response_len
  k_style, k_len, k_copy, k_pos, k_tok = jax.random.split(rng, 5)
  styles = jax.random.randint(k_style, (n,), 0, cfg.num_styles)
  lengths = jax.random.randint(k_len, (n,), 2, r)  # Content tokens, 2..R-1, then EOS.
  copy = jax.random.bernoulli(k_copy, cfg.copy_prob, (n, r))
  copy_pos = jax.random.randint(k_pos, (n, r), 1, cfg.prompt_len)
  copied = jnp.take_along_axis(prompts.tokens, copy_pos, axis=1)
  drawn = jax.random.categorical(k_tok, world.style_logprobs[styles, topics][:, None, :], shape=(n, r))
  tokens = jnp.where(copy, copied, drawn)
  t = jnp.arange(r)[None, :]
  tokens = jnp.where(t < lengths[:, None], tokens, jnp.where(t == lengths[:, None], EOS, PAD))
  return tokens.astype(jnp.int32), t <= lengths[:, None]


def topic_posterior(world: SyntheticWorld, prompts: PromptBatch) -> jax.Array:
  """p(k | x) under a uniform prior, [n, K]."""
  lp = world.topic_logprobs[:, prompts.tokens]  # [K, n, P]
  content = (prompts.tokens >= FIRST_CONTENT) & prompts.mask
  loglik = jnp.where(content[None], lp, 0.0).sum(-1)  # [K, n]
  return jax.nn.softmax(loglik.T, axis=-1)


def oracle_reward(world: SyntheticWorld, prompts: PromptBatch, responses: jax.Array,
                  response_mask: jax.Array) -> jax.Array:
  """The hidden reward r*(x, y), [n]. responses: [n, R]."""
  posterior = topic_posterior(world, prompts)  # [n, K]
  token_utility = jnp.einsum('nk,knr->nr', posterior, world.utility[:, responses])
  content = response_mask & (responses >= FIRST_CONTENT)
  total = jnp.where(content, token_utility, 0.0).sum(-1)
  return world.cfg.reward_scale * total / (content.sum(-1) + _LENGTH_SMOOTHING)


_TRAIN_PROMPT_STREAM, _EVAL_PROMPT_STREAM = 0x7A5C0, 0x7A5C1  # Distinct from experiment.py's streams.


def prompts_by_id(world: SyntheticWorld, stream_key: jax.Array, ids: jax.Array) -> PromptBatch:
  """The prompts with these ids: prompt k is drawn from fold_in(stream_key, k) alone, so a prompt
  is the same whatever batch it is drawn in."""
  def one(prompt_id):
    k_topic, k_tok = jax.random.split(jax.random.fold_in(stream_key, prompt_id))
    topic = jax.random.randint(k_topic, (), 0, world.cfg.num_topics)
    tokens = jax.random.categorical(k_tok, world.topic_logprobs[topic], shape=(world.cfg.prompt_len - 1,))
    return jnp.concatenate([jnp.full((1,), BOS), tokens]).astype(jnp.int32)
  tokens = jax.vmap(one)(ids)
  return PromptBatch(tokens, jnp.ones_like(tokens, bool), ids.astype(jnp.int32))


class SyntheticTask:
  """The synthetic world behind the Task protocol.

  Prompts are generated, not read, so both splits are endless: prompt k of a split is drawn from
  fold_in(split key, k). The train stream follows the run's seed; the held-out stream follows only
  the world, so every seed of a study is evaluated on the same prompts (as with a real test split).
  Batch `index` of n holds the prompts index * n .. index * n + n - 1.
  """

  reference_source = REFERENCE_SFT

  def __init__(self, cfg: SyntheticTaskConfig, run_key: jax.Array):
    self.world = make_world(cfg)
    self.cfg = cfg
    self.prompt_len, self.response_len = cfg.prompt_len, cfg.response_len
    self.pad_id, self.eos_ids, self.bos_id = PAD, (EOS,), BOS
    self._split_keys = {TRAIN: jax.random.fold_in(run_key, _TRAIN_PROMPT_STREAM),
                        EVAL: jax.random.fold_in(jax.random.key(cfg.world_seed), _EVAL_PROMPT_STREAM)}
    self._allowed = np.asarray(self.world.allowed_response_tokens)
    self._prompt_fn = jax.jit(functools.partial(prompts_by_id, self.world))
    self._reward_fn = jax.jit(functools.partial(oracle_reward, self.world))

  @property
  def allowed_tokens(self) -> np.ndarray:
    return self._allowed

  def num_prompts(self, split: str) -> Optional[int]:
    return None

  def _key(self, split: str) -> jax.Array:
    if split not in self._split_keys:
      raise ValueError(f'split={split!r}; allowed: {list(SPLITS)}.')
    return self._split_keys[split]

  def prompts(self, split: str, index: int, n: int) -> PromptBatch:
    ids = np.arange(index * n, (index + 1) * n, dtype=np.int32)
    return jax.tree.map(np.asarray, self._prompt_fn(self._key(split), ids))

  def sft_batch(self, rng: jax.Array, n: int) -> tuple[PromptBatch, jax.Array, jax.Array]:
    """n behaviour demonstrations (prompts, responses [n, R], mask [n, R]); pure, for jit."""
    k_prompt, k_resp = jax.random.split(rng)
    prompts, topics = sample_prompts(self.world, k_prompt, n)
    responses, mask = sample_behaviour(self.world, k_resp, prompts, topics)
    return prompts, responses, mask

  def rewards(self, split: str, prompts: PromptBatch, responses: np.ndarray, mask: np.ndarray) -> np.ndarray:
    del split  # The hidden reward reads the prompt's tokens.
    return np.asarray(self._reward_fn(PromptBatch(prompts.tokens, prompts.mask), responses, mask))

  def describe(self, split: str, prompt_id: int) -> str:
    tokens = self._prompt_fn(self._key(split), np.asarray([prompt_id], np.int32)).tokens[0]
    return ' '.join(str(int(t)) for t in np.asarray(tokens))

  def describe_many(self, split: str, prompt_ids: np.ndarray) -> list[str]:
    """describe() of many prompts in one call (the labelling queue asks for a batch at a time)."""
    tokens = np.asarray(self._prompt_fn(self._key(split), np.asarray(prompt_ids, np.int32)).tokens)
    return [' '.join(str(int(t)) for t in row) for row in tokens]

  def render_response(self, tokens: np.ndarray, mask: np.ndarray) -> str:
    """The response's token ids, space-separated as in describe(), up to and including EOS."""
    return ' '.join(str(int(t)) for t, valid in zip(np.asarray(tokens), np.asarray(mask)) if valid)
