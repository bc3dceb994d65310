"""Where a run's wall time goes: seconds and throughput per phase (sample, label, train, evaluate,
checkpoint), for metrics.jsonl, TensorBoard and the final table.

Each phase is timed to completion (the device work it dispatched is waited for), so time is not
charged to whichever phase happens to block next. The loops already wait for every sampled batch
(its labels must be committed before use), so waiting for a train step to finish costs nothing:
the next step's sampling needs its params. Timings measure the machine, not the run: they restart
with each process and are never compared between runs (their metric names contain 'seconds' or
'per_s').
"""
from __future__ import annotations

import contextlib
import time

PHASES = ('sample', 'label', 'train', 'evaluate', 'checkpoint')


class PhaseTimer:
  """Accumulated seconds per phase, and work counters for throughput."""

  def __init__(self):
    self.seconds = dict.fromkeys(PHASES, 0.0)
    self.work = {'sample_tokens': 0, 'label_pairs': 0, 'train_tokens': 0}
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def phase(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - start

  def count(self, what: str, n: int) -> None:
    self.work[what] += int(n)

  def wall(self) -> float:
    return time.perf_counter() - self._start

  def row(self) -> dict:
    """Cumulative figures since this process started, for a metrics row."""
    rate = lambda work, phase: self.work[work] / self.seconds[phase] if self.seconds[phase] else 0.0
    return {**{f'seconds_{p}': round(s, 3) for p, s in self.seconds.items()},
            'seconds_wall': round(self.wall(), 3),
            'sample_tokens_per_s': round(rate('sample_tokens', 'sample'), 1),
            'label_pairs_per_s': round(rate('label_pairs', 'label'), 2),
            'train_tokens_per_s': round(rate('train_tokens', 'train'), 1)}

  def summary(self) -> str:
    """One line: how the wall time split between the phases."""
    wall = max(self.wall(), 1e-9)
    parts = [f'{p} {s:.0f} s ({100 * s / wall:.0f}%)' for p, s in self.seconds.items()]
    other = wall - sum(self.seconds.values())
    r = self.row()
    return (f'Wall time {wall:.0f} s: ' + ', '.join(parts) + f', other {other:.0f} s ({100 * other / wall:.0f}%; '
            f'startup, reference, compilation outside the phases). Sampling {r["sample_tokens_per_s"]:,.0f} '
            f'tok/s, training {r["train_tokens_per_s"]:,.0f} tok/s, labelling {r["label_pairs_per_s"]:,.1f} pairs/s.')
