"""Crash safety of whole runs: real `python -m pilaf_jax.main` processes on configs/tiny.py, SIGKILLed
or SIGTERMed mid-run and resumed with the same command, end exactly where an uninterrupted run ends:
the same metrics.jsonl, the same labelled pairs, no label bought again after it was committed.

Cost: every launch after the first loads its compiled programs from one JAX persistent compilation
cache shared by the module (a temp dir, or $JAX_COMPILATION_CACHE_DIR when set), and every run after
the first reuses its SFT reference (--config.sft.init_checkpoint). The kill/resume machinery and the
comparisons live in benchmarks/kill_resume.py, which does the same with random kill moments.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import signal
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import kill_resume as kr  # noqa: E402
from conftest import stored_query  # noqa: E402

CONFIG = os.path.join(REPO, 'configs', 'tiny.py')


def _tiny_config():
  spec = importlib.util.spec_from_file_location('_tiny_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


CFG = _tiny_config()
BATCH = CFG.dpo.batch_size
ONLINE_STEPS = CFG.online.steps
CHUNKS = CFG.iterative.prompts_per_iteration // BATCH  # Label batches (= DPO steps per epoch) per iteration.
ITERATIVE_STEPS = CFG.iterative.iterations * CFG.iterative.epochs * CHUNKS
CKPT_EVERY = CFG.checkpoint.every_steps
ITERATIVE = ['--config.loop=iterative']


def _saving_step(name: str) -> int:
  """The step of an orbax temporary checkpoint directory ('8.orbax-checkpoint-tmp-123' -> 8)."""
  m = re.match(r'(\d+)\.', name)
  return int(m.group(1)) if m else -1


def _saving_at_or_after(step: int, fallback: int):
  """Kill while an async checkpoint of a step >= `step` is being written; if no poll catches one in
  flight, kill once the finished checkpoint `fallback` exists (so the kill always lands mid-run)."""
  return lambda s, t: (any(_saving_step(n) >= step for n in s.saving)
                       or max(s.checkpoints, default=0) >= fallback)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return kr.subprocess_env(str(tmp_path_factory.mktemp('jax_cache')))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('runs')


def launch(workdir, env, name: str, overrides=(), **kill) -> kr.Launch:
  workdir = str(workdir)
  log = os.path.join(os.path.dirname(workdir), f'{name}.log')
  return kr.launch(kr.main_command(workdir, CONFIG, overrides), workdir, log, env, **kill)


def assert_finished(workdir, result: kr.Launch):
  assert kr.finished(str(workdir), result), f'status {result.rc}:\n{result.log[-4000:]}'


@pytest.fixture(scope='module')
def online_reference(root, env):
  """The uninterrupted online run; it trains the SFT reference that every other run loads."""
  workdir = root / 'online_reference'
  assert_finished(workdir, launch(workdir, env, 'online_reference'))
  return workdir


@pytest.fixture(scope='module')
def reuse_reference(online_reference):
  return [f'--config.sft.init_checkpoint={online_reference / "reference"}']


@pytest.fixture(scope='module')
def iterative_reference(root, env, reuse_reference):
  workdir = root / 'iterative_reference'
  assert_finished(workdir, launch(workdir, env, 'iterative_reference', ITERATIVE + reuse_reference))
  return workdir


def kill_and_resume(workdir, env, name, overrides, kills, loop='online') -> list[kr.Launch]:
  """One launch per kill condition, each SIGKILLed as soon as its condition holds (or left to finish
  if the run ends first), then one more launch that must finish the run. A kill given as
  (condition, signal.SIGTERM) sends SIGTERM instead: the run saves and exits 0."""
  launches = []
  for i, kill in enumerate(kills):
    condition, sig = kill if isinstance(kill, tuple) else (kill, signal.SIGKILL)
    result = launch(workdir, env, f'{name}_{i}', overrides, kill_when=condition, sig=sig, loop=loop,
                    chunks=CHUNKS)
    if result.killed:
      assert result.rc == (0 if sig == signal.SIGTERM else -sig), result.log[-4000:]
    else:
      assert_finished(workdir, result)
    print(f'{name} kill {i + 1}: {result.phase}')
    launches.append(result)
  assert_finished(workdir, launch(workdir, env, f'{name}_final', overrides))
  return launches


def assert_same_run(reference_dir, workdir, launches, labelled_pairs):
  """Same metrics, same labelled pairs, every question asked once and every answer kept."""
  largest, problems = kr.metrics_difference(kr.read_metrics(str(reference_dir)), kr.read_metrics(str(workdir)))
  assert not problems, problems[:10]
  expected, actual = kr.store_rows(str(reference_dir)), kr.store_rows(str(workdir))
  assert set(actual['rows']) == set(expected['rows'])
  lost = kr.labels_lost(expected['rows'], actual['rows'])
  assert not lost, lost[:10]
  counts = actual['counts']
  assert counts['labelled_pairs'] == labelled_pairs == expected['counts']['labelled_pairs']
  assert kr.requeried_after_commit(str(workdir)) == 0
  # Wherever the kills landed (labelling included: a batch enqueued before a kill keeps its queries and
  # answers, and the resumed run waits for them), every pair was asked once and answered once.
  phases = [r.phase for r in launches]
  assert counts['queried_twice'] == 0 and counts['queried_pairs'] == labelled_pairs, (counts, phases)
  assert counts['pending_pairs'] == 0
  audit = kr.queue_audit(str(workdir))
  assert audit['lost'] == audit['answered_twice'] == audit['open'] == audit['answered_after_commit'] == 0, audit
  assert audit['queries'] == audit['distinct_pairs'] == audit['answers'] == labelled_pairs, audit
  return largest


@pytest.fixture(scope='module')
def online_killed(root, env, reuse_reference):
  """One online run interrupted four times, then resumed to its end: SIGKILLed, SIGTERMed (for
  test_sigterm_saves_exits_zero_and_resumes: one run serves both tests, two launches fewer), SIGKILLed
  twice more."""
  workdir = root / 'online_killed'
  delay = random.Random(0).uniform(1.0, 8.0)  # Seconds after launch: anywhere from startup onwards.
  kills = [
      # Right after the 3rd batch is enqueued: usually before its labels are committed (labelling).
      lambda s, t: s.queries >= 3,
      (lambda s, t: s.batches >= 5, signal.SIGTERM),  # Mid-run: it saves and exits 0.
      _saving_at_or_after(4 * CKPT_EVERY, 6 * CKPT_EVERY),  # While an async checkpoint is written.
      lambda s, t: t >= delay,
  ]
  return workdir, kill_and_resume(workdir, env, 'online_killed', reuse_reference, kills)


def test_online_run_killed_and_resumed_matches_uninterrupted(online_killed, online_reference):
  workdir, launches = online_killed
  assert all(r.killed for r in launches[:3]), [r.phase for r in launches]
  assert_same_run(online_reference, workdir, launches, ONLINE_STEPS * BATCH)
  assert max(kr.read_state(str(workdir)).checkpoints) == ONLINE_STEPS


EXTERNAL = ['--config.labelling.worker=external', '--config.labelling.poll_seconds=0.02']


def test_external_worker_and_loop_killed_match_uninterrupted(root, env, online_reference, reuse_reference):
  """labelling.worker='external': the function oracle answers from its own process, which lives through
  the loop's kills. The loop is SIGKILLed while it waits for labels and while saving; the worker up to
  three times (each at the first moment after a delay that a batch is partly answered, as far as a 1 ms
  poll sees; never elsewhere) and restarted at once. A kill planned after the run has ended cannot land,
  so at least two must (the run lasts long enough for three on an idle machine). The run ends as the inline,
  uninterrupted one."""
  workdir = root / 'external_killed'
  worker = kr.WorkerProcess(str(workdir), str(root / 'external_worker.log'), env)
  worker.start()
  killer = kr.WorkerKiller(worker, delays=[0.3, 0.5, 0.5], patience=None).start()
  kills = [
      lambda s, t: s.batches >= 3 and s.queries > s.batches,  # Batch enqueued, its labels not in yet.
      _saving_at_or_after(5 * CKPT_EVERY, 7 * CKPT_EVERY),
  ]
  try:
    launches = kill_and_resume(workdir, env, 'external_killed', reuse_reference + EXTERNAL, kills)
  finally:
    killer.stop()
    status = worker.stop()
  assert status == 0, open(worker.log_path).read()[-3000:]  # SIGTERM: a clean exit.
  print('worker kills:', worker.kills)
  assert all(r.killed for r in launches), [r.phase for r in launches]
  assert 'labelling' in launches[0].phase, launches[0].phase
  assert len(worker.kills) >= 2 and worker.starts == len(worker.kills) + 1, worker.kills
  assert all(k.startswith('mid-batch') for k in worker.kills), worker.kills
  assert_same_run(online_reference, workdir, launches, ONLINE_STEPS * BATCH)


def test_people_label_and_sigterm_while_waiting(root, env, reuse_reference):
  """oracle.reward='human': the loop waits for people, says so, honours SIGTERM while waiting (saves,
  exits 0), and the resumed run takes up the batch it had enqueued (no new sampling) and trains on the
  people's answers; the hidden reward is stored beside each pair but never used as the label."""
  import threading
  from pilaf_jax.labelling.queue import LabelQueue
  workdir = root / 'human'
  steps = 3
  overrides = reuse_reference + ["--config.oracle.reward=human", f'--config.online.steps={steps}',
                                 f'--config.eval.every_steps={steps}', '--config.labelling.poll_seconds=0.02']
  log = root / 'human_0.log'

  def waited(s, t):  # SIGTERM once the loop has said (after some seconds) that it waits for people.
    return s.queries and 'Waiting for labels' in log.read_text()
  first = launch(workdir, env, 'human_0', overrides, kill_when=waited, sig=signal.SIGTERM)
  assert first.killed and first.rc == 0, first.log[-4000:]
  assert 'Waiting for labels of online/000000: 0/16 resolved' in first.log, first.log[-3000:]
  assert 'SIGTERM: saved step 0' in first.log
  queue = LabelQueue.open_existing(kr.store_file(str(workdir)))
  enqueued = stored_query(queue.path, 1).created
  queue.add_labeller('alice')
  answered = {}
  stop = threading.Event()

  def alice():  # A person: prefers response a on rows not divisible by 3.
    while not stop.is_set():
      query = queue.next_query('alice')
      if query is None:
        time.sleep(0.02)
        continue
      choice = 'a' if query.row % 3 else 'b'
      queue.answer(query.query_id, 'alice', choice)
      answered[query.batch_key, query.row] = choice == 'a'
  person = threading.Thread(target=alice)
  person.start()
  try:
    second = launch(workdir, env, 'human_1', overrides)
  finally:
    stop.set()
    person.join()
  assert_finished(workdir, second)
  assert 'Resuming the online loop at step 0 ' in second.log
  rows = kr.store_rows(str(workdir))
  assert len(rows['rows']) == len(answered) == steps * BATCH
  for key, row in rows['rows'].items():
    assert row['a_preferred'] == answered[key], key
    assert row['oracle_reward_a'] is not None and row['oracle_reward_b'] is not None
  assert stored_query(queue.path, 1).created == enqueued  # Batch 0 was not sampled again.
  report = {r['name']: r for r in queue.labeller_report()['labellers']}
  assert report['alice']['answers'] == steps * BATCH and report['alice']['n_oracle'] > 0
  assert queue.labellers() == ['alice']  # No function oracle answered.
  queue.close()
  audit = kr.queue_audit(str(workdir))
  assert audit['lost'] == audit['answered_twice'] == audit['open'] == 0 and audit['answers'] == steps * BATCH


def test_iterative_run_killed_and_resumed_matches_uninterrupted(root, env, iterative_reference,
                                                                reuse_reference):
  workdir = root / 'iterative_killed'
  kills = [
      lambda s, t: s.batches >= CHUNKS // 2,  # Sampling iteration 0.
      _saving_at_or_after(CHUNKS // 2 * CKPT_EVERY, CHUNKS + CKPT_EVERY),  # Training iteration 0.
      lambda s, t: s.batches >= CHUNKS + CHUNKS // 2,  # Sampling iteration 1.
  ]
  launches = kill_and_resume(workdir, env, 'iterative_killed', ITERATIVE + reuse_reference, kills,
                             loop='iterative')
  assert all(r.killed for r in launches), [r.phase for r in launches]
  assert_same_run(iterative_reference, workdir, launches, CFG.iterative.iterations * CHUNKS * BATCH)
  assert max(kr.read_state(str(workdir)).checkpoints) == ITERATIVE_STEPS


def test_sigterm_saves_exits_zero_and_resumes(online_killed, online_reference):
  """The second launch of the online_killed run: SIGTERMed once 5 batches are labelled; the next launch
  resumes from the step it saved (and the run ends as the uninterrupted one)."""
  workdir, launches = online_killed
  first, resumed = launches[1], launches[2]
  assert first.killed
  assert first.rc == 0, first.log[-4000:]
  match = re.search(r'SIGTERM: saved step (\d+)', first.log)
  assert match, first.log[-4000:]
  step = int(match.group(1))
  assert 5 <= step < ONLINE_STEPS
  # The checkpoint was finished before exiting, and is the newest.
  assert max(first.after.checkpoints) == step and not first.after.saving
  assert f'Resuming the online loop at step {step} ' in resumed.log
  assert_same_run(online_reference, workdir, [first], ONLINE_STEPS * BATCH)


@pytest.fixture(scope='module')
def corrupted_run(root, env, online_reference):
  """A copy of the finished reference run whose newest checkpoint has a truncated data file, run again
  with the same command."""
  workdir = root / 'corrupt'
  shutil.copytree(online_reference, workdir)
  steps = kr.read_state(str(workdir)).checkpoints
  latest, previous = steps[-1], steps[-2]
  state_dir = workdir / 'checkpoints' / str(latest) / 'state'
  victim = max((p for p in state_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  size = victim.stat().st_size // 2
  os.truncate(victim, size)
  result = launch(workdir, env, 'corrupt')
  return workdir, result, latest, previous, victim, size


def test_corrupt_latest_checkpoint_falls_back(corrupted_run, online_reference):
  workdir, result, latest, previous, _, _ = corrupted_run
  assert_finished(workdir, result)
  assert f'warning: checkpoint step {latest} ' in result.log
  assert 'corrupt or partial' in result.log
  assert f'Resuming the online loop at step {previous} ' in result.log
  # The steps after the fallback point re-read their labels from the store: nothing asked again.
  assert_same_run(online_reference, workdir, [], ONLINE_STEPS * BATCH)


def test_corrupt_checkpoint_is_replaced_after_fallback(corrupted_run):
  workdir, result, latest, _, victim, size = corrupted_run
  assert_finished(workdir, result)
  assert latest in kr.read_state(str(workdir)).checkpoints
  assert not (victim.exists() and victim.stat().st_size == size), 'the corrupt checkpoint is still there'


def test_workdir_of_another_config_is_refused(root, env, online_reference):
  workdir = root / 'other_config'
  workdir.mkdir()
  for name in ('config.json', 'labels.sqlite'):
    shutil.copy(online_reference / name, workdir / name)
  saved = (workdir / 'config.json').read_bytes()
  assert json.loads(saved)['fingerprint']['seed'] == 0
  result = launch(workdir, env, 'other_config_0', ['--config.seed=2'])
  assert result.rc == 2, result.log[-4000:]
  assert 'error: ' in result.log and 'seed: 0 -> 2' in result.log
  assert 'Traceback' not in result.log
  assert (workdir / 'config.json').read_bytes() == saved  # Refused before touching anything.
  assert not (workdir / 'checkpoints').exists()
  # Without config.json (e.g. a copied label store), the label store itself refuses.
  os.remove(workdir / 'config.json')
  result = launch(workdir, env, 'other_config_1', ['--config.seed=2'])
  assert result.rc == 2, result.log[-4000:]
  assert 'label store' in result.log and 'seed: 0 -> 2' in result.log
  assert 'Traceback' not in result.log


def test_end_to_end_run_raises_the_reward(online_reference):
  """The uninterrupted tiny run of main: its workdir is complete and the oracle reward rises."""
  rows = kr.read_metrics(str(online_reference))
  assert [r['step'] for r in rows] == [0, 4, 8, 12, 16, 20]
  for key in ('step', 'labels_used', 'reward', 'reward_se', 'kl', 'kl_se', 'J'):
    assert key in rows[-1]
  first, last = rows[0], rows[-1]
  assert first['labels_used'] == 0 and abs(first['kl']) < 1e-4  # The reference, before any update.
  assert last['labels_used'] == ONLINE_STEPS * BATCH
  se = (first['reward_se'] ** 2 + last['reward_se'] ** 2) ** 0.5
  assert last['reward'] - first['reward'] > 3 * se, (first, last)
  assert last['kl'] > 0 and abs(last['J'] - (last['reward'] - 0.1 * last['kl'])) < 1e-4
  for name in ('config.json', 'versions.json', 'labels.sqlite', 'tensorboard', 'checkpoints', 'reference'):
    assert os.path.exists(os.path.join(online_reference, name)), name
