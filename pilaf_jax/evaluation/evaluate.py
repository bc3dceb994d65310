"""Held-out evaluation of a policy: mean oracle reward, KL(pi_theta || pi_ref) and J."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

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
  Prompts and sampling noise are the same at every evaluation (common random numbers), so
  successive rows differ by the policy, not the noise.
  """
  ctx: SamplerContext
  prompt_fn: Callable[[jax.Array], PromptBatch]  # rng -> one batch of held-out prompts (pure).
  reward_fn: Callable
  rng: jax.Array
  num_batches: int
  beta: float
  jit_kwargs: Optional[dict] = None  # Shardings (Experiment passes them).
  constrain: Callable = lambda tree: tree

  def __post_init__(self):
    ctx, reward_fn = self.ctx, self.reward_fn

    def score_batch(policy_params, ref_params, index):
      k_prompt, k_sample = jax.random.split(jax.random.fold_in(self.rng, index))
      prompts = self.prompt_fn(k_prompt)
      layout = RowLayout(policy_only=prompts.size)
      ro = ctx.decode(policy_params, ref_params, prompts, jnp.zeros((0,)), k_sample, layout)
      ref_lp = ctx.score(ctx.ref, ref_params, prompts, ro.tokens, ro.mask)
      kl = (ro.policy_logprobs - ref_lp).sum(-1)
      return self.constrain((reward_fn(prompts, ro.tokens, ro.mask), kl, ro.mask.sum(-1)))

    self._score_batch = jax.jit(score_batch, **(self.jit_kwargs or {}))

  def __call__(self, policy_params, ref_params, index_fn: Callable[[int], jax.Array] = jnp.int32) -> dict:
    results = [self._score_batch(policy_params, ref_params, index_fn(i)) for i in range(self.num_batches)]
    rewards, kls, lengths = (np.concatenate([np.asarray(r[j]) for r in jax.device_get(results)])
                             for j in range(3))
    se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))
    j_per_prompt = rewards - self.beta * kls
    return {'reward': float(rewards.mean()), 'reward_se': se(rewards), 'kl': float(kls.mean()),
            'kl_se': se(kls), 'J': float(j_per_prompt.mean()), 'J_se': se(j_per_prompt),
            'response_len': float(lengths.mean())}
