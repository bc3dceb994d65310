"""The optimiser and the train state shared by SFT and DPO."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_optimizer(learning_rate: float, warmup_steps: int, weight_decay: float = 0.0,
                   max_grad_norm: float = 0.0) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant rate, optionally after global-norm clipping."""
  # Starts at learning_rate / warmup_steps, not 0, so that no step is wasted.
  schedule = optax.linear_schedule(learning_rate / max(warmup_steps, 1), learning_rate, max(warmup_steps, 1))
  adamw = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm else adamw


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))


@flax.struct.dataclass
class RunState:
  """The arrays a checkpoint restores; the loop position and the cumulative sampling cost
  (batches.CostTotals, host integers) live in its JSON meta."""
  train: TrainState
  labels_used: jax.Array  # Labelled pairs the learner has consumed.

  @classmethod
  def create(cls, train: TrainState) -> 'RunState':
    return cls(train=train, labels_used=jnp.zeros((), jnp.int32))
