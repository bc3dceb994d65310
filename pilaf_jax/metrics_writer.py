"""metrics.jsonl (one JSON object per evaluation) and TensorBoard events, from process 0 only."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax


class MetricsWriter:

  def __init__(self, workdir: str, resume_step: Optional[int] = None, step_key: str = 'step'):
    """resume_step: rows written after this step by an interrupted run are dropped (they will be
    recomputed), so a resumed run's file equals an uninterrupted run's."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            continue  # A line torn by a crash.
          if resume_step is not None and row.get(step_key, 0) <= resume_step:
            keep.append(line if line.endswith('\n') else line + '\n')
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(keep)
      os.replace(self.path + '.tmp', self.path)
    from tensorboardX import SummaryWriter  # Pure Python; no TensorFlow needed.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, row: dict, tb_step: int) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
      f.flush()
      os.fsync(f.fileno())
    for key, value in row.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(key, value, tb_step)
    self._tb.flush()

  def scalars(self, values: dict, tb_step: int, prefix: str = 'train/') -> None:
    if self.enabled:
      for key, value in values.items():
        self._tb.add_scalar(prefix + key, float(value), tb_step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
