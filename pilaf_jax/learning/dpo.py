"""The DPO loss and update step (Rafailov et al. 2023)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from pilaf_jax.batches import PreferenceBatch
from pilaf_jax.learning.train_state import TrainState
from pilaf_jax.model.llama import Llama
from pilaf_jax.model.scoring import response_logprobs


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float) -> tuple[jax.Array, dict]:
  """Mean of -log sigmoid(beta * [(pc - rc) - (pr - rr)]) over sequence log-probs [B].

  Returns (loss, metrics); the implicit rewards are beta * (policy - ref).
  """
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  margin = chosen_reward - rejected_reward
  loss = -jax.nn.log_sigmoid(margin).mean()
  return loss, {'dpo_loss': loss, 'implicit_margin': margin.mean(),
                'implicit_accuracy': (margin > 0).mean(), 'chosen_reward': chosen_reward.mean(),
                'rejected_reward': rejected_reward.mean()}


def preference_loss(model: Llama, params, batch: PreferenceBatch, beta: float,
                    allowed_tokens: Optional[jax.Array] = None,
                    constrain_rows: Optional[Callable[[Any], Any]] = None) -> tuple[jax.Array, dict]:
  """The DPO loss of labelled pairs under `params`, and its metrics (differentiable in params).

  Policy log-probs of both responses of every pair come from one forward pass ([B, 2, R] -> [2B, R]);
  reference log-probs come from the batch (computed at sampling time): the reference never runs here.

  constrain_rows: inside jit on a mesh, pins the [2B, ...] rows of the forward pass to the batch
  axes (e.g. Placement.constrain_rows). Without it XLA cannot split the rows that the [B, 2] ->
  [2B] transpose makes, and every chip computes every row's logits (measured on v5p-32: 67 GB of
  float32 logits per chip for a 1-layer model).
  """
  pairs = batch.pairs
  b, _, r = pairs.responses.shape
  ref_chosen, ref_rejected = batch.chosen_rejected(pairs.ref_logprobs.sum(-1))
  constrain = constrain_rows or (lambda x: x)
  prompts = pairs.prompts.repeat(2)  # Responses a, then responses b.
  tokens = pairs.responses.transpose(1, 0, 2).reshape(2 * b, r)
  mask = pairs.response_mask.transpose(1, 0, 2).reshape(2 * b, r)
  prompt_tokens, prompt_mask, tokens, mask = constrain((prompts.tokens, prompts.mask, tokens, mask))
  lp = response_logprobs(model, params, prompt_tokens, prompt_mask, tokens, mask, allowed_tokens,
                         constrain_rows)
  policy_chosen, policy_rejected = batch.chosen_rejected(lp.sum(-1).reshape(2, b).T)
  return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def dpo_step(state: TrainState, batch: PreferenceBatch, *, model: Llama, tx: optax.GradientTransformation,
             beta: float, allowed_tokens: Optional[jax.Array] = None,
             constrain_rows: Optional[Callable[[Any], Any]] = None) -> tuple[TrainState, dict]:
  """One optimiser step on a batch of labelled pairs: the gradient of preference_loss (the policy
  runs alone; see there for constrain_rows)."""
  loss_fn = lambda params: preference_loss(model, params, batch, beta, allowed_tokens, constrain_rows)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.tree.norm(grads)
  return TrainState(state.step + 1, params, opt_state), metrics
