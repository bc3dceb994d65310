"""Online DPO (Guo et al. 2024): at every step, sample pairs from the current policy, label, update.

Labels come through the labelling queue: with labelling.max_staleness = s > 0 the loop keeps s
batches enqueued ahead, so oracles (an external worker, people) label while it trains, and step t
trains on the batch sampled at step max(t - s, 0). s = 0 is fully synchronous.
"""
from __future__ import annotations

from pilaf_jax.loops.loop import Round, Update, run_loop


class OnlineSchedule:
  """One round per step: batches t .. t + max_staleness in the queue (the newest sampled now, from
  the policy of step t), then one update on batch t. A resumed run finds the earlier ones in the
  store (they were enqueued before its checkpoint was saved)."""
  name, start = 'online', {'step': 0}

  def __init__(self, config, sampler: str = '', steps: int = 0, prefix: str = 'online'):
    self.sampler, self.prefix = sampler or config.sampler.name, prefix
    self.total_steps, self.ahead = steps or config.online.steps, config.labelling.max_staleness
    self.title = f'online DPO ({self.sampler})'

  def branch_point(self, exp, run, log):
    return None

  def resume_line(self, position: dict, step: int, directory: str) -> str:
    return f'Resuming the online loop at step {step} from {directory}.'

  def row(self, position: dict) -> dict:
    return {}

  def rounds(self, position: dict, step: int, log):
    last = self.total_steps
    for t in range(step, last):
      draws = [(f'{self.prefix}/{j:06d}', j, self.sampler) for j in range(t, min(t + self.ahead, last - 1) + 1)]
      updates = lambda data, t=t: iter([Update(data[0], {'step': t + 1}, t + 1 == last, {})])
      yield Round(draws, [f'{self.prefix}/{t:06d}'], {'step': t}, True, updates)


def run_online(exp, log=print) -> list[dict]:
  """Runs (or resumes) the online loop; returns the evaluation rows of this run."""
  return run_loop(exp, OnlineSchedule(exp.config), log)
