"""The reference policy of a run: loaded from a pretrained checkpoint, or (for tasks that fine-tune
it here) read from sft.init_checkpoint or the workdir's cache, else trained by SFT and cached."""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import orbax.checkpoint as ocp

from pilaf_jax import checkpointing, paths
from pilaf_jax.errors import ConfigError
from pilaf_jax.learning.sft import train_reference
from pilaf_jax.model.checkpoints import load_params
from pilaf_jax.tasks import REFERENCE_CHECKPOINT

RESTORED, UNREADABLE, FATAL = 0, 1, 2  # Outcomes of restoring a cached reference, worst last.


def reference_params(config, task, model, placement, workdir: str, key: Callable,
                     log: Callable[[str], None] = print) -> dict:
  """The reference params (model.reference_checkpoint, else model.checkpoint, for tasks that load
  it; else sft.init_checkpoint or <workdir>/reference, else trained with key(stream, i))."""
  c = config
  if task.reference_source == REFERENCE_CHECKPOINT:
    field = 'model.reference_checkpoint' if c.model.reference_checkpoint else 'model.checkpoint'
    spec = c.model[field.split('.')[1]]
    start = time.time()
    params = load_params(spec, model.cfg, placement.params, field)
    log(f'Reference policy loaded from {spec} in {time.time() - start:.1f} s.')
    return params
  directory = paths.as_path(c.sft.init_checkpoint or paths.join(workdir, 'reference'))
  target = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        placement.abstract_params, placement.params)
  cached = directory / 'params'
  if paths.exists(cached):
    params = restore_reference(cached, target, c.sft.init_checkpoint, log)
    if params is not None:
      log(f'Reference policy loaded from {directory}.')
      return params
  elif c.sft.init_checkpoint:
    raise ConfigError(f'sft.init_checkpoint={c.sft.init_checkpoint!r} holds no params/ directory.')
  params = train_reference(task, model, placement, c.sft, key, log)
  checkpointer = ocp.StandardCheckpointer()  # Every process calls save; orbax coordinates.
  checkpointer.save(directory / 'params', params, force=True)
  checkpointer.wait_until_finished()
  return params


def restore_reference(cached, target, given: str, log) -> Optional[dict]:
  """The reference at `cached` (retrying transient errors); None when the workdir's own cache is
  unreadable: it is then set aside (renamed, not deleted) and the caller trains it again. Raises
  RestoreError / ConfigError otherwise. given: sft.init_checkpoint ('' for the workdir's cache).
  Every process takes the same path."""
  outcome, params, error = RESTORED, None, None
  try:
    params = checkpointing.with_retries(lambda: ocp.StandardCheckpointer().restore(cached, target),
                                        f'restoring the reference {cached}', log=log)
  except checkpointing.RestoreError as e:
    outcome, error = FATAL, e
  except Exception as e:  # pylint: disable=broad-except
    if checkpointing.is_structure_mismatch(e):
      outcome, error = FATAL, checkpointing.mismatch_error(
          str(cached), e, lambda: ocp.StandardCheckpointer().metadata(cached).item_metadata.tree, target)
    elif given:
      outcome, error = FATAL, ConfigError(f'sft.init_checkpoint={given!r} could not be restored for this '
                                          f'model ({type(e).__name__}: {str(e)[:300]}).')
    else:
      outcome, error = UNREADABLE, e
  worst = checkpointing.worst_outcome(outcome)
  if worst == RESTORED:
    return params
  if worst == FATAL:
    if error is None or outcome != FATAL:
      error = checkpointing.RestoreError(f'restoring the reference {cached} failed on another process '
                                         '(see its log); nothing was changed.')
    raise error
  reason = type(error).__name__ if error is not None else 'on another process'
  log(f'warning: the cached reference in {cached} is unreadable ({reason}); setting it aside and '
      'training it again.')
  if jax.process_index() == 0:
    checkpointing.set_aside(str(cached), log)
  checkpointing.worst_outcome(RESTORED)  # Every process waits until it is set aside.
  return None


def initial_policy_params(config, task, model, placement, ref_params) -> dict:
  """Where the policy starts: the reference, unless model.checkpoint names another checkpoint or the
  task has a warm start of its own (task.initial_policy)."""
  c = config
  if (task.reference_source == REFERENCE_CHECKPOINT and c.model.reference_checkpoint
      and c.model.reference_checkpoint != c.model.checkpoint):
    return load_params(c.model.checkpoint, model.cfg, placement.params)
  if hasattr(task, 'initial_policy'):  # A task may start the policy away from the reference.
    return task.initial_policy(model, ref_params, placement)
  return ref_params
