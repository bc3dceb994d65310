"""Function oracles through the labelling queue: the same labels as the loop's labelling rule whoever
answers, and an oracle worker process SIGKILLed at random moments loses no answer and answers no
query twice. (Whole runs with a killed loop and worker: tests/test_resume.py.)"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pilaf_jax import default_config
from pilaf_jax.labelling import worker as worker_lib
from pilaf_jax.labelling.label_store import LabelStore
from pilaf_jax.labelling.oracles import make_label_rule
from pilaf_jax.labelling.queue import LabelQueue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import kill_resume as kr  # noqa: E402

SEED, B = 3, 16


def loop_labels(rule: str, rewards: np.ndarray, index: int) -> np.ndarray:
  """The labels as the loop computed them before the queue: the rule keyed by the run's ORACLE_STREAM."""
  from pilaf_jax.streams import ORACLE_STREAM
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), ORACLE_STREAM), index)
  return np.asarray(make_label_rule(rule)(rewards, key))


def test_worker_stream_is_the_experiments():
  from pilaf_jax.streams import ORACLE_STREAM
  assert worker_lib.ORACLE_STREAM == ORACLE_STREAM


@pytest.mark.parametrize('rule', ['bradley_terry', 'deterministic'])
def test_function_oracle_labels_are_the_loops(rule):
  oracle = worker_lib.FunctionOracle(SEED, rule, worker_lib.ORACLE_STREAM)
  rs = np.random.RandomState(0)
  for index in (0, 1, 7, 123456):
    rewards = rs.randn(B, 2).astype(np.float32) * 2
    rewards[0, 1] = rewards[0, 0]  # An exact tie (deterministic: the coin).
    np.testing.assert_array_equal(oracle.labels(rewards.astype(np.float64), index), loop_labels(rule, rewards, index))


def _fill(queue: LabelQueue, batches: int, seed: int = 0) -> dict:
  """Batches of random rewards, enqueued as the loop does; {batch_key: (index, rewards)}."""
  rs = np.random.RandomState(seed)
  out = {}
  for b in range(batches):
    key, rewards = f'online/{b:06d}', rs.randn(B, 2)
    queue.enqueue_batch(key, b, 'pilaf', [
        dict(row=i, prompt_id=b * B + i, prompt_text='p', response_a_text='a', response_b_text='b', source_a=0,
             source_b=0, oracle_reward_a=rewards[i, 0], oracle_reward_b=rewards[i, 1]) for i in range(B)],
        oracle_index=b)
    out[key] = (b, rewards)
  return out


def test_an_interrupted_oracle_answers_only_the_rest(tmp_path):
  queue = LabelQueue(str(tmp_path / 'labels.sqlite'))
  (key, (index, rewards)), = _fill(queue, 1).items()
  first = worker_lib.FunctionOracle(SEED, 'bradley_terry', worker_lib.ORACLE_STREAM)
  calls = iter(range(10 ** 6))
  assert first.answer_batch(queue, key, should_stop=lambda: next(calls) >= 5) == 5  # Stopped mid-batch.
  assert queue.batch_progress(key) == (5, B)
  second = worker_lib.FunctionOracle(SEED, 'bradley_terry', worker_lib.ORACLE_STREAM)  # A restart.
  assert second.answer_batch(queue, key) == B - 5
  assert second.answer_batch(queue, key) == 0
  np.testing.assert_array_equal(queue.resolved_labels(key), loop_labels('bradley_terry', rewards, index))
  assert queue.counts() == {'queries': B, 'resolved': B, 'answers': B, 'excess_answers': 0}
  queue.close()


def _workdir(tmp_path, batches: int):
  """A run directory as the worker sees it: config.json, and a label store whose queue holds
  `batches` open batches (no loop needed)."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = default_config.get_config()
  config.seed = SEED
  (workdir / 'config.json').write_text(json.dumps({'config': config.to_dict()}))
  path = str(workdir / 'labels.sqlite')
  LabelStore(path, {'seed': SEED}).close()
  queue = LabelQueue(path)
  filled = _fill(queue, batches, seed=1)
  queue.close()
  return workdir, path, filled


def test_worker_process_killed_at_random_moments(tmp_path):
  workdir, path, filled = _workdir(tmp_path, batches=60)
  total = len(filled) * B
  env = kr.subprocess_env()
  worker = kr.WorkerProcess(str(workdir), str(tmp_path / 'worker.log'), env, poll_seconds=0.01)
  reader = kr.StateReader(str(workdir))
  rng = random.Random(0)
  targets = sorted(rng.sample(range(1, total), 3))  # Kill once this many answers are in, or just after.
  landed = []
  try:
    for target in targets:
      worker.start()
      deadline = time.monotonic() + 120
      while reader.read().answers < target and worker.alive() and time.monotonic() < deadline:
        time.sleep(0.0005)
      assert worker.kill(reader), open(worker.log_path).read()[-3000:]
      landed.append(reader.read().answers)
    # The last start runs until nothing is open (--once).
    log = open(worker.log_path, 'a')
    done = subprocess.run(kr.worker_command(str(workdir), 0.01) + ['--once'], cwd=REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT, timeout=300)
    log.close()
    assert done.returncode == 0, open(worker.log_path).read()[-3000:]
  finally:
    reader.close()
    if worker.alive():
      worker.kill()
  print('worker SIGKILLed at', landed, 'of', total, 'answers:', worker.kills)
  assert landed == sorted(landed) and landed[-1] < total  # Every kill landed before the end.
  assert any('mid-batch' in k for k in worker.kills), worker.kills
  queue = LabelQueue.open_existing(path)
  try:
    answers = queue.answers()
    assert len(answers) == total  # Not one lost, not one repeated ...
    assert len({a['query_id'] for a in answers}) == total
    assert queue.counts() == {'queries': total, 'resolved': total, 'answers': total, 'excess_answers': 0}
    for key, (index, rewards) in filled.items():  # ... and each the rule's label, whichever process gave it.
      np.testing.assert_array_equal(queue.resolved_labels(key), loop_labels('bradley_terry', rewards, index))
  finally:
    queue.close()


def test_worker_refuses_a_run_without_function_oracle(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = default_config.get_config()
  config.oracle.reward = 'human'
  (workdir / 'config.json').write_text(json.dumps({'config': config.to_dict()}))
  said = []
  before = signal.getsignal(signal.SIGTERM)
  assert worker_lib.run_worker(str(workdir), once=True, log=said.append) == 2
  assert "oracle.reward='human'" in said[-1]
  assert signal.getsignal(signal.SIGTERM) is before  # Its handlers are gone again.


def test_synthetic_responses_render_as_token_ids():
  from pilaf_jax.tasks import TRAIN, make_task
  task = make_task(default_config.get_config(), jax.random.key(0))
  ids = np.asarray([5, 0, 77], np.int32)
  assert task.describe_many(TRAIN, ids) == [task.describe(TRAIN, int(i)) for i in ids]
  tokens = np.asarray([7, 9, 2, 0, 0])
  assert task.render_response(tokens, np.asarray([1, 1, 1, 0, 0], bool)) == '7 9 2'


@pytest.mark.parametrize('overrides, message', [
    ({'labelling.max_staleness': -1}, 'labelling.max_staleness=-1 must be an integer >= 0'),
    ({'labelling.max_staleness': 2, 'loop': 'iterative'}, 'applies to the online loop'),
    ({'labelling.answers_per_query': 3}, "k > 1 needs oracle.reward='human'"),
    ({'labelling.answers_per_query': 0, 'oracle.reward': 'human'}, 'must be an integer >= 1'),
    ({'labelling.worker': 'remote'}, "labelling.worker='remote' is unknown"),
    ({'labelling.poll_seconds': 0}, 'labelling.poll_seconds=0.0 must be > 0'),
    ({'oracle.reward': 'person'}, "oracle.reward='person' is unknown"),
])
def test_labelling_config_errors_name_the_field(overrides, message):
  from pilaf_jax.config_validation import ConfigError, fingerprint, validate
  config = default_config.get_config()
  for name, value in overrides.items():
    node = config
    *sections, field = name.split('.')
    for section in sections:
      node = node[section]
    with config.unlocked():
      node[field] = value
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    validate(config)
  ok = default_config.get_config()
  ok.oracle.reward, ok.labelling.answers_per_query, ok.labelling.max_staleness = 'human', 3, 2
  validate(ok)
  # Who answers, and how often the queue is polled, may change when a run resumes: not in the fingerprint.
  assert {'labelling.max_staleness', 'labelling.answers_per_query', 'labelling.allow_ties'} <= set(fingerprint(ok))
  assert not {'labelling.worker', 'labelling.poll_seconds'} & set(fingerprint(ok))
