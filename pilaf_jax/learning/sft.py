"""Supervised fine-tuning: the reference policy imitates the task's behaviour responses."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from pilaf_jax.batches import PromptBatch
from pilaf_jax.learning.train_state import TrainState
from pilaf_jax.model.llama import Llama
from pilaf_jax.model.scoring import response_logprobs


def sft_step(state: TrainState, prompts: PromptBatch, responses: jax.Array, response_mask: jax.Array,
             *, model: Llama, tx: optax.GradientTransformation,
             allowed_tokens: Optional[jax.Array] = None) -> tuple[TrainState, dict]:
  """One step of token-level cross-entropy on response tokens."""

  def loss_fn(params):
    lp = response_logprobs(model, params, prompts.tokens, prompts.mask, responses, response_mask,
                           allowed_tokens)
    return -lp.sum() / response_mask.sum()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), {'sft_loss': loss}
