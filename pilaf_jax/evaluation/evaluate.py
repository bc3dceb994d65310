"""Held-out evaluation of a policy: mean oracle reward, KL(pi_theta || pi_ref) and J."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PromptBatch
from pilaf_jax.sampling.decode import RowLayout
from pilaf_jax.sampling.samplers import SamplerContext


@dataclasses.dataclass
class Evaluator:
  """Samples one policy response per held-out prompt and scores it.

  KL is estimated from the policy's own samples as the mean over prompts of the summed per-token
  log-ratio log pi_theta(y_t|.) - log pi_ref(y_t|.) (an unbiased estimate of the sequence-level KL).
  The same rng is used at every evaluation, so successive rows differ by the policy, not the noise.
  """
  ctx: SamplerContext
  prompts: PromptBatch  # All held-out prompts.
  reward_fn: Callable
  rng: jax.Array
  batch_size: int
  beta: float

  def __post_init__(self):
    ctx, reward_fn = self.ctx, self.reward_fn

    def score_batch(policy_params, ref_params, prompts, rng):
      layout = RowLayout(policy_only=prompts.size)
      ro = ctx.decode(policy_params, ref_params, prompts, jnp.zeros((0,)), rng, layout)
      ref_lp = ctx.score(ctx.ref, ref_params, prompts, ro.tokens, ro.mask)
      kl = (ro.policy_logprobs - ref_lp).sum(-1)
      return reward_fn(prompts, ro.tokens, ro.mask), kl, ro.mask.sum(-1)

    self._score_batch = jax.jit(score_batch)

  def __call__(self, policy_params, ref_params) -> dict:
    rewards, kls, lengths = [], [], []
    n = self.prompts.size
    for i, start in enumerate(range(0, n, self.batch_size)):
      chunk = self.prompts.take(slice(start, start + self.batch_size))
      r, kl, length = self._score_batch(policy_params, ref_params, chunk, jax.random.fold_in(self.rng, i))
      rewards.append(r), kls.append(kl), lengths.append(length)
    rewards, kls = np.concatenate(jax.device_get(rewards)), np.concatenate(jax.device_get(kls))
    se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))
    j_per_prompt = rewards - self.beta * kls
    return {'reward': float(rewards.mean()), 'reward_se': se(rewards), 'kl': float(kls.mean()),
            'kl_se': se(kls), 'J': float(j_per_prompt.mean()), 'J_se': se(j_per_prompt),
            'response_len': float(np.concatenate(jax.device_get(lengths)).mean())}
