"""A whole configs/tiny.py run labelled by two people with labelling.answers_per_query=2, one of whom
skips every pair the first time he sees it: once the other has answered, nobody else may answer the
skipped pair, so it must come back to the skipper, or the run would wait forever. The people answer
through the labelling web app (bearer tokens, the JSON API) while the loop waits."""
from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
import traceback

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import kill_resume as kr  # noqa: E402

CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
STEPS, BATCH = 2, 4


def test_one_labeller_skips_with_two_answers_per_query_and_two_labellers_the_run_finishes(tmp_path):
  from pilaf_jax.label_server import app as server_app
  from pilaf_jax.labelling.queue import LabelQueue, QueueError
  workdir = str(tmp_path / 'run')
  # The browser test's run (tests/test_label_browser.py, LOOP_OVERRIDES) at its cheapest, so that the
  # two share compiled programs through the suite's compilation cache.
  overrides = ['--config.oracle.reward=human', f'--config.online.steps={STEPS}', f'--config.dpo.batch_size={BATCH}',
               '--config.sampler.name=vanilla', '--config.sft.steps=5', '--config.eval.num_prompts=4',
               '--config.eval.batch_size=4', '--config.labelling.answers_per_query=2',
               '--config.labelling.poll_seconds=0.02']
  stop = threading.Event()
  seen: dict = {'alice': [], 'bob': [], 'offered_again': 0, 'errors': []}

  def people():
    try:
      label()
    except BaseException:  # Shown by the test, not lost in a thread.
      seen['errors'].append(traceback.format_exc())

  def label():
    """alice answers every pair; bob skips each pair the first time, and answers it when it comes back."""
    path = kr.store_file(workdir)
    while not stop.is_set():
      try:
        queue = LabelQueue.open_existing(path)
        break
      except (QueueError, sqlite3.OperationalError):  # Not made yet, or being made.
        time.sleep(0.05)
    else:
      return
    auth = {name: {'Authorization': f'Bearer {queue.add_labeller(name)}'} for name in ('alice', 'bob')}
    client = server_app.create_app(workdir).test_client()
    while not stop.is_set():
      idle = True
      for name in ('alice', 'bob'):
        r = client.post('/api/next', headers=auth[name])
        if r.status_code != 200:
          seen['errors'].append((name, r.status_code, r.json))
          continue
        query = r.json['query']
        if query is None:
          continue
        idle = False
        again = r.json['offered_again']
        seen['offered_again'] += again
        choice = 'skip' if name == 'bob' and not again else ('left' if query['query_id'] % 2 else 'right')
        a = client.post('/api/answer', headers=auth[name], json={'query_id': query['query_id'], 'choice': choice})
        if a.status_code != 200:
          seen['errors'].append((name, a.status_code, a.json))
        seen[name].append((query['query_id'], choice))
      if idle:
        time.sleep(0.02)
    queue.close()

  thread = threading.Thread(target=people, daemon=True)
  thread.start()
  try:
    result = kr.launch(kr.main_command(workdir, CONFIG, overrides), workdir, str(tmp_path / 'run.log'),
                       kr.subprocess_env(), timeout_s=300)
  except TimeoutError as e:  # The loop waited for labels that never came.
    pytest.fail(f'{e}\nlabellers: {seen}')
  finally:
    stop.set()
    thread.join(30)
  assert seen['errors'] == []
  assert kr.finished(workdir, result), f'status {result.rc}:\n{result.log[-4000:]}'
  pairs = STEPS * BATCH
  # Bob skipped every pair once and answered each when it came back; alice answered each once.
  assert len(seen['alice']) == pairs and all(c != 'skip' for _, c in seen['alice'])
  assert sum(c == 'skip' for _, c in seen['bob']) == pairs == seen['offered_again']
  assert sorted(q for q, c in seen['bob'] if c != 'skip') == sorted(q for q, _ in seen['alice'])
  queue = LabelQueue.open_existing(kr.store_file(workdir))
  try:
    assert queue.counts() == {'queries': pairs, 'resolved': pairs, 'answers': 2 * pairs, 'excess_answers': 0}
    assert queue.waiting() == []
  finally:
    queue.close()
  audit = kr.queue_audit(workdir)
  assert audit['lost'] == audit['answered_twice'] == audit['open'] == 0
  print(f'\n{pairs} pairs, each skipped once by bob, then answered by both: the run finished in '
        f'{result.seconds:.0f} s')
