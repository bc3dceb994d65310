"""The labelling pipeline: sampled pairs go into the queue (committed with the store's pending rows
before any oracle sees them); the loop gets each batch back once every query is resolved.

Labels are written by process 0 alone; the others receive what it reads. SQLite needs a local file:
the store lives at labelling.store_path (default: in a local workdir, or on this machine's disk for a
gs:// workdir) and is copied to <workdir>/labels.sqlite at every checkpoint (sync).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from pilaf_jax import config_validation, default_config, paths
from pilaf_jax.batches import PairBatch, PreferenceBatch
from pilaf_jax.errors import ConfigError
from pilaf_jax.labelling.label_store import BatchStatus, LabelStore, empty_preference_batch
from pilaf_jax.labelling.queue import LabelQueue, QueueSettingsMismatch, describe_waiting
from pilaf_jax.labelling.store_sync import StoreCopy
from pilaf_jax.labelling.worker import FunctionOracle
from pilaf_jax.parts.timing import PhaseTimer
from pilaf_jax.parallel.multihost import is_main_process
from pilaf_jax.parallel.placement import Placement, broadcast_from_main, to_host
from pilaf_jax.tasks.base import pair_queries

PROGRESS_SECONDS = 5.0  # A loop waiting for labels says so at most this often.


class LabellingPipeline:
  """Oracle, queue, label store and its workdir copy, and the wait for answers."""

  def __init__(self, config, workdir: str, task, placement: Placement, phases: PhaseTimer):
    self.config, self.workdir, self.task, self.placement, self.phases = config, workdir, task, placement, phases
    try:  # The labelling rule over the oracle's rewards (None when people label).
      self.function_oracle = FunctionOracle.from_config(config)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    self.store, self.store_copy, self.store_path, self.queue = None, None, None, None
    self._fresh, self._asking_step = {}, 0  # Pairs sampled by this process; the step that waits.
    if is_main_process():
      self.store_path = paths.label_store_path(workdir, config.labelling.store_path)
      self.store_copy = StoreCopy(self.store_path, workdir)
      self.store_copy.restore(print)  # A VM that resumes another VM's run starts from the copy.
      self.store = LabelStore(self.store_path, config_validation.fingerprint(config),
                              defaults=config_validation.fingerprint(default_config.get_config()))
      try:  # The labelling queue lives in the store's file.
        self.queue = LabelQueue(self.store_path, answers_per_query=config.labelling.answers_per_query,
                                allow_ties=config.labelling.allow_ties)
      except QueueSettingsMismatch as e:
        raise ConfigError(str(e)) from None

  def enqueue(self, batch_key: str, index: int, step: int, sampler_name: str, sample: Callable[[], PairBatch],
              oracle_rewards: Callable[[PairBatch], np.ndarray]) -> bool:
    """Samples batch `batch_key` (sample()) and enqueues its queries, unless the store holds it
    already: labelled, or pending from before a restart (then nothing is sampled again and its
    queries keep their answers). Returns True when it sampled."""
    self._asking_step = step
    known = self.store is not None and self.store.status(batch_key) != 'absent'
    if int(broadcast_from_main(np.int32(known))):
      return False
    with self.phases.phase('sample'):
      pairs = sample()
      host_pairs = to_host(pairs)  # A collective: every process takes part.
    self.phases.count('sample_tokens', int(host_pairs.cost.policy_decode_tokens) +
                      int(host_pairs.cost.ref_decode_tokens))
    with self.phases.phase('label'):
      rewards = oracle_rewards(host_pairs)  # On every process: a text oracle is a sharded model.
      if self.store is not None:
        self.store.put_pending(self.queue, batch_key, step, sampler_name, host_pairs, rewards,
                               pair_queries(self.task, host_pairs, rewards), oracle_index=index)
    self._fresh[batch_key] = pairs
    return True

  def resolved(self, batch_key: str, n: int, *, should_stop: Optional[Callable[[], bool]] = None,
               log: Callable[[str], None] = print) -> Optional[tuple[PreferenceBatch, bool]]:
    """The labelled batch `batch_key` (enqueued before), once every query of it is resolved and
    committed to the store. Returns (batch, labelled before this call), or None when should_stop()
    (SIGTERM) turned true while waiting. Other processes wait in the broadcast."""
    status, labels = BatchStatus.STOPPED, None
    if self.store is not None:
      if self.store.status(batch_key) == 'labelled':
        status = BatchStatus.LABELLED_BEFORE
      else:
        with self.phases.phase('label'):
          labels = self._wait_for_labels(batch_key, should_stop, log)
          if labels is not None:
            self.store.commit_resolved(batch_key, labels)
            status = BatchStatus.RESOLVED_NOW
    status = BatchStatus(int(broadcast_from_main(np.int32(status))))
    if status == BatchStatus.STOPPED:
      return None
    fresh = self._fresh.pop(batch_key, None)
    if status == BatchStatus.RESOLVED_NOW:
      self.phases.count('label_pairs', n)
      if fresh is not None:  # Sampled by this process: only the labels travel.
        labels = broadcast_from_main(np.zeros((n,), bool) if labels is None else labels)
        return PreferenceBatch(fresh, self.placement.to_global(np.asarray(labels, bool))), False
    # Labelled before, or sampled before a restart: process 0 reads it back, every process receives it.
    stored = (self.store.get(batch_key)[0] if self.store is not None else
              empty_preference_batch(n, self.task.prompt_len, self.task.response_len))
    return self.placement.to_global(broadcast_from_main(stored)), status == BatchStatus.LABELLED_BEFORE

  def _wait_for_labels(self, batch_key: str, should_stop, log) -> Optional[np.ndarray]:
    """Process 0: the batch's labels once resolved, answering function-oracle queries here when
    labelling.worker='inline', else polling for the worker's or people's answers (progress at
    most every PROGRESS_SECONDS)."""
    lab, oracle = self.config.labelling, self.function_oracle
    inline = oracle is not None and lab.worker == 'inline'
    start = time.monotonic()
    next_report, recorded = start + PROGRESS_SECONDS, False
    while True:
      if inline:
        oracle.answer_batch(self.queue, batch_key)
      labels = self.queue.resolved_labels(batch_key)
      if labels is not None:
        return labels
      if not recorded:  # The web server shows where the loop waits.
        self.queue.set_loop_step(self._asking_step)
        recorded = True
      if should_stop is not None and should_stop():
        return None
      now = time.monotonic()
      if now >= next_report:
        done, total = self.queue.batch_progress(batch_key)
        queue = self.queue.progress()
        who = ('people answer through the labelling web server' if oracle is None else
               f'is `python -m pilaf_jax.labelling.worker --workdir={self.workdir}` running?')
        line = (f'Waiting for labels of {batch_key}: {done}/{total} resolved after {now - start:.0f} s; '
                f'queue: {queue["pending"]} open, {queue["answered"]} resolved ({who}).')
        if oracle is None:  # Say which queries, and who may still answer them.
          line += ' Open: ' + describe_waiting(self.queue.waiting(batch_key, limit=total)) + '.'
        log(line)
        next_report = now + PROGRESS_SECONDS
      time.sleep(lab.poll_seconds)

  def sync(self) -> None:
    """Brings the workdir's copy of the label store up to date (before every checkpoint)."""
    if self.store_copy is not None:
      self.store_copy.upload()

  def close(self) -> None:
    self.sync()  # The finished (or interrupted) run's labels, in the workdir.
    for part in (self.store_copy, self.queue, self.store):
      if part is not None:
        part.close()
