"""Iterative DPO (Xiong et al. 2024): each iteration samples and labels a dataset with the current
policy, then trains DPO on it for a few epochs with the reference fixed.

Position in the loop: (iteration, epoch, minibatch), saved in every checkpoint's meta. Sampling an
iteration's dataset needs no checkpoint of its own: every chunk is committed to the label store with
its queries as it is sampled (pending), the loop trains only once every query of the iteration is
answered, and the policy is fixed during sampling, so a resumed run re-reads the chunks it finds,
waits for their open queries and samples the rest from the same params.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pilaf_jax import checkpointing, paths
from pilaf_jax.batches import CostTotals, PreferenceBatch
from pilaf_jax.config_validation import ConfigError
from pilaf_jax.experiment import SHUFFLE_STREAM, Experiment
from pilaf_jax.learning.train_state import RunState
from pilaf_jax.loops.common import Preemption, evaluation_row, progress
from pilaf_jax.metrics_writer import MetricsWriter


def _concat(batches: list[PreferenceBatch]) -> PreferenceBatch:
  cost = batches[0].pairs.cost
  for b in batches[1:]:
    cost = cost + b.pairs.cost
  data = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[b.replace(pairs=b.pairs.replace(cost=None))
                                                          for b in batches])
  return data.replace(pairs=data.pairs.replace(cost=cost))


def _branch_point(exp: Experiment, run: RunState, log=print):
  """iterative.init_checkpoint: (step, run state, meta) of the checkpoint that ends iteration 1 of
  another run. Its directory is opened read-only: nothing there is ever changed."""
  directory = exp.config.iterative.init_checkpoint
  if not paths.isdir(directory):
    raise ConfigError(f'iterative.init_checkpoint={directory!r} is not a directory of checkpoints '
                      '(e.g. <workdir of a vanilla run>/checkpoints).')
  source = checkpointing.Checkpointer(directory, max_to_keep=1, every_steps=1, every_seconds=1e9,
                                      read_only=True)
  try:
    found = []
    for step in reversed(source.all_steps()):
      meta = source.read_meta(step, log)
      if meta is None:
        continue
      found.append(f'step {step}: iteration {meta.get("iteration")}, epoch {meta.get("epoch")}, '
                   f'minibatch {meta.get("minibatch")}')
      if (meta.get('loop') == 'iterative' and meta.get('iteration') == 1 and meta.get('epoch') == 0
          and meta.get('minibatch') == 0):
        state, meta = source.restore(step, run, log)
        return step, state, meta
  except checkpointing.RestoreError as e:
    raise ConfigError(f'iterative.init_checkpoint={directory!r}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  (an unreadable checkpoint: left as it is)
    raise ConfigError(f'iterative.init_checkpoint={directory!r}: the checkpoint that ends iteration 1 is '
                      f'unreadable ({type(e).__name__}); it was left as it is.') from None
  finally:
    source.close()
  raise ConfigError(f'iterative.init_checkpoint={directory!r} holds no readable iterative-DPO checkpoint '
                    'that ends iteration 1 (iteration 1, epoch 0, minibatch 0); found: '
                    + ('; '.join(found[:5]) or 'none') + '. Branch from a run with iterative.iterations=1.')


def run_iterative(exp: Experiment, log=print) -> list[dict]:
  c = exp.config
  it = c.iterative
  ref_params = exp.reference_params(log)
  run = exp.init_run_state(ref_params)
  restored = exp.checkpointer.restore_latest(run, log)
  position = {'iteration': 0, 'epoch': 0, 'minibatch': 0}
  step, cost = 0, CostTotals()
  fresh = restored is None
  if restored is None and it.init_checkpoint:
    restored = _branch_point(exp, run, log)
    log(f'Branching from {it.init_checkpoint} at iteration {restored[2]["iteration"]}, '
        f'step {restored[0]}.')
  if restored is not None:
    step, run, meta = restored
    position = {k: meta[k] for k in position}
    cost = CostTotals(meta.get('cost'))
    if not fresh or not it.init_checkpoint:
      log(f'Resuming iterative DPO at {position}, step {step}.')
  writer = MetricsWriter(exp.workdir, resume_step=step if not fresh else -1)
  rows = []

  def evaluate(iteration: int):
    row = evaluation_row(exp.evaluate, run.train.params, ref_params, run, cost, step, iteration=iteration)
    row.update(exp.phases.row())
    writer.write(row, step)
    writer.scalars(exp.phases.row(), step, prefix='time/')
    rows.append(row)

  if fresh:
    evaluate(position['iteration'])  # The starting policy, before any update of this run.
  batch = c.dpo.batch_size
  chunks = it.prompts_per_iteration // batch
  steps_per_epoch = chunks
  preemption = Preemption()
  bar = progress(it.iterations * it.epochs * steps_per_epoch, step, c.runtime.progress_bar,
                 'iterative DPO')
  try:
    for i in range(position['iteration'], it.iterations):
      sampler = it.first_iteration_sampler if (i == 0 and it.first_iteration_sampler) else c.sampler.name
      log(f'Iteration {i + 1}/{it.iterations}: sampling {chunks * batch} pairs ({sampler}), step {step}.')
      # Sampling (policy fixed): every chunk goes into the labelling queue first, then the loop waits
      # until every query of the iteration is answered. The prompt stream index is unique per
      # (iteration, chunk).
      keys = [f'iteration{i:03d}/chunk{j:05d}' for j in range(chunks)]
      for j, key in enumerate(keys):
        exp.enqueue_batch(key, i * chunks + j, step, sampler, run.train.params, ref_params, batch)
      data = []
      for key in keys:
        resolved = exp.resolved_batch(key, batch, should_stop=lambda: preemption.requested, log=log)
        if resolved is None:
          break
        data.append(resolved[0])
      if len(data) < chunks:  # SIGTERM while waiting: nothing of this iteration was trained yet.
        log(f'SIGTERM while waiting for the labels of iteration {i}: stopped at step {step} (the last '
            'checkpoint and the labelling queue hold everything); run the same command again to resume.')
        return rows
      data = _concat(data)
      start_epoch = position['epoch'] if i == position['iteration'] else 0
      resumed_inside = i == position['iteration'] and (position['epoch'], position['minibatch']) != (0, 0)
      if not resumed_inside:  # Bought now: every row from here on counts them (a checkpoint taken
        # inside this iteration holds them already).
        run = run.replace(labels_used=run.labels_used + chunks * batch)
        cost = cost.add(data.pairs.cost)
      for e in range(start_epoch, it.epochs):
        order = jax.random.permutation(exp._key(SHUFFLE_STREAM, i * 1_000_003 + e), chunks * batch)
        start_mb = position['minibatch'] if (i == position['iteration'] and e == start_epoch) else 0
        for k in range(start_mb, steps_per_epoch):
          minibatch = jax.tree.map(lambda x: x[order[k * batch:(k + 1) * batch]],
                                   data.replace(pairs=data.pairs.replace(cost=None)))
          train, metrics = exp.train(run.train, minibatch)
          run = run.replace(train=train)
          step += 1
          bar.update()
          if step % c.runtime.log_every_steps == 0:
            metrics = jax.device_get(metrics)
            writer.scalars(metrics, step)
            writer.scalars(exp.phases.row(), step, prefix='time/')
            bar.set_postfix(loss=f'{float(metrics["dpo_loss"]):.3f}')
          last = e == it.epochs - 1 and k == steps_per_epoch - 1
          if step % c.eval.every_steps == 0 or last:
            evaluate(i + 1 if last else i)
          if exp.checkpointer.due(step) or last or preemption.requested:
            meta = ({'iteration': i + 1, 'epoch': 0, 'minibatch': 0} if last else
                    {'iteration': i, 'epoch': e + (k + 1) // steps_per_epoch,
                     'minibatch': (k + 1) % steps_per_epoch})
            with exp.phases.phase('checkpoint'):
              exp.save_checkpoint(step, run, {'loop': 'iterative', **meta, 'cost': cost.as_dict()})
          if preemption.requested:
            exp.checkpointer.wait()
            log(f'SIGTERM: saved step {step}; run the same command again to resume.')
            return rows
  finally:
    bar.close()
    preemption.restore()
    writer.close()
  return rows
