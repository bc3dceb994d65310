"""A run's files in its workdir: the checkpoints, metrics.jsonl and TensorBoard events (mirrored for
a remote workdir). config.json and versions.json: workdir_config.py."""
from __future__ import annotations

import jax

from pilaf_jax import checkpointing, paths
from pilaf_jax.metrics_writer import MetricsWriter


class RunFiles:
  """The checkpointer, the metrics writer and the TensorBoard mirror of one workdir."""

  def __init__(self, config, workdir: str):
    self.workdir = workdir
    ck = config.checkpoint
    self.checkpointer = checkpointing.Checkpointer(
        paths.join(workdir, 'checkpoints'), max_to_keep=ck.max_to_keep, every_steps=ck.every_steps,
        every_seconds=ck.every_seconds, async_save=ck.async_save)
    # TensorBoard events of a remote workdir are staged locally and mirrored at each checkpoint.
    self._tensorboard_dirs, self._tensorboard_uploaded = paths.tensorboard_dirs(workdir), {}

  def metrics_writer(self, resume_step: int) -> MetricsWriter:
    """metrics.jsonl and TensorBoard from resume_step on (-1: a fresh run)."""
    return MetricsWriter(self.workdir, resume_step=resume_step)

  def save(self, step: int, run, meta: dict) -> None:
    """Starts the checkpoint of `step` (asynchronously when enabled) and mirrors TensorBoard."""
    self.checkpointer.save(step, run, meta)
    local, remote = self._tensorboard_dirs
    if remote is not None and jax.process_index() == 0:
      paths.mirror_dir(local, remote, self._tensorboard_uploaded)

  def close(self) -> None:
    self.checkpointer.close()
