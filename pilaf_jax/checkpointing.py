"""Orbax checkpoints of the whole loop state: params, optimiser, counters and where the loop stood.

A checkpoint holds `state` (a pytree: the TrainState and the cumulative cost counters) and `meta`
(JSON: the loop position, e.g. {'step': 120} or {'iteration': 2, 'phase': 'training', ...}, and the
config fingerprint). The directory may be local or on an object store (gs://...): orbax writes both
through etils.epath and tensorstore (on GCS a checkpoint counts once its commit_success.txt exists,
as there is no atomic rename).

Restoring never destroys a checkpoint:
  - a transient error (OSError, a timeout, a storage back-end's UNAVAILABLE) is retried with
    back-off; when it persists the restore fails with RestoreError (main: one line, exit 2);
  - a state structure that differs from the code's (an optimiser upgrade) is a RestoreError naming
    the differing leaf: the checkpoint is fine, the code is not the one that wrote it;
  - a partial write (orbax's temporary directory of a save that was killed) is no checkpoint: orbax
    ignores it and cleans it up;
  - a finished checkpoint that cannot be read (a truncated file) is set aside, renamed into
    <directory>.unreadable/, with a line naming it, and the next older one is tried.
A read-only Checkpointer (another run's directory, e.g. an iterative branch point) sets nothing aside.
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from pilaf_jax import paths

# Restore attempts per checkpoint and the first back-off (doubled after each failure, at most 30 s).
RESTORE_ATTEMPTS = 5
RESTORE_BACKOFF_S = 1.0
# Storage back-ends (tensorstore, gcsfs) report some transient errors as ValueErrors with a status.
_TRANSIENT_MARKERS = ('DEADLINE_EXCEEDED', 'UNAVAILABLE', 'RESOURCE_EXHAUSTED', 'timed out',
                      'Connection reset')
_MISMATCH_MARKERS = ('tree structures do not match', 'is not compatible with the stored shape')


class RestoreError(Exception):
  """A checkpoint could not be restored and nothing was changed; main prints it in one line."""


def is_transient(error: BaseException) -> bool:
  """Errors worth retrying: I/O that may succeed a moment later. A missing file is not one (a
  finished checkpoint that lacks a file is unreadable, however often it is read)."""
  if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
    return False
  if isinstance(error, (OSError, TimeoutError, ConnectionError)):
    return True
  return any(m in str(error) for m in _TRANSIENT_MARKERS)


def is_structure_mismatch(error: BaseException) -> bool:
  return isinstance(error, ValueError) and any(m in str(error) for m in _MISMATCH_MARKERS)


def worst_outcome(code: int) -> int:
  """The largest of every process's outcome code (0 = fine): all processes then take the same path
  (a process that takes another one would hang the next collective)."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def _all_processes_ok(ok: bool) -> bool:
  return worst_outcome(0 if ok else 1) == 0


def with_retries(attempt: Callable[[], Any], what: str, *, log: Callable[[str], None] = print,
                 attempts: Optional[int] = None, backoff_s: Optional[float] = None) -> Any:
  """attempt(), retried with exponential back-off while it raises a transient error. The last
  transient error is raised as RestoreError; any other error is raised as it is."""
  attempts = RESTORE_ATTEMPTS if attempts is None else attempts
  delay = RESTORE_BACKOFF_S if backoff_s is None else backoff_s
  for i in range(attempts):
    try:
      return attempt()
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e):
        raise
      if i == attempts - 1:
        raise RestoreError(f'{what} failed {attempts} times with a transient error; the last: '
                           f'{type(e).__name__}: {_one_line(e)[:300]}. Nothing was changed: run the '
                           'same command again once the storage answers.') from None
      log(f'warning: {what} failed ({type(e).__name__}: {_one_line(e)[:150]}); retrying in '
          f'{delay:.1f} s ({i + 1}/{attempts}).')
      time.sleep(delay)
      delay = min(2 * delay, 30.0)


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split())


def _leaf_names(tree: Any) -> dict[str, Any]:
  """'a.b.c' -> shape for every leaf (dict keys, attribute names and indices alike)."""
  def name(path):
    return '.'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
  return {name(p): tuple(getattr(x, 'shape', ())) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def structure_difference(saved_tree: Any, target: Any) -> str:
  """The first leaf that differs between a checkpoint's tree metadata and the target, in words."""
  saved, wanted = _leaf_names(saved_tree), _leaf_names(target)
  for leaf in sorted(set(saved) | set(wanted)):
    if leaf not in saved:
      return f'leaf {leaf} is in this code\'s state but not in the checkpoint'
    if leaf not in wanted:
      return f'leaf {leaf} is in the checkpoint but not in this code\'s state'
    if saved[leaf] != wanted[leaf]:
      return f'leaf {leaf} has shape {saved[leaf]} in the checkpoint and {wanted[leaf]} here'
  return ''


def mismatch_error(where: str, error: BaseException, saved_tree: Any, target: Any) -> RestoreError:
  """A RestoreError naming the first differing leaf. saved_tree: () -> the checkpoint's tree metadata."""
  diff = ''
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns about metadata files it does not need here.
  try:
    diff = structure_difference(saved_tree(), target) if callable(saved_tree) else ''
  except Exception:  # pylint: disable=broad-except
    pass  # Naming the leaf is a courtesy; orbax's own message follows.
  finally:
    absl_logger.setLevel(level)
  detail = diff or _one_line(error)[:300]
  return RestoreError(f'checkpoint {where} does not match the state this code builds ({detail}); '
                      'nothing was deleted. Resume with the code version that wrote it, or use a fresh '
                      '--workdir.')


def set_aside(path: str, log: Callable[[str], None] = print) -> str:
  """Renames an unreadable checkpoint directory into <parent>.unreadable/ (never deletes it)."""
  source = paths.as_path(path)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S')
  target_dir = source.parent.parent / (source.parent.name + '.unreadable')
  target_dir.mkdir(parents=True, exist_ok=True)
  target = target_dir / f'{source.name}-{stamp}'
  try:
    source.rename(target)
  except Exception as e:  # pylint: disable=broad-except
    raise RestoreError(f'could not set aside the unreadable checkpoint {source} ({type(e).__name__}: '
                       f'{_one_line(e)[:200]}); nothing was deleted. Move it away by hand and run again.'
                       ) from None
  log(f'warning: set aside the unreadable checkpoint {source} as {target} (kept for inspection; '
      'delete it once you no longer need it).')
  return str(target)


class Checkpointer:
  """Saves on a step or a wall-clock interval; restores into the target's shardings."""

  def __init__(self, directory: str, *, max_to_keep: int, every_steps: int, every_seconds: float,
               async_save: bool = True, read_only: bool = False):
    self.directory = str(paths.as_path(directory))  # Absolute when local; a URL as it is.
    self.every_steps, self.every_seconds = every_steps, every_seconds
    self.read_only = read_only
    self._last_save_time = time.monotonic()
    options = (ocp.CheckpointManagerOptions(read_only=True) if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=async_save,
                                            cleanup_tmp_directories=True))
    self._manager = ocp.CheckpointManager(paths.as_path(directory), options=options)

  def due(self, step: int) -> bool:
    return (step % self.every_steps == 0
            or time.monotonic() - self._last_save_time >= self.every_seconds)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving (asynchronously when enabled); the previous save is finished first."""
    if self.read_only:
      raise RuntimeError(f'{self.directory} was opened read-only.')
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

  def step_path(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  # The two reads below are the units that are retried (tests inject faults into them).
  def _restore_step(self, step: int, abstract: Any) -> tuple[Any, dict]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def _read_meta(self, step: int) -> dict:
    return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def _saved_tree(self, step: int) -> Any:
    metadata = ocp.StandardCheckpointer().metadata(paths.as_path(self.step_path(step)) / 'state')
    metadata = getattr(metadata, 'item_metadata', metadata)
    return getattr(metadata, 'tree', metadata)

  def read_meta(self, step: int, log: Callable[[str], None] = print) -> Optional[dict]:
    """The meta of one checkpoint (retrying transient errors), or None when it is unreadable."""
    try:
      return with_retries(lambda: self._read_meta(step), f'reading {self.step_path(step)}/meta', log=log)
    except RestoreError:
      raise
    except Exception:  # pylint: disable=broad-except
      return None

  def restore(self, step: int, target: Any, log: Callable[[str], None] = print) -> tuple[Any, dict]:
    """(state, meta) of one checkpoint. Raises RestoreError (transient errors that persist, a state
    structure that differs) or the read's own error (an unreadable checkpoint)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    where = self.step_path(step)
    outcome, result = None, None
    try:
      result = with_retries(lambda: self._restore_step(step, abstract), f'restoring {where}', log=log)
    except RestoreError as e:
      outcome = e
    except Exception as e:  # pylint: disable=broad-except
      outcome = (mismatch_error(where, e, lambda: self._saved_tree(step), target)
                 if is_structure_mismatch(e) else e)
    if not _all_processes_ok(outcome is None):
      if outcome is None:
        outcome = RestoreError(f'restoring {where} failed on another process (see its log); nothing '
                               'was changed.')
      raise outcome
    return result

  def restore_latest(self, target: Any, log: Callable[[str], None] = print
                     ) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest readable checkpoint, or None if there is none.

    target: a pytree of arrays or jax.ShapeDtypeStruct with shardings: restored leaves take them.
    Raises RestoreError when a transient error persists or the state structure differs (nothing is
    changed then); a finished checkpoint that cannot be read is set aside (see the module doc).
    """
    partial = [n for n in paths.listdir(self.directory) if '.orbax-checkpoint-tmp' in n] \
        if paths.isdir(self.directory) else []
    if partial:
      log(f'note: {len(partial)} partial checkpoint write(s) in {self.directory} (a save cut short, '
          'e.g. by a kill) are no checkpoints; orbax cleans them up.')
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, target, log)
        return step, state, meta
      except RestoreError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint %s is unreadable (%s: %s).', self.step_path(step), type(e).__name__,
                        str(e)[:200])
        log(f'warning: checkpoint step {step} in {self.directory} is corrupt or partial '
            f'({type(e).__name__}: {_one_line(e)[:120]}); falling back to an older one.')
        if self.read_only:
          raise RestoreError(f'checkpoint {self.step_path(step)} is unreadable ({type(e).__name__}); '
                             'it belongs to another run and was left as it is.') from None
        if jax.process_index() == 0:
          set_aside(self.step_path(step), log)
        _all_processes_ok(True)  # Every process waits until it is set aside.
        self._manager.reload()  # The resumed run saves that step afresh.
    return None
