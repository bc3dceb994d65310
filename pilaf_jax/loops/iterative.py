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
from pilaf_jax.batches import PreferenceBatch
from pilaf_jax.errors import ConfigError
from pilaf_jax.learning.train_state import RunState
from pilaf_jax.loops.loop import Round, Update, run_loop
from pilaf_jax.streams import SHUFFLE_STREAM


def _concat(batches: list[PreferenceBatch]) -> PreferenceBatch:
  """The round's batches as one dataset, without costs (the loop counted them batch by batch)."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *[b.replace(pairs=b.pairs.replace(cost=None))
                                                          for b in batches])


def _branch_point(exp, run: RunState, log=print):
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


class IterativeSchedule:
  """One round per iteration: every chunk of the iteration's prompts into the labelling queue (the
  policy fixed), a wait until every query is answered, then `epochs` shuffled passes over them. The
  prompt stream index is unique per (iteration, chunk)."""
  name, start = 'iterative', {'iteration': 0, 'epoch': 0, 'minibatch': 0}
  title = 'iterative DPO'

  def __init__(self, config, key):
    self.config, self.it, self.key, self.batch = config, config.iterative, key, config.dpo.batch_size
    self.chunks = self.it.prompts_per_iteration // self.batch
    self.total_steps = self.it.iterations * self.it.epochs * self.chunks

  def branch_point(self, exp, run, log):
    if not self.it.init_checkpoint:
      return None
    restored = _branch_point(exp, run, log)
    log(f'Branching from {self.it.init_checkpoint} at iteration {restored[2]["iteration"]}, '
        f'step {restored[0]}.')
    return restored

  def resume_line(self, position: dict, step: int, directory: str) -> str:
    return f'Resuming iterative DPO at {position}, step {step}.'

  def row(self, position: dict) -> dict:
    return {'iteration': position['iteration']}

  def rounds(self, position: dict, step: int, log):
    it, chunks, batch = self.it, self.chunks, self.batch
    for i in range(position['iteration'], it.iterations):
      sampler = it.first_iteration_sampler if (i == 0 and it.first_iteration_sampler) else self.config.sampler.name
      log(f'Iteration {i + 1}/{it.iterations}: sampling {chunks * batch} pairs ({sampler}), step {step}.')
      keys = [f'iteration{i:03d}/chunk{j:05d}' for j in range(chunks)]
      inside = i == position['iteration'] and (position['epoch'], position['minibatch']) != (0, 0)
      resume = position if i == position['iteration'] else self.start
      yield Round([(key, i * chunks + j, sampler) for j, key in enumerate(keys)], keys,
                  {'iteration': i, 'epoch': 0, 'minibatch': 0}, not inside,
                  lambda data, i=i, resume=resume: self._updates(i, _concat(data), resume))
      step += it.epochs * chunks - (resume['epoch'] * chunks + resume['minibatch'])

  def _updates(self, i: int, data: PreferenceBatch, resume: dict):
    epochs, chunks, batch = self.it.epochs, self.chunks, self.batch
    for e in range(resume['epoch'], epochs):
      order = jax.random.permutation(self.key(SHUFFLE_STREAM, i * 1_000_003 + e), chunks * batch)
      for k in range(resume['minibatch'] if e == resume['epoch'] else 0, chunks):
        last = e == epochs - 1 and k == chunks - 1
        position = ({'iteration': i + 1, 'epoch': 0, 'minibatch': 0} if last else
                    {'iteration': i, 'epoch': e + (k + 1) // chunks, 'minibatch': (k + 1) % chunks})
        yield Update(jax.tree.map(lambda x: x[order[k * batch:(k + 1) * batch]], data), position, last,
                     {'iteration': i + 1 if last else i})


def run_iterative(exp, log=print) -> list[dict]:
  """Runs (or resumes, or branches) iterative DPO; returns the evaluation rows of this run."""
  return run_loop(exp, IterativeSchedule(exp.config, exp.models.key), log)
