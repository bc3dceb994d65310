"""Labelling rules turn the oracle's rewards of a pair into a preference label.

Registry: bradley_terry (P(a beats b) = sigmoid(r_a - r_b), sampled), deterministic (the higher
reward wins). The rewards themselves come from the task (its hidden reward, a reward model, a
judge); only the labels reach the learner, the rewards are stored for analysis.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pilaf_jax.registry import lookup, registrar

# (rewards [B, 2], rng) -> a_preferred [B] bool
LabelRule = Callable[[jax.Array, jax.Array], jax.Array]
LABEL_RULES: dict[str, LabelRule] = {}
ORACLES = LABEL_RULES  # The former name, for one release.
register_label_rule = registrar(LABEL_RULES)
register_oracle = register_label_rule  # The former name, for one release.


@register_label_rule('bradley_terry')
def bradley_terry(rewards: jax.Array, rng: jax.Array) -> jax.Array:
  """P(a beats b) = sigmoid(r*(x, a) - r*(x, b)), sampled."""
  rewards = jnp.asarray(rewards, jnp.float32)
  return jax.random.bernoulli(rng, jax.nn.sigmoid(rewards[:, 0] - rewards[:, 1]))


@register_label_rule('deterministic')
def deterministic(rewards: jax.Array, rng: jax.Array) -> jax.Array:
  """The higher reward wins; exact ties are broken by a fair coin."""
  rewards = jnp.asarray(rewards, jnp.float32)
  coin = jax.random.bernoulli(rng, 0.5, rewards[:, 0].shape)
  return jnp.where(rewards[:, 0] == rewards[:, 1], coin, rewards[:, 0] > rewards[:, 1])


def make_label_rule(name: str) -> LabelRule:
  """fn(rewards [B, 2], rng) -> a_preferred [B]; pure, jit it where it is used."""
  return lookup(LABEL_RULES, name, 'oracle.label_rule')
