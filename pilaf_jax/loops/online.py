"""Online DPO (Guo et al. 2024): at every step, sample pairs from the current policy, label, update.

Labels come through the labelling queue: with labelling.max_staleness = s > 0 the loop keeps s
batches enqueued ahead, so oracles (an external worker, people) label while it trains, and step t
trains on the batch sampled at step max(t - s, 0). s = 0 is fully synchronous.
"""
from __future__ import annotations

import jax

from pilaf_jax.batches import CostTotals
from pilaf_jax.experiment import Experiment
from pilaf_jax.learning.train_state import RunState
from pilaf_jax.loops.common import Preemption, evaluation_row, progress
from pilaf_jax.metrics_writer import MetricsWriter


def run_online(exp: Experiment, log=print) -> list[dict]:
  """Runs (or resumes) the online loop; returns the evaluation rows of this run."""
  c = exp.config
  ref_params = exp.reference_params(log)
  run = exp.init_run_state(ref_params)
  restored = exp.checkpointer.restore_latest(run, log)
  start, cost = 0, CostTotals()
  if restored is not None:
    start, run, meta = restored
    cost = CostTotals(meta.get('cost'))
    log(f'Resuming the online loop at step {start} from {exp.checkpointer.directory}.')
  writer = MetricsWriter(exp.workdir, resume_step=start if restored else -1)
  rows = []

  def evaluate(step: int):
    row = evaluation_row(exp.evaluate, run.train.params, ref_params, run, cost, step)
    row.update(exp.phases.row())
    writer.write(row, step)
    rows.append(row)

  if restored is None:
    evaluate(0)  # The reference policy, before any update.
  preemption = Preemption()
  bar = progress(c.online.steps, start, c.runtime.progress_bar, f'online DPO ({c.sampler.name})')
  batch, ahead = c.dpo.batch_size, c.labelling.max_staleness
  try:
    for t in range(start, c.online.steps):
      # Batches t .. t + max_staleness are in the labelling queue, the newest sampled now (from the
      # policy of step t); step t trains on batch t once all its queries are answered. A resumed run
      # finds the earlier ones in the store (they were enqueued before its checkpoint was saved).
      for j in range(t, min(t + ahead, c.online.steps - 1) + 1):
        exp.enqueue_batch(f'online/{j:06d}', j, t, c.sampler.name, run.train.params, ref_params, batch)
      resolved = exp.resolved_batch(f'online/{t:06d}', batch, should_stop=lambda: preemption.requested,
                                    log=log)
      if resolved is None:  # SIGTERM while waiting for labels: save step t (below) and stop.
        preemption.requested, step = True, t
      else:
        labelled = resolved[0]
        train, metrics = exp.train(run.train, labelled)
        run = RunState(train=train, labels_used=run.labels_used + batch)
        cost = cost.add(labelled.pairs.cost)
        step = t + 1
        bar.update()
        if step % c.runtime.log_every_steps == 0:
          metrics = jax.device_get(metrics)
          writer.scalars(metrics, step)
          writer.scalars(exp.phases.row(), step, prefix='time/')
          bar.set_postfix(loss=f'{float(metrics["dpo_loss"]):.3f}')
        if step % c.eval.every_steps == 0 or step == c.online.steps:
          evaluate(step)
      if exp.checkpointer.due(step) or step == c.online.steps or preemption.requested:
        with exp.phases.phase('checkpoint'):
          exp.save_checkpoint(step, run, {'loop': 'online', 'step': step, 'cost': cost.as_dict()})
      if preemption.requested:
        exp.checkpointer.wait()
        log(f'SIGTERM: saved step {step}; run the same command again to resume.')
        break
  finally:
    bar.close()
    preemption.restore()
    writer.close()
  return rows
