"""The training loop, written once: sample -> label -> train -> evaluate -> checkpoint, with restore,
preemption and timing. A schedule (loops/online.py, loops/iterative.py) says which batches to draw,
when to train on them, and where a round (an online step, an iteration) ends.

Position: each checkpoint's meta holds the schedule's position after its step ({'step'} online;
{'iteration', 'epoch', 'minibatch'} iterative), the labels bought (in the run state) and the cost so far.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Callable, Iterator, Optional

import jax

from pilaf_jax.batches import CostTotals, PreferenceBatch
from pilaf_jax.learning.train_state import RunState


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps: save, then exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def evaluation_row(evaluate, policy_params, ref_params, run: RunState, cost: CostTotals, step: int,
                   **extra) -> dict:
  """One metrics.jsonl row: the policy's evaluation plus labels and compute spent so far."""
  cost = cost.as_dict()
  useful = ['oracle_responses'] + [f'{m}_{kind}_tokens' for kind in ('decode', 'scoring') for m in ('policy', 'ref')]
  # What actually ran (padding and finished rows included), beside the useful counts.
  executed = [f'{m}_{kind}_tokens_executed' for m in ('policy', 'ref') for kind in ('decode', 'scoring')]
  sequences = cost['policy_decode_sequences'] + cost['ref_decode_sequences']
  return {'step': step, **extra, 'labels_used': int(run.labels_used), **evaluate(policy_params, ref_params),
          **{k: cost[k] for k in useful + executed},
          'decode_sequences_per_pair': sequences / cost['pairs'] if cost['pairs'] else 0.0}


def progress(total: int, initial: int, enabled: bool, desc: str):
  """A tqdm bar on process 0 when enabled (a disabled bar, with the same interface, otherwise)."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
              disable=not (enabled and jax.process_index() == 0))


@dataclasses.dataclass
class Update:
  """One DPO step of a round."""
  batch: PreferenceBatch
  position: dict  # The schedule's position after this step (saved in its checkpoint).
  last: bool  # Ends what must be evaluated and saved whatever the intervals (a run, an iteration).
  row: dict  # Extra fields of an evaluation row taken after it.


@dataclasses.dataclass
class Round:
  """Batches drawn from the current policy, then the updates trained on the ones waited for."""
  draws: list  # (batch key, prompt and sampler index, sampler name), enqueued in order.
  waits: list  # Batch keys the updates train on, resolved in order.
  start: dict  # The position before any update of the round (saved on SIGTERM while waiting).
  buys: bool  # Count the round's labels and cost now (False: a checkpoint inside the round holds them).
  updates: Callable[[list], Iterator[Update]]


def run_loop(exp, schedule, log: Callable[[str], None] = print,
             measure: Optional[Callable[[int, object, dict], None]] = None) -> list[dict]:
  """Runs (or resumes) the schedule on exp (an Experiment); returns this run's evaluation rows.

  measure(step, run_state, ref_params), when given, runs at every evaluation point (the theory lab).
  """
  c, n = exp.config, exp.config.dpo.batch_size
  ref_params = exp.models.reference_params(log)
  run = exp.models.init_run_state(ref_params)
  restored = exp.checkpointer.restore_latest(run, log)
  fresh = restored is None
  if fresh:
    restored = schedule.branch_point(exp, run, log)  # None unless it starts from another run's checkpoint.
  step, cost, position = 0, CostTotals(), dict(schedule.start)
  if restored is not None:
    step, run, meta = restored
    position, cost = {k: meta[k] for k in schedule.start}, CostTotals(meta.get('cost'))
    if not fresh:
      log(schedule.resume_line(position, step, exp.checkpointer.directory))
  writer = exp.files.metrics_writer(resume_step=-1 if fresh else step)
  rows = []

  def evaluate(extra: dict) -> None:
    row = evaluation_row(exp.evaluate, run.train.params, ref_params, run, cost, step, **extra)
    row.update(exp.phases.row())
    writer.write(row, step)
    writer.scalars(exp.phases.row(), step, prefix='time/')
    rows.append(row)
    if measure is not None:
      measure(step, run, ref_params)

  if fresh:
    evaluate(schedule.row(position))  # The starting policy, before any update of this run.
  preemption = Preemption()
  stop = lambda: preemption.requested
  bar = progress(schedule.total_steps, step, c.runtime.progress_bar, schedule.title)
  try:
    for rnd in schedule.rounds(position, step, log):
      for key, index, sampler in rnd.draws:
        exp.enqueue_batch(key, index, step, sampler, run.train.params, ref_params, n)
      data = []
      for key in rnd.waits:
        resolved = exp.resolved_batch(key, n, should_stop=stop, log=log)
        if resolved is None:  # SIGTERM while waiting for labels: nothing of this round was trained.
          break
        data.append(resolved[0])
      if len(data) < len(rnd.waits):
        exp.save_checkpoint(step, run, {'loop': schedule.name, **rnd.start, 'cost': cost.as_dict()})
      elif rnd.buys:  # Bought now: every row from here on counts them.
        run = run.replace(labels_used=run.labels_used + n * len(data))
        for batch in data:
          cost = cost.add(batch.pairs.cost)
      for update in (rnd.updates(data) if len(data) == len(rnd.waits) else ()):
        train, metrics = exp.train(run.train, update.batch)
        run = run.replace(train=train)
        step += 1
        bar.update()
        if step % c.runtime.log_every_steps == 0:
          metrics = jax.device_get(metrics)
          writer.scalars(metrics, step)
          writer.scalars(exp.phases.row(), step, prefix='time/')
          bar.set_postfix(loss=f'{float(metrics["dpo_loss"]):.3f}')
        if step % c.eval.every_steps == 0 or update.last:
          evaluate(update.row)
        if exp.checkpointer.due(step) or update.last or preemption.requested:
          exp.save_checkpoint(step, run, {'loop': schedule.name, **update.position, 'cost': cost.as_dict()})
        if preemption.requested:
          break
      if preemption.requested:
        exp.checkpointer.wait()
        log(f'SIGTERM: saved step {step}; run the same command again to resume.')
        return rows
  finally:
    bar.close()
    preemption.restore()
    writer.close()
  return rows
