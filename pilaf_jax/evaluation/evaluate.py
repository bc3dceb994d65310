"""Held-out evaluation of a policy: mean oracle reward, KL(pi_theta || pi_ref) and J."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PromptBatch
from pilaf_jax.evaluation.gains import per_prompt_values
from pilaf_jax.parallel.placement import Placement, to_host
from pilaf_jax.sampling.decode import RowLayout
from pilaf_jax.sampling.samplers import SamplerContext
from pilaf_jax.tasks.base import EVAL


def eval_sample_batch(ctx: SamplerContext, placement: Placement, rng: jax.Array, policy_params, ref_params,
                      prompts: PromptBatch, index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One evaluation batch (the program Evaluator compiles): a policy response per prompt, and the
  per-prompt KL estimate from a teacher-forced reference pass. Returns (tokens, mask, kl)."""
  layout = RowLayout(policy_only=prompts.size)
  ro = ctx.decode(policy_params, ref_params, prompts, jnp.zeros((0,)), jax.random.fold_in(rng, index), layout)
  ref_lp = ctx.score(ctx.ref, ref_params, prompts, ro.tokens, ro.mask)
  kl = (ro.policy_logprobs - ref_lp).sum(-1)
  return placement.constrain_rows((ro.tokens, ro.mask, kl))


@dataclasses.dataclass
class Evaluator:
  """Samples one policy response per held-out prompt and scores it with the task's oracle reward.

  KL is estimated from the policy's own samples as the mean over prompts of the summed per-token
  log-ratio log pi_theta(y_t|.) - log pi_ref(y_t|.) (an unbiased estimate of the sequence-level KL).
  Prompts and sampling noise are the same at every evaluation (common random numbers), so
  successive rows differ by the policy, not the noise.
  """
  ctx: SamplerContext
  task: object  # The Task: its rewards(prompts, responses, mask) scores the responses.
  prompt_fn: Callable[[int], PromptBatch]  # batch index -> held-out prompts (a global array).
  rng: jax.Array
  num_batches: int
  beta: float
  placement: Placement
  show_responses: int = 0  # The first this many held-out (prompt, response, reward) go into the row.

  def __post_init__(self):
    self._sample_batch = jax.jit(
        functools.partial(eval_sample_batch, self.ctx, self.placement, self.rng),
        in_shardings=(self.placement.params, self.placement.params, None, self.placement.replicated))

  def __call__(self, policy_params, ref_params) -> dict:
    rewards, kls, lengths, shown = [], [], [], []
    for i in range(self.num_batches):
      prompts = self.prompt_fn(i)
      tokens, mask, kl = to_host(self._sample_batch(policy_params, ref_params, prompts, self.placement.scalar(i)))
      prompts = to_host(prompts)
      rewards.append(self.task.rewards(EVAL, prompts, tokens, mask))
      for j in range(min(self.show_responses - len(shown), len(tokens))):
        shown.append({'prompt': self.task.describe(EVAL, int(prompts.ids[j])),
                      'response': self.task.render_response(tokens[j], mask[j]), 'reward': float(rewards[-1][j])})
      kls.append(kl)
      lengths.append(mask.sum(-1))
    rewards, kls, lengths = (np.concatenate(x).astype(np.float64) for x in (rewards, kls, lengths))
    se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))
    j_per_prompt = rewards - self.beta * kls
    return {'reward': float(rewards.mean()), 'reward_se': se(rewards), 'kl': float(kls.mean()),
            'kl_se': se(kls), 'J': float(j_per_prompt.mean()), 'J_se': se(j_per_prompt),
            'response_len': float(lengths.mean()), **({'responses': shown} if shown else {}),
            # In prompt order (the same at every evaluation): gains.gain pairs two rows prompt by prompt.
            'per_prompt': {'reward': per_prompt_values(rewards), 'kl': per_prompt_values(kls)}}
