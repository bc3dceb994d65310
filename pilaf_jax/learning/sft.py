"""Supervised fine-tuning: the reference policy imitates the task's behaviour responses (for tasks
whose reference is trained here, like the synthetic one; real tasks load theirs)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pilaf_jax.batches import PromptBatch
from pilaf_jax.learning.train_state import TrainState, init_train_state, make_optimizer
from pilaf_jax.model.llama import Llama, init_params
from pilaf_jax.model.scoring import response_logprobs
from pilaf_jax.streams import INIT_STREAM, SFT_STREAM


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


PROGRESS_SECONDS = 10.0  # At most one SFT progress line this often (none for an SFT this quick).


def train_reference(task, model: Llama, placement, sft_cfg, key: Callable[[int, int], jax.Array],
                    log: Callable[[str], None] = print) -> dict:
  """Fine-tunes a fresh model on the task's behaviour demonstrations (task.sft_batch); returns params.

  sft_cfg: learning_rate, warmup_steps, weight_decay, batch_size, steps (config.sft). key(stream, i)
  gives the run's random keys (INIT_STREAM for the init, SFT_STREAM per step). placement: the run's
  (shards the state and pins the rows), or None for plain jit on the default device.
  """
  c = sft_cfg
  tx = make_optimizer(c.learning_rate, c.warmup_steps, c.weight_decay)
  state_sharding = placement.train_state(tx) if placement else None
  replicated = placement.replicated if placement else None
  init = jax.jit(lambda rng: init_train_state(init_params(model.cfg, rng), tx),
                 in_shardings=(replicated,), out_shardings=state_sharding)
  state = init(key(INIT_STREAM, 0))
  allowed = None if task.allowed_tokens is None else jnp.asarray(task.allowed_tokens)

  def step(state, index):
    prompts, responses, mask = task.sft_batch(key(SFT_STREAM, index), c.batch_size)
    rows = placement.constrain_rows if placement else (lambda x: x)
    return sft_step(state, rows(prompts), rows(responses), rows(mask), model=model, tx=tx,
                    allowed_tokens=allowed)
  step = jax.jit(step, in_shardings=(state_sharding, replicated), out_shardings=(state_sharding, replicated),
                 donate_argnums=0)

  start, losses = time.time(), []
  last_line = start
  for i in range(c.steps):
    state, metrics = step(state, placement.scalar(i) if placement else i)
    losses.append(metrics['sft_loss'])
    if time.time() - last_line >= PROGRESS_SECONDS and i + 1 < c.steps:  # A slow SFT is not silent.
      last_line = time.time()
      log(f'  SFT step {i + 1}/{c.steps}, loss {float(losses[-1]):.3f}, {last_line - start:.0f} s')
  if losses:
    losses = np.asarray(jax.device_get(losses))
    log(f'Reference policy: SFT on behaviour responses, {c.steps} steps in {time.time() - start:.1f} s, '
        f'loss {float(np.mean(losses[:10])):.3f} -> {float(np.mean(losses[-10:])):.3f}.')
  return state.params
