"""Oracles turn pairs into preference labels. Registry: bradley_terry, deterministic.

An oracle sees prompts and responses as the task's own tokens and returns only labels to the learner;
the rewards it computed are returned separately for analysis and never reach the update.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pilaf_jax.batches import PairBatch

# (prompts, responses [B, R], mask [B, R]) -> rewards [B]
RewardFn = Callable[..., jax.Array]
ORACLES: dict[str, Callable] = {}


def register_oracle(name: str):
  def wrap(fn):
    ORACLES[name] = fn
    return fn
  return wrap


def _rewards(reward_fn: RewardFn, pairs: PairBatch) -> jax.Array:
  """[B, 2] oracle rewards of both responses."""
  return jnp.stack([reward_fn(pairs.prompts, pairs.responses[:, i], pairs.response_mask[:, i])
                    for i in (0, 1)], axis=1)


@register_oracle('bradley_terry')
def bradley_terry(reward_fn: RewardFn, pairs: PairBatch, rng: jax.Array):
  """P(a beats b) = sigmoid(r*(x, a) - r*(x, b)), sampled. Returns (a_preferred [B], rewards [B, 2])."""
  r = _rewards(reward_fn, pairs)
  return jax.random.bernoulli(rng, jax.nn.sigmoid(r[:, 0] - r[:, 1])), r


@register_oracle('deterministic')
def deterministic(reward_fn: RewardFn, pairs: PairBatch, rng: jax.Array):
  """The higher reward wins; exact ties are broken by a fair coin."""
  r = _rewards(reward_fn, pairs)
  coin = jax.random.bernoulli(rng, 0.5, r[:, 0].shape)
  return jnp.where(r[:, 0] == r[:, 1], coin, r[:, 0] > r[:, 1]), r


def make_oracle(name: str, reward_fn: RewardFn) -> Callable:
  """fn(pairs, rng) -> (a_preferred [B], rewards [B, 2]); pure, jit it where it is used."""
  if name not in ORACLES:
    raise ValueError(f'oracle.name={name!r} is unknown; allowed: {sorted(ORACLES)}.')
  fn = ORACLES[name]
  return lambda pairs, rng: fn(reward_fn, pairs, rng)
