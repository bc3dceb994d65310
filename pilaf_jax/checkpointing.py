"""Orbax checkpoints of the whole loop state: params, optimiser, counters and where the loop stood.

A checkpoint holds `state` (a pytree: the TrainState and the cumulative cost counters) and `meta`
(JSON: the loop position, e.g. {'step': 120} or {'iteration': 2, 'phase': 'training', ...}, and the
config fingerprint). Restoring tries the newest checkpoint first and falls back to older ones when
one is corrupt or partial, saying so. The directory may be local or on an object store (gs://...):
orbax writes both through etils.epath and tensorstore (on GCS a checkpoint counts once its
commit_success.txt exists, as there is no atomic rename).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from pilaf_jax import paths


class Checkpointer:
  """Saves on a step or a wall-clock interval; restores into the target's shardings."""

  def __init__(self, directory: str, *, max_to_keep: int, every_steps: int, every_seconds: float,
               async_save: bool = True):
    self.directory = str(paths.as_path(directory))  # Absolute when local; a URL as it is.
    self.every_steps, self.every_seconds = every_steps, every_seconds
    self._last_save_time = time.monotonic()
    self._manager = ocp.CheckpointManager(
        paths.as_path(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True))

  def due(self, step: int) -> bool:
    return (step % self.every_steps == 0
            or time.monotonic() - self._last_save_time >= self.every_seconds)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving (asynchronously when enabled); the previous save is finished first."""
    if step in self._manager.all_steps():
      return  # Already saved this exact point (e.g. a resumed run's first step).
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))
    self._last_save_time = time.monotonic()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, target: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest readable checkpoint, or None if there is none.

    target: a pytree of arrays or jax.ShapeDtypeStruct with shardings: restored leaves take them.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    unreadable, result = [], None
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        result = step, restored['state'], dict(restored['meta'])
        break
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint %s/%d is unreadable (%s: %s); falling back to an older one.',
                        self.directory, step, type(e).__name__, str(e)[:200])
        print(f'warning: checkpoint step {step} in {self.directory} is corrupt or partial '
              f'({type(e).__name__}); falling back to an older one.', flush=True)
        unreadable.append(step)
    # Remove what could not be read, so that the resumed run saves those steps afresh.
    for step in unreadable:
      self._manager.delete(step)
    return result


def read_latest_meta(directory: str) -> Optional[tuple[int, dict]]:
  """(step, meta) of the newest checkpoint in directory, without restoring arrays."""
  manager = ocp.CheckpointManager(paths.as_path(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      return step, dict(meta)
    except Exception:  # pylint: disable=broad-except
      continue
  return None
