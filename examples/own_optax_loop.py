"""Online DPO with PILAF pairs in your own optax loop, through pilaf_jax's public API only.

  python examples/own_optax_loop.py [--sampler=pilaf] [--steps=40] [--seed=0]

The synthetic task stands in for your prompts and your labeller (Bradley-Terry answers from a
hidden reward the learner never sees); the loop, the optimiser and the update are yours.
"""
import argparse

import jax
import numpy as np
import optax

import pilaf_jax as pj


def held_out_reward(problem, sample, params):
  """Mean hidden reward of policy samples on 512 held-out prompts, and its standard error."""
  pairs = sample(params, problem.ref_params, problem.prompts(0, 512, split='eval'), jax.random.key(7))
  per_prompt = problem.rewards(pairs).mean(1)  # A vanilla pair is two policy samples per prompt.
  return per_prompt.mean(), per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))


def main(sampler='pilaf', steps=40, batch=32, beta=0.1, learning_rate=1e-3, seed=0):
  problem = pj.synthetic_problem(seed)  # Hidden world, a small Llama, its SFT reference.
  model, ref_params = problem.model, problem.ref_params
  sample = pj.make_pair_sampler(model, model, sampler=sampler, beta=beta, **problem.sampling)
  policy_samples = pj.make_pair_sampler(model, model, sampler='vanilla', beta=beta, **problem.sampling)
  tx = optax.adam(learning_rate)

  @jax.jit
  def update(params, opt_state, labelled):
    loss = lambda p: pj.dpo_batch_loss(model, p, labelled, beta=beta,
                                       allowed_tokens=problem.sampling['allowed_tokens'])
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  params, opt_state = ref_params, tx.init(ref_params)
  before = held_out_reward(problem, policy_samples, params)
  for t in range(steps):
    k_sample, k_label = jax.random.split(jax.random.fold_in(jax.random.key(seed), t))
    pairs = sample(params, ref_params, problem.prompts(t, batch), k_sample)
    params, opt_state, metrics = update(params, opt_state, problem.label(pairs, k_label))
  after = held_out_reward(problem, policy_samples, params)
  gain_se = (after[0] - before[0]) / np.hypot(before[1], after[1])
  print(f'{sampler}: {steps} steps x {batch} pairs, final DPO loss {float(metrics["dpo_loss"]):.3f}')
  print(f'held-out reward: {before[0]:.3f} ± {before[1]:.3f} -> {after[0]:.3f} ± {after[1]:.3f}'
        f' (gain {after[0] - before[0]:+.3f} = {gain_se:.1f} SE)')
  return dict(before=before, after=after, gain_se=float(gain_se))


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sampler', default='pilaf', choices=pj.available_samplers())
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  main(args.sampler, args.steps, seed=args.seed)
