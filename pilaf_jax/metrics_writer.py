"""metrics.jsonl (one JSON object per evaluation) and TensorBoard events, from process 0 only.

The workdir may be on an object store, which cannot append: the writer keeps every row in memory and
rewrites metrics.jsonl whole at each evaluation (paths.write_text_atomic: one object upload, or a
temporary file renamed locally). A SIGKILL therefore leaves the previous complete file or the new
one, never a torn line; rows are small (~1 KB) and evaluations rare, so rewriting costs nothing that
matters. TensorBoard events (tensorboard_events.py) go to a local directory; for a remote workdir they
are mirrored to <workdir>/tensorboard at every checkpoint (Experiment.save_checkpoint) and when the
writer closes.
"""
from __future__ import annotations

import json
from typing import Optional

import jax

from pilaf_jax import paths
from pilaf_jax.tensorboard_events import ScalarEventWriter


class MetricsWriter:

  def __init__(self, workdir: str, resume_step: Optional[int] = None, step_key: str = 'step'):
    """resume_step: the step the run resumes from (-1: a fresh run). Rows written after it by an
    interrupted run are dropped (they will be recomputed), so a resumed run's file equals an
    uninterrupted run's, and TensorBoard gets a restart marker at resume_step + 1 (it then hides
    the interrupted run's points from there on). Required when metrics.jsonl exists: without it
    the writer cannot tell which of its rows to keep, and refuses rather than empty the file."""
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, 'metrics.jsonl')
    self._tb = None
    self._rows: list[str] = []
    self._tb_local, self._tb_remote = paths.tensorboard_dirs(workdir)
    self._tb_uploaded: dict = {}
    if not self.enabled:
      return
    if paths.exists(self.path):
      if resume_step is None and paths.read_text(self.path).strip():
        raise ValueError(f'{self.path} holds rows of an earlier run: pass resume_step (the step this run '
                         'resumes from, or -1 to start afresh and replace them).')
      self._rows = [json.dumps(row) for row in paths.read_metrics(workdir)
                    if resume_step is not None and row.get(step_key, 0) <= resume_step]
      self._flush_rows()
    self._tb = ScalarEventWriter(self._tb_local)
    if resume_step is not None:
      self._tb.add_restart_marker(resume_step + 1)

  def _flush_rows(self) -> None:
    paths.write_text_atomic(self.path, ''.join(r + '\n' for r in self._rows))

  def write(self, row: dict, tb_step: int) -> None:
    if not self.enabled:
      return
    self._rows.append(json.dumps(row))
    self._flush_rows()
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
      if self._tb_remote is not None:
        paths.mirror_dir(self._tb_local, self._tb_remote, self._tb_uploaded)
