"""The labelling web server over HTTP (Flask's test client, and real server processes): tokens on every
request, 4xx for bad or replayed answers that change nothing, majority of k labellers, display order
per labeller that hides the storage order, answers committed before the response, SIGKILL of the
server mid-labelling, and a short load test."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import queue_tables, stored_query

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import label_load  # noqa: E402
from pilaf_jax.label_server import app as server_app  # noqa: E402
from pilaf_jax.labelling.queue import LabelQueue  # noqa: E402

SECRET_SAMPLER = 'sampler-name-never-shown'


def queries(n: int, start: int = 0) -> list[dict]:
  return [dict(row=i, prompt_id=start + i, prompt_text=f'Prompt {start + i}',
               response_a_text=f'first response {start + i}', response_b_text=f'second response {start + i}',
               source_a=7, source_b=9, oracle_reward_a=1.0, oracle_reward_b=0.0) for i in range(n)]


class Run:
  """A workdir with a queue, labellers and a Flask test client."""

  def __init__(self, workdir, answers_per_query=1, allow_ties=False, n=8, names=('alice', 'bob', 'carol')):
    self.workdir = str(workdir)
    self.path = os.path.join(self.workdir, 'labels.sqlite')
    self.queue = LabelQueue(self.path, answers_per_query=answers_per_query, allow_ties=allow_ties)
    self.queue.enqueue('online/000000', 0, SECRET_SAMPLER, queries(n))
    self.tokens = {name: self.queue.add_labeller(name) for name in names}
    self.app = server_app.create_app(self.workdir)
    self.client = self.app.test_client()
    with open(os.path.join(self.workdir, server_app.OWNER_TOKEN_FILE)) as f:
      self.owner = f.read().strip()

  def auth(self, name):
    return {'Authorization': f'Bearer {self.tokens[name] if name in self.tokens else name}'}

  def next(self, name):
    r = self.client.post('/api/next', headers=self.auth(name))
    assert r.status_code == 200, r.json
    return r.json['query']

  def answer(self, name, query_id, choice, **kw):
    return self.client.post('/api/answer', headers=self.auth(name), json={'query_id': query_id, 'choice': choice},
                            **kw)

  def state(self):
    """Everything an answer could change, read on a connection of its own."""
    return queue_tables(self.path)


@pytest.fixture
def run(tmp_path):
  return Run(tmp_path)


def test_every_request_needs_a_valid_token(run):
  routes = [('get', '/'), ('get', '/owner'), ('get', '/api/progress'), ('get', '/api/report'),
            ('get', '/static/style.css'), ('get', '/static/label.js'), ('get', '/favicon.ico'),
            ('post', '/api/next'), ('post', '/api/answer'), ('post', '/logout')]
  for method, route in routes:
    for headers in ({}, {'Authorization': 'Bearer not-a-token'}, {'Authorization': f'Basic {run.tokens["alice"]}'},
                    {'Authorization': 'Bearer'}):
      r = getattr(run.client, method)(route, headers=headers)
      assert r.status_code == 401, (method, route, headers, r.status_code)
  # A browser asking for a page gets the login form (still 401); the API gets a JSON reason.
  page = run.client.get('/')
  assert b'<form method="post" action="/login">' in page.data and page.mimetype == 'text/html'
  api = run.client.post('/api/next')
  assert 'token' in api.json['error']
  # The login form's inline style is allowed by its hash only; no inline script anywhere.
  csp = page.headers['Content-Security-Policy']
  assert "script-src 'self';" in csp and "'unsafe-inline'" not in csp and "style-src 'self' 'sha256-" in csp


def test_login_sets_a_strict_http_only_cookie(run):
  bad = run.client.post('/login', data={'token': 'nope'})
  assert bad.status_code == 401 and b'Unknown token' in bad.data
  r = run.client.post('/login', data={'token': run.tokens['alice']})
  assert r.status_code == 303 and r.location == '/'
  cookie = r.headers['Set-Cookie']
  assert 'HttpOnly' in cookie and 'SameSite=Strict' in cookie and 'Path=/' in cookie
  page = run.client.get('/')  # The test client keeps the cookie.
  assert page.status_code == 200 and b'labelling as <b id="labeller">alice</b>' in page.data
  assert run.client.post('/api/next').status_code == 200
  assert run.client.get('/owner').status_code == 403  # A labeller is not the owner.
  run.client.post('/logout')
  assert run.client.get('/').status_code == 401
  owner = run.client.post('/login', data={'token': run.owner})
  assert owner.status_code == 303 and owner.location == '/owner'
  assert run.client.get('/owner').status_code == 200
  assert run.client.post('/api/next').status_code == 403  # The owner does not label.


def test_bad_and_replayed_answers_get_a_clear_4xx_and_change_nothing(tmp_path):
  run = Run(tmp_path, n=3)
  q_alice = run.next('alice')['query_id']
  q_bob = run.next('bob')['query_id']
  assert q_alice != q_bob
  assert run.answer('alice', q_alice, 'left').status_code == 200
  raw = lambda body, content_type='application/json', name='alice': run.client.post(
      '/api/answer', headers=run.auth(name), data=body, content_type=content_type)
  cases = [
      ('double submit', lambda: run.answer('alice', q_alice, 'left'), 409, 'already'),
      ('replay, other choice', lambda: run.answer('alice', q_alice, 'right'), 409, 'already'),
      ('wrong query id', lambda: run.answer('alice', 999, 'left'), 404, '999'),
      ("someone else's query", lambda: run.answer('alice', q_bob, 'left'), 403, 'not assigned'),
      ('never fetched', lambda: run.answer('carol', q_bob, 'left'), 403, 'not assigned'),
      ('bad choice', lambda: run.answer('bob', q_bob, 'a'), 400, '"choice" must be one of'),
      ('tie while ties are off', lambda: run.answer('bob', q_bob, 'tie'), 400, 'tie'),
      ('missing token', lambda: run.client.post('/api/answer', json={'query_id': q_bob, 'choice': 'left'}), 401,
       'token'),
      ('garbage body', lambda: raw(b'{"query_id": 1, "choi'), 400, 'not a JSON object'),
      ('JSON list', lambda: raw(b'[1, "left"]'), 400, 'not a JSON object'),
      ('not JSON', lambda: raw(b'query_id=1&choice=left', 'application/x-www-form-urlencoded'), 415, 'JSON'),
      ('extra field', lambda: raw(json.dumps({'query_id': q_bob, 'choice': 'left', 'labeller': 'bob'})), 400,
       'Unexpected fields'),
      ('query id as text', lambda: raw(json.dumps({'query_id': str(q_bob), 'choice': 'left'}), name='bob'), 400,
       'query_id'),
      ('query id as bool', lambda: raw(json.dumps({'query_id': True, 'choice': 'left'}), name='bob'), 400,
       'query_id'),
      ('missing choice', lambda: raw(json.dumps({'query_id': q_bob}), name='bob'), 400, 'choice'),
      ('huge body', lambda: raw(json.dumps({'query_id': q_bob, 'choice': 'left' + ' ' * 10000}), name='bob'), 413,
       'too large'),
      ('GET', lambda: run.client.get('/api/answer', headers=run.auth('bob')), 405, 'not allowed'),
      ('cross-site', lambda: run.client.post('/api/answer', headers={**run.auth('bob'), 'Origin': 'http://evil.example'},
                                             json={'query_id': q_bob, 'choice': 'left'}), 403, 'Cross-site'),
      ('foreign Host (DNS rebinding)', lambda: run.client.post(
          '/api/answer', headers=run.auth('bob'), json={'query_id': q_bob, 'choice': 'left'},
          base_url='http://attacker.example:8765'), 421, 'not served here'),
  ]
  for name, request, status, words in cases:
    before = run.state()
    r = request()
    assert r.status_code == status, (name, r.status_code, r.data)
    assert words.lower() in r.json['error'].lower(), (name, r.json)
    assert run.state() == before, f'{name} changed the store'
  # Bob's query is still his to answer, and the answers are what was sent.
  assert run.answer('bob', q_bob, 'right').status_code == 200
  assert run.queue.progress()['answers'] == 2


def test_resolved_query_and_assignments_through_http(tmp_path):
  """k=2: each query goes to two labellers, a third does not get it, and the majority decides."""
  run = Run(tmp_path, answers_per_query=2, allow_ties=True, n=2)
  q1 = run.next('alice')
  assert run.next('bob')['query_id'] == q1['query_id']
  assert run.next('carol')['query_id'] != q1['query_id']  # Two live assignments: full.
  qid = q1['query_id']
  # Both pick the response that reads 'second response ...': wherever each of them saw it.
  side = lambda name, text: 'left' if run.next(name)['left'] == text else 'right'
  text_b = f'second response {stored_query(run.queue.path, qid).row}'
  r = run.answer('alice', qid, side('alice', text_b))
  assert r.status_code == 200 and r.json['resolved'] is False
  assert run.answer('carol', qid, 'left').status_code == 403
  r = run.answer('bob', qid, side('bob', text_b))
  assert r.status_code == 200 and r.json['resolved'] is True
  assert run.answer('carol', qid, 'left').status_code in (403, 409)
  q = stored_query(run.queue.path, qid)
  labels = LabelQueue.open_existing(run.path).resolved_labels('online/000000')
  assert labels is None  # The other query is open.
  stored = label_load.stored_answers(run.path)
  assert sorted((n, c) for i, n, c in stored if i == qid) == [('alice', 'b'), ('bob', 'b')]
  # The other query: a tie and an 'a' from two labellers -> majority 'a'; the page's 'tie' key works.
  other = run.next('carol')['query_id']
  assert run.answer('carol', other, 'tie').status_code == 200
  oq = run.next('alice')
  assert oq['query_id'] == other
  text_a = f'first response {stored_query(run.queue.path, other).row}'
  assert run.answer('alice', other, 'left' if oq['left'] == text_a else 'right').json['resolved'] is True
  labels = run.queue.resolved_labels('online/000000')
  assert labels[q.row] == False and labels[stored_query(run.queue.path, other).row] == True  # noqa: E712


def test_display_order_is_random_per_labeller_and_sources_never_reach_the_page(tmp_path):
  run = Run(tmp_path, n=64, answers_per_query=2, names=('alice', 'bob'))
  seen = {}
  for name in ('alice', 'bob'):
    for _ in range(64):
      r = run.client.post('/api/next', headers=run.auth(name))
      q = r.json['query']
      assert set(q) == {'query_id', 'prompt', 'left', 'right'}
      for secret in (SECRET_SAMPLER, 'online/000000', 'source'):
        assert secret not in r.get_data(as_text=True)
      assert run.next(name)['left'] == q['left']  # The same order when the page is reloaded.
      seen[name, q['query_id']] = q['left'].startswith('second')
      assert run.answer(name, q['query_id'], 'skip' if q['query_id'] % 3 else 'left').status_code == 200
  swapped_alice = [seen['alice', i] for i in range(1, 65)]
  swapped_bob = [seen['bob', i] for i in range(1, 65)]
  # A fair coin per (labeller, query): P(outside 16..48 of 64) < 1e-4 per labeller.
  assert 16 <= sum(swapped_alice) <= 48 and 16 <= sum(swapped_bob) <= 48
  assert swapped_alice != swapped_bob
  # The mapping back to storage order uses the same keyed hash.
  key = server_app.order_key(run.workdir)
  for (name, qid), swapped in seen.items():
    assert server_app.is_swapped(key, name, qid) == swapped
  assert stat.S_IMODE(os.stat(os.path.join(run.workdir, server_app.ORDER_KEY_FILE)).st_mode) == 0o600
  # The labeller page itself shows no source or sampler either.
  page = run.client.get('/', headers=run.auth('alice')).get_data(as_text=True)
  assert SECRET_SAMPLER not in page and 'source' not in page


def test_answers_are_committed_before_the_response(tmp_path):
  run = Run(tmp_path, n=4)
  for _ in range(4):
    q = run.next('alice')
    r = run.answer('alice', q['query_id'], 'right')
    assert r.status_code == 200
    db = sqlite3.connect(f'file:{run.path}?mode=ro', uri=True)  # Another connection, right after.
    row = db.execute('SELECT labeller, choice FROM queue_answers WHERE query_id=?', (q['query_id'],)).fetchone()
    db.close()
    key = server_app.order_key(run.workdir)
    assert row == ('alice', 'a' if server_app.is_swapped(key, 'alice', q['query_id']) else 'b')


def test_text_is_escaped_on_every_page(tmp_path):
  run = Run(tmp_path, n=1, names=('<img src=x onerror=alert(1)>',))
  run.queue.enqueue('online/000001', 1, 'pilaf', [dict(queries(1)[0], prompt_text='<script>alert(1)</script>')])
  name = '<img src=x onerror=alert(1)>'
  page = run.client.get('/', headers=run.auth(name)).get_data(as_text=True)
  assert '<img src=x' not in page and '&lt;img src=x onerror=alert(1)&gt;' in page
  owner = run.client.get('/owner', headers={'Authorization': f'Bearer {run.owner}'}).get_data(as_text=True)
  assert '<img src=x' not in owner and '&lt;img src=x' in owner
  # The API returns text as JSON strings (never HTML) and forbids MIME sniffing.
  run.answer(name, run.next(name)['query_id'], 'left')
  r = run.client.post('/api/next', headers=run.auth(name))
  assert r.json['query']['prompt'] == '<script>alert(1)</script>'
  assert r.mimetype == 'application/json' and r.headers['X-Content-Type-Options'] == 'nosniff'


def test_owner_page_reports_counts_agreement_and_progress(tmp_path):
  run = Run(tmp_path, n=4, answers_per_query=2, names=('alice', 'bob'))
  run.queue.set_loop_step(3)
  for name in ('alice', 'bob'):
    for _ in range(4):
      q = run.next(name)
      text_a = f'first response {stored_query(run.queue.path, q["query_id"]).row}'
      # alice always picks 'a' (the oracle's choice); bob picks 'a' on queries 1-2 only.
      want_a = name == 'alice' or q['query_id'] <= 2
      side = 'left' if (q['left'] == text_a) == want_a else 'right'
      assert run.answer(name, q['query_id'], side).status_code == 200
  r = run.client.get('/api/report', headers={'Authorization': f'Bearer {run.owner}'})
  assert r.status_code == 200
  rows = {row['name']: row for row in r.json['labellers']}
  assert rows['alice']['answers'] == 4 and rows['alice']['agree_with_oracle'] == 1.0
  assert rows['bob']['agree_with_oracle'] == 0.5
  assert r.json['pairwise'] == [{'a': 'alice', 'b': 'bob', 'overlap': 4, 'agreement': 0.5}]
  assert r.json['progress'] == {'answered': 4, 'pending': 0, 'loop_step': 3, 'answers': 8}
  page = run.client.get('/owner', headers={'Authorization': f'Bearer {run.owner}'}).get_data(as_text=True)
  for text in ('100.0 %', '50.0 %', 'loop step <b id="p-step">3</b>', '<td>alice</td><td>bob</td><td>4</td>'):
    assert text in page, text


def test_owner_sees_stuck_queries_and_drops_or_reassigns_them(tmp_path):
  """k=2, two labellers: bob's skip leaves a query only he may finish. The owner page names it as
  stuck; the page tells bob it is back; the owner can reassign it (to bob) or drop it."""
  run = Run(tmp_path, n=2, answers_per_query=2, names=('alice', 'bob'))
  owner = {'Authorization': f'Bearer {run.owner}'}
  first = run.next('bob')['query_id']
  assert run.answer('bob', first, 'skip').status_code == 200
  second = run.next('bob')['query_id']
  assert run.answer('bob', second, 'skip').status_code == 200
  for _ in range(2):
    q = run.next('alice')
    assert run.answer('alice', q['query_id'], 'left').status_code == 200
  waiting = run.client.get('/api/waiting', headers=owner).json['waiting']
  assert [(w['query_id'], w['stuck'], w['skipped_by'], w['may_answer']) for w in waiting] == [
      (first, True, ['bob'], []), (second, True, ['bob'], [])]
  page = run.client.get('/owner', headers=owner).get_data(as_text=True)
  assert f'<tr data-query-id="{first}" class="stuck">' in page and '<td>bob</td><td>nobody</td>' in page
  # Bob gets his skipped query back, and the page is told why.
  r = run.client.post('/api/next', headers=run.auth('bob'))
  assert r.json['query']['query_id'] == first and r.json['offered_again'] is True
  # The owner drops the other one: resolved from alice's answer alone.
  r = run.client.post('/api/drop', headers=owner, json={'query_id': second})
  assert r.status_code == 200 and r.json['resolved'] is True
  assert run.client.post('/api/drop', headers=owner, json={'query_id': second}).status_code == 409
  # ... and reassigns the first to bob (who holds it already: a no-op that keeps it his).
  assert run.client.post('/api/reassign', headers=owner, json={'query_id': first, 'labeller': 'bob'}).status_code == 200
  r = run.client.post('/api/reassign', headers=owner, json={'query_id': first, 'labeller': 'alice'})
  assert r.status_code == 409 and 'already' in r.json['error']
  assert run.answer('bob', first, 'right').json['resolved'] is True
  assert run.queue.resolved_labels('online/000000') is not None
  assert run.client.get('/api/waiting', headers=owner).json['waiting'] == []
  for path in ('/api/drop', '/api/reassign'):  # Only the owner.
    assert run.client.post(path, headers=run.auth('alice'), json={'query_id': first}).status_code == 403


def test_cli_tokens_and_binding(tmp_path):
  workdir = str(tmp_path)
  cmd = [sys.executable, '-m', 'pilaf_jax.label_server']
  run = lambda *args: subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=60)
  missing = run('add-labeller', f'--workdir={workdir}', '--name=alice')
  assert missing.returncode == 2 and 'start the run' in missing.stderr
  LabelQueue(os.path.join(workdir, 'labels.sqlite')).close()
  made = run('add-labeller', f'--workdir={workdir}', '--name=alice')
  assert made.returncode == 0, made.stderr
  assert LabelQueue.open_existing(os.path.join(workdir, 'labels.sqlite')).labeller_for_token(
      made.stdout.strip()) == 'alice'
  owner = run('owner-token', f'--workdir={workdir}')
  path = os.path.join(workdir, server_app.OWNER_TOKEN_FILE)
  assert owner.stdout.strip() == open(path).read().strip()
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  remote = run(f'--workdir={workdir}', '--host=0.0.0.0', '--port=0')
  assert remote.returncode == 2 and '--allow-remote' in remote.stderr
  assert run('remove-everything', f'--workdir={workdir}').returncode == 2


def _labelling_client(url, token, stop, acked, retried, errors, broken):
  """Answers as fast as it can; after a connection error, retries the same answer once the server
  is back (a 409 then means the lost response's answer had been committed). broken[0] counts
  requests cut off mid-way (not refused connections: those happen while the server restarts)."""
  client = label_load.Client(url, token, timeout=10)
  rng = random.Random(0)
  pending = None
  while not stop.is_set():
    try:
      if pending is None:
        status, data = client.post('/api/next')
        if status != 200 or data['query'] is None:
          errors.append(('next', status, data))
          time.sleep(0.05)
          continue
        pending = (data['query']['query_id'], rng.choice(('left', 'right')))
      status, data = client.post('/api/answer', {'query_id': pending[0], 'choice': pending[1]})
    except Exception as e:  # noqa: BLE001  The server is down: wait for it.
      broken[0] += not isinstance(e, ConnectionRefusedError)
      time.sleep(0.05)
      if pending is not None:
        retried.add(pending)
      continue
    if status == 200:
      acked.append(pending)
    elif status == 409 and pending in retried:
      acked.append(pending)  # Committed before the kill; the response was lost with the process.
    else:
      errors.append(('answer', status, data))
    pending = None
  client.close()


def test_sigkill_of_the_server_mid_labelling_loses_nothing_and_asks_nothing_twice(tmp_path):
  """The server is SIGKILLed at random moments while a labeller answers as fast as it can, then
  restarted on the same port: every acknowledged answer is stored, none twice, nothing unacked."""
  workdir = str(tmp_path)
  path = os.path.join(workdir, 'labels.sqlite')
  tokens = label_load.fill_queue(path, 3000, 1, 1)
  proc, url = label_load.start_server(workdir)
  port = url.rsplit(':', 1)[1]
  stop, acked, retried, errors, broken = threading.Event(), [], set(), [], [0]
  worker = threading.Thread(target=_labelling_client, args=(url, tokens[0], stop, acked, retried, errors, broken))
  worker.start()
  rng = random.Random(1)
  in_flight = 0  # Kills that cut a request off.
  try:
    for _ in range(4):
      answered = len(acked)
      deadline = time.time() + 20
      while len(acked) < answered + 5 and time.time() < deadline:  # Labelling is under way again.
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 0.3))
      broken_before = broken[0]
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      time.sleep(0.1)
      in_flight += broken[0] > broken_before
      proc = subprocess.Popen([sys.executable, '-m', 'pilaf_jax.label_server', f'--workdir={workdir}',
                               f'--port={port}'], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answered = len(acked)
    deadline = time.time() + 20
    while len(acked) < answered + 5 and time.time() < deadline:
      time.sleep(0.01)
  finally:
    stop.set()
    worker.join(30)
    proc.kill()
    proc.wait()
  assert not errors, errors[:5]
  assert in_flight >= 3 and len(acked) >= 25, (in_flight, len(acked))
  figures = label_load.check(path, server_app.order_key(workdir), {'labeller00': acked}, 1)
  assert figures == {'stored': len(acked), 'lost': 0, 'duplicated': 0, 'unacked': 0}, figures
  assert len({qid for qid, _ in acked}) == len(acked)  # No query answered twice.


def test_load_short():
  """5 labellers x 3 s against a server process (benchmarks/label_load.py runs 20 x 60 s)."""
  figures = label_load.run(labellers=5, seconds=3.0, answers_per_query=2, log=lambda *_: None)
  assert figures['answers'] >= 20, figures  # Work got done (the rate itself depends on the machine).
  assert figures['lost'] == figures['duplicated'] == figures['unacked'] == 0, figures
  assert not figures['errors'], figures['errors']
  assert figures['both']['p99'] is not None
