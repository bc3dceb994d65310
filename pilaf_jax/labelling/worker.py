r"""Function oracles answer the labelling queue: inline in the loop, or as a process of their own.

A function oracle (the synthetic task's hidden reward, a reward model, an LLM judge) has scored both
responses by the time the loop enqueues a batch: the rewards travel with the queries. What is left
is the labelling rule (oracle.label_rule: 'bradley_terry' samples, 'deterministic' picks the higher
reward), whose randomness is the run's ORACLE_STREAM keyed by the batch's index, as before the queue
existed. So a label depends neither on timing nor on which process answered, and the rule always
runs on the CPU backend (no accelerator rounding can flip a sample). Every answer is committed on its
own: a crash mid-batch re-answers nothing that was answered.

With labelling.worker='external' the loop answers nothing itself; run, beside it:

  python -m pilaf_jax.labelling.worker --workdir=<the run's workdir>

It waits for the run to start, answers every open query of the run's queue (oldest batch first),
polls every labelling.poll_seconds, and exits on SIGTERM / SIGINT (after the answer in progress), or
with --once when nothing is left open. It may be killed and restarted at any moment.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Callable, Optional

import numpy as np

from pilaf_jax import config_aliases
from pilaf_jax.labelling.queue import AlreadyAnswered, LabelQueue, QueryResolved, QueueError
from pilaf_jax.streams import ORACLE_STREAM  # Imports nothing: a worker starts without the models.

PROGRESS_SECONDS = 10.0  # The worker reports at most this often.


class FunctionOracle:
  """The labelling rule of a run as a queue labeller named 'oracle:<rule>'."""

  def __init__(self, seed: int, rule: str, stream: int):
    import jax
    from pilaf_jax.labelling.oracles import make_label_rule
    label_rule = make_label_rule(rule)
    self.rule = rule
    self.labeller = 'oracle:' + rule
    self._cpu = jax.devices('cpu')[0]
    with jax.default_device(self._cpu):
      base = jax.random.fold_in(jax.random.key(seed), stream)
    self._labels = jax.jit(lambda rewards, index: label_rule(rewards, jax.random.fold_in(base, index)))
    self._registered: set[int] = set()

  @classmethod
  def from_config(cls, config) -> Optional['FunctionOracle']:
    """The run's function oracle, or None when people label (oracle.reward='human')."""
    if config.oracle.reward == 'human':
      return None
    return cls(config.seed, config.oracle.label_rule, ORACLE_STREAM)

  def labels(self, rewards: np.ndarray, index: int) -> np.ndarray:
    """a_preferred [B] of a batch from its rewards [B, 2] and its index."""
    import jax
    with jax.default_device(self._cpu):
      return np.asarray(self._labels(np.asarray(rewards, np.float32), np.int32(index)))

  def _register(self, queue: LabelQueue) -> None:
    if id(queue) not in self._registered:
      queue.add_oracle_labeller(self.rule)
      self._registered.add(id(queue))

  def answer_batch(self, queue: LabelQueue, batch_key: str,
                   should_stop: Callable[[], bool] = lambda: False) -> int:
    """Answers the batch's open queries this oracle has not answered; returns how many it answered.
    Answers another process got in first are skipped (the queue refuses them, changing nothing)."""
    self._register(queue)
    work = queue.oracle_work(batch_key, self.labeller)
    if work is None or not work.todo:
      return 0
    if work.oracle_index is None or np.isnan(work.rewards).any():
      raise QueueError(f'Batch {batch_key} has no oracle rewards or index: it was enqueued for people '
                       '(oracle.reward=\'human\'); a function oracle cannot answer it.')
    a_preferred = self.labels(work.rewards, work.oracle_index)
    answered = 0
    for query_id, row in work.todo:
      if should_stop():
        break
      try:
        queue.oracle_answer(query_id, self.labeller, 'a' if a_preferred[row] else 'b')
        answered += 1
      except (AlreadyAnswered, QueryResolved):
        pass
    return answered

  def answer_open(self, queue: LabelQueue, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Answers every open batch, oldest first; returns how many queries it answered."""
    answered = 0
    for batch_key in queue.pending_batches():
      if should_stop():
        break
      answered += self.answer_batch(queue, batch_key, should_stop)
    return answered


def _wait_for(what: str, attempt: Callable[[], Optional[object]], poll_s: float, stop: Callable[[], bool]):
  said = False
  while not stop():
    result = attempt()
    if result is not None:
      return result
    if not said:
      _say(f'worker: waiting for {what}')
      said = True
    time.sleep(poll_s)
  return None


def _say(message: str) -> None:
  print(message, flush=True)


def run_worker(workdir: str, *, once: bool = False, poll_seconds: Optional[float] = None,
               labels_path: str = '', log: Callable[[str], None] = _say) -> int:
  """The worker process's body (SIGTERM / SIGINT stop it cleanly); returns its exit status."""
  stopping = {'now': False}

  def stop(signum, frame):
    del signum, frame
    stopping['now'] = True
  previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    return _serve(workdir, once, poll_seconds, labels_path, log, lambda: stopping['now'])
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _serve(workdir: str, once: bool, poll_seconds: Optional[float], labels_path: str, log,
           should_stop: Callable[[], bool]) -> int:
  import ml_collections
  from pilaf_jax import paths
  config_path = paths.join(workdir, 'config.json')

  def read_config():
    try:
      return config_aliases.resolve(ml_collections.ConfigDict(json.loads(paths.read_text(config_path))['config']))
    except (OSError, ValueError, KeyError):
      return None  # Not written yet (or being replaced): try again.
  config = _wait_for(f'{config_path} (start the run)', read_config, 0.5, should_stop)
  if config is None:
    return 0
  lab = config.labelling
  poll = lab.poll_seconds if poll_seconds is None else poll_seconds
  oracle = FunctionOracle.from_config(config)
  if oracle is None:
    log("error: oracle.reward='human': this run has no function oracle; people answer its queries "
        'through the labelling web server.')
    return 2
  path = labels_path or paths.label_store_path(workdir, lab.get('store_path', ''))

  def open_queue():
    try:
      return LabelQueue.open_existing(path)
    except QueueError:
      return None
  queue = _wait_for(f'the labelling queue in {path}', open_queue, poll, should_stop)
  if queue is None:
    return 0
  if (queue.answers_per_query, queue.allow_ties) != (lab.answers_per_query, lab.allow_ties):
    log(f'error: the queue in {path} has answers_per_query={queue.answers_per_query}, allow_ties='
        f'{queue.allow_ties}; the run\'s config says {lab.answers_per_query}, {lab.allow_ties}.')
    return 2
  log(f'worker: answering the queue of {workdir} as {oracle.labeller} (pid {os.getpid()}).')
  total, last_report = 0, time.monotonic()
  try:
    while not should_stop():
      answered = oracle.answer_open(queue, should_stop)
      total += answered
      if time.monotonic() - last_report >= PROGRESS_SECONDS:
        progress = queue.progress()
        log(f'worker: {total} answers given; queue: {progress["answered"]} resolved, '
            f'{progress["pending"]} pending.')
        last_report = time.monotonic()
      if answered == 0:
        if once and not queue.pending_batches():
          break
        time.sleep(poll)
  finally:
    queue.close()
  log(f'worker: stopped after {total} answers.')
  return 0


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='the run directory (python -m pilaf_jax.main --workdir)')
  parser.add_argument('--once', action='store_true', help='exit when no query is left open')
  parser.add_argument('--poll_seconds', type=float, default=None, help='default: labelling.poll_seconds')
  parser.add_argument('--labels', default='',
                      help="the label store file (default: the run's, see labelling.store_path)")
  args = parser.parse_args(argv)
  # The rule is a few scalar ops: never take an accelerator (or its memory) away from the loop.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  return run_worker(args.workdir, once=args.once, poll_seconds=args.poll_seconds, labels_path=args.labels)


if __name__ == '__main__':
  sys.exit(main())
