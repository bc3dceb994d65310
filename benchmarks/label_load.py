"""Load test of the labelling web server: N simulated labellers answer as fast as they can.

  python benchmarks/label_load.py                          # 20 labellers, 60 s
  python benchmarks/label_load.py --labellers=5 --seconds=3 --answers_per_query=2

A fresh label queue (in a temporary workdir, or --workdir) is filled with synthetic queries through
LabelQueue directly; `python -m pilaf_jax.label_server` serves it from its own process on localhost
(the server as people run it: waitress, its default threads). Each labeller is a separate process
with its own token and one keep-alive HTTP connection, looping: POST /api/next, then POST
/api/answer with a random choice (left / right, and a skip now and then), with no pause.

Printed: answers/s, latency percentiles (p50 / p95 / p99 / max) of both requests, and the checks,
against the label store read after the server has stopped:
  lost        answers a client got 200 for that are not in the store, or stored with another
              choice than the one the client sent (mapped to storage order with the server's key);
  duplicated  a (labeller, query) answered twice, or a query with more deciding answers than
              answers_per_query;
  unacked     stored answers no client got a 200 for (0 here: nothing kills the server).
All three must be 0; the exit status is 1 otherwise.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pilaf_jax.label_server.secret_files import is_swapped, order_key, storage_choice  # noqa: E402
from pilaf_jax.labelling.queue import LabelQueue  # noqa: E402

BATCH = 64  # Queries per enqueued batch (as the loop would enqueue them).


def fill_queue(path: str, queries: int, answers_per_query: int, labellers: int,
               allow_ties: bool = False) -> list[str]:
  """Creates the queue with `queries` synthetic queries; returns one token per labeller."""
  q = LabelQueue(path, answers_per_query=answers_per_query, allow_ties=allow_ties)
  rng = random.Random(0)
  for b in range(0, queries, BATCH):
    rows = []
    for i in range(min(BATCH, queries - b)):
      ra, rb = rng.random(), rng.random()
      rows.append(dict(row=i, prompt_id=b + i, prompt_text=f'Prompt {b + i}: which reply is better?',
                       response_a_text=f'reply a{b + i} ' * 8, response_b_text=f'reply b{b + i} ' * 8,
                       source_a=1, source_b=2, oracle_reward_a=ra, oracle_reward_b=rb))
    q.enqueue(f'load/{b // BATCH:06d}', b // BATCH, 'pilaf', rows)
  tokens = [q.add_labeller(f'labeller{i:02d}') for i in range(labellers)]
  q.close()
  return tokens


def start_server(workdir: str, env: Optional[dict] = None, threads: Optional[int] = None,
                 log_path: Optional[str] = None, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
  """Starts `python -m pilaf_jax.label_server` on a free localhost port; returns (process, base url)."""
  cmd = [sys.executable, '-m', 'pilaf_jax.label_server', f'--workdir={workdir}', '--port=0']
  if threads:
    cmd.append(f'--threads={threads}')
  env = dict(env or os.environ)
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  env['PYTHONUNBUFFERED'] = '1'
  log = open(log_path or os.path.join(workdir, 'label_server.log'), 'a')
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
  log.close()
  deadline = time.time() + timeout
  path = log_path or os.path.join(workdir, 'label_server.log')
  while time.time() < deadline:
    with open(path) as f:
      lines = [l for l in f.read().splitlines() if l.startswith('Serving the labelling page on ')]
    if lines:
      return proc, lines[-1].split(' on ', 1)[1].split('/ ', 1)[0]
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  proc.kill()
  with open(path) as f:
    raise RuntimeError(f'the label server did not start:\n{f.read()[-3000:]}')


class Client:
  """One labeller's keep-alive connection to the server (JSON in, JSON out)."""

  def __init__(self, url: str, token: str, timeout: float = 30.0):
    host, port = url.split('://', 1)[1].rsplit(':', 1)
    self.host, self.port, self.timeout = host, int(port), timeout
    self.headers = {'Authorization': f'Bearer {token}', 'Content-Type': 'application/json'}
    self.conn: Optional[http.client.HTTPConnection] = None

  def post(self, path: str, body: Optional[dict] = None) -> tuple[int, dict]:
    """(status, JSON body); raises OSError / http.client errors when the server is unreachable."""
    if self.conn is None:
      self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
    try:
      self.conn.request('POST', path, json.dumps(body or {}), self.headers)
      response = self.conn.getresponse()
      data = response.read()
    except (OSError, http.client.HTTPException):
      self.close()
      raise
    return response.status, json.loads(data) if data else {}

  def close(self) -> None:
    if self.conn is not None:
      self.conn.close()
      self.conn = None


def _labeller(url: str, token: str, seconds: float, seed: int, skip_rate: float, ready, go) -> dict:
  """One simulated labeller (in its own process): once every labeller is ready, answers as fast as
  it can for `seconds`."""
  rng = random.Random(seed)
  client = Client(url, token)
  acked, next_ms, answer_ms, errors, idle = [], [], [], {}, 0
  ready.put(seed)
  go.wait()
  deadline = time.time() + seconds
  while time.time() < deadline:
    t0 = time.perf_counter()
    status, data = client.post('/api/next')
    next_ms.append((time.perf_counter() - t0) * 1e3)
    if status != 200:
      errors[f'next {status}'] = errors.get(f'next {status}', 0) + 1
      continue
    query = data['query']
    if query is None:
      idle += 1
      time.sleep(0.01)
      continue
    choice = 'skip' if rng.random() < skip_rate else rng.choice(('left', 'right'))
    t0 = time.perf_counter()
    status, data = client.post('/api/answer', {'query_id': query['query_id'], 'choice': choice})
    answer_ms.append((time.perf_counter() - t0) * 1e3)
    if status == 200:
      acked.append((query['query_id'], choice))
    else:
      errors[f'answer {status}'] = errors.get(f'answer {status}', 0) + 1
  client.close()
  return {'acked': acked, 'next_ms': next_ms, 'answer_ms': answer_ms, 'errors': errors, 'idle': idle}


def _run_labeller(args) -> dict:
  return _labeller(*args)


def stored_answers(path: str) -> list[tuple[int, str, str]]:
  """Every stored answer as (query_id, labeller, storage choice), in commit order, read afresh."""
  q = LabelQueue.open_existing(path)
  try:
    return [(a['query_id'], a['labeller'], a['choice']) for a in q.answers()]
  finally:
    q.close()


def check(path: str, key: bytes, acked: dict[str, list], answers_per_query: int) -> dict:
  """lost / duplicated / unacked answers (see the module docstring); acked: labeller -> [(qid, display choice)]."""
  stored = stored_answers(path)
  by_pair: dict = {}
  for qid, name, choice in stored:
    by_pair.setdefault((qid, name), []).append(choice)
  duplicated = sum(len(v) - 1 for v in by_pair.values())
  deciding: dict = {}
  for qid, _, choice in stored:
    if choice != 'skip':
      deciding[qid] = deciding.get(qid, 0) + 1
  duplicated += sum(max(n - answers_per_query, 0) for n in deciding.values())
  lost, acked_pairs = 0, set()
  for name, answers in acked.items():
    for qid, display in answers:
      acked_pairs.add((qid, name))
      want = storage_choice(display, is_swapped(key, name, qid))
      if by_pair.get((qid, name)) != [want]:
        lost += 1
  unacked = sum(1 for pair in by_pair if pair not in acked_pairs)
  return {'stored': len(stored), 'lost': lost, 'duplicated': duplicated, 'unacked': unacked}


def percentiles(values: list[float]) -> dict:
  if not values:
    return {'p50': None, 'p95': None, 'p99': None, 'max': None}
  v = sorted(values)
  pick = lambda p: v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
  return {'p50': pick(50), 'p95': pick(95), 'p99': pick(99), 'max': v[-1]}


def run(labellers: int = 20, seconds: float = 60.0, queries: Optional[int] = None, answers_per_query: int = 1,
        skip_rate: float = 0.05, workdir: Optional[str] = None, threads: Optional[int] = None,
        log=print) -> dict:
  """Runs the load test; returns the figures (see the module docstring)."""
  own_dir = workdir is None
  workdir = workdir or tempfile.mkdtemp(prefix='label_load_')
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'labels.sqlite')
  # Enough queries that nobody runs out (the server has answered up to ~250/s on 2 cores).
  queries = queries or max(2000, int(400 * seconds * answers_per_query))
  t0 = time.time()
  tokens = fill_queue(path, queries, answers_per_query, labellers)
  log(f'Queue: {queries} queries, {labellers} labellers, answers_per_query={answers_per_query} '
      f'(filled in {time.time() - t0:.1f} s).')
  server, url = start_server(workdir, threads=threads)
  try:
    ctx = mp.get_context('spawn')  # No inherited sockets or SQLite handles.
    with ctx.Manager() as manager, ctx.Pool(labellers) as pool:
      ready, go = manager.Queue(), manager.Event()
      jobs = [(url, token, seconds, i, skip_rate, ready, go) for i, token in enumerate(tokens)]
      pending = pool.map_async(_run_labeller, jobs)
      for _ in range(labellers):  # Every process has started (spawning 20 takes seconds on 2 cores).
        ready.get(timeout=300)
      go.set()
      results = pending.get()
  finally:
    server.terminate()
    try:
      server.wait(10)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()
  acked = {f'labeller{i:02d}': r['acked'] for i, r in enumerate(results)}
  figures = check(path, order_key(workdir), acked, answers_per_query)
  answers = sum(len(r['acked']) for r in results)
  errors: dict = {}
  for r in results:
    for k, v in r['errors'].items():
      errors[k] = errors.get(k, 0) + v
  figures.update(
      labellers=labellers, seconds=seconds, answers=answers, answers_per_s=answers / seconds,
      next=percentiles([x for r in results for x in r['next_ms']]),
      answer=percentiles([x for r in results for x in r['answer_ms']]),
      both=percentiles([x for r in results for x in r['next_ms'] + r['answer_ms']]),
      errors=errors, idle=sum(r['idle'] for r in results))
  if own_dir:
    shutil.rmtree(workdir, ignore_errors=True)
  return figures


def report(f: dict) -> str:
  ms = lambda p: ' / '.join('-' if p[k] is None else f'{p[k]:.1f}' for k in ('p50', 'p95', 'p99', 'max'))
  return '\n'.join([
      f'{f["labellers"]} labellers, {f["seconds"]:.0f} s: {f["answers"]} answers acknowledged, '
      f'{f["answers_per_s"]:.1f} answers/s.',
      f'latency ms (p50 / p95 / p99 / max): next {ms(f["next"])}; answer {ms(f["answer"])}; '
      f'all requests {ms(f["both"])}.',
      f'stored {f["stored"]}; lost {f["lost"]}; duplicated {f["duplicated"]}; unacked {f["unacked"]}; '
      f'non-200 responses {f["errors"] or 0}; idle polls {f["idle"]}.'])


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--labellers', type=int, default=20)
  p.add_argument('--seconds', type=float, default=60.0)
  p.add_argument('--queries', type=int, default=None, help='Queries to fill the queue with (default: enough).')
  p.add_argument('--answers_per_query', type=int, default=1)
  p.add_argument('--skip_rate', type=float, default=0.05)
  p.add_argument('--threads', type=int, default=None, help="The server's --threads (default: its own).")
  p.add_argument('--workdir', default=None, help='Keep the queue here (default: a temporary directory).')
  p.add_argument('--json', action='store_true', help='Print the figures as JSON as well.')
  args = p.parse_args()
  figures = run(args.labellers, args.seconds, args.queries, args.answers_per_query, args.skip_rate,
                args.workdir, args.threads)
  print(report(figures))
  if args.json:
    print(json.dumps(figures))
  return 0 if figures['lost'] == figures['duplicated'] == figures['unacked'] == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
