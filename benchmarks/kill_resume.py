"""Kill/resume: does a run that is SIGKILLed at random moments and resumed end where an uninterrupted
run ends, without losing or re-buying labels?

  python benchmarks/kill_resume.py                                   # the default config, K=5 kills
  python benchmarks/kill_resume.py --config=configs/tiny.py --kills=8 --seed=1
  python benchmarks/kill_resume.py --steps=20 --config.loop=iterative  # --config.* passes through
  python benchmarks/kill_resume.py --config=configs/tiny.py --worker=external --worker_kills=8
  python benchmarks/kill_resume.py --config=configs/tiny.py --kills=20 --moments=mixed

It runs `python -m pilaf_jax.main` in three fresh workdirs: (1) uninterrupted; (2) uninterrupted
again, loading (1)'s SFT reference and compiled programs, to time the loop itself and to check that
a second process computes the same run; (3) the killed run: SIGKILLed K times and resumed with the
same command after each kill, then run to the end (it too loads (1)'s reference).

Kill moments: K points drawn uniformly (seeded) over (2)'s loop time, in order; each launch, which
resumes from its newest checkpoint (about step/total of the way through that time), is killed when
it reaches the next point, counted from its first progress (a newly enqueued batch, label batch or
checkpoint); at once if it is already past it. --moments=mixed makes every second and third kill wait
further for a checkpoint write in flight (an orbax temporary directory) or a label commit under way
(a batch whose queries are all answered, its labels not yet committed), at most 30 s. Where each kill landed is read from what it left
behind: an async checkpoint still being written ('saving', alongside whatever the loop was doing),
a batch in the labelling queue whose labels were not committed yet ('labelling'), nothing written
yet ('startup'), else 'sampling/training' (online) or 'sampling'/'training' of an iteration.

--worker=external: the function oracle answers from a separate `python -m pilaf_jax.labelling.worker`
beside each run (labelling.worker='external'). In the killed run it lives through the loop's kills
and is itself SIGKILLed --worker_kills times (seeded delays, each then waiting for a moment when a
batch is partly answered, at most 30 s) and restarted at once.

Printed: the kill points; labels lost (pairs of the uninterrupted run that are missing from the
killed run's label store or differ from it; must be 0); labels queried twice (the store's
queried_twice, and questions asked again after a batch's labels had been committed: must be 0); the
labelling queue's audit (answers lost: stored labels that are not their query's resolution, resolved
queries missing from the store; queries answered twice; queries left open: all must be 0); and the
largest absolute difference of the final metrics.

Every launch shares one JAX persistent compilation cache (JAX_COMPILATION_CACHE_DIR, a temp dir
unless already set), so a resumed launch loads its compiled programs instead of compiling them.
tests/test_resume.py uses the helpers below.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# metrics.jsonl fields that measure the machine rather than the run (none today); never compared.
VOLATILE_FIELDS = ('time', 'seconds', 'wall', 'throughput', 'per_s')
# PairBatch fields stored per pair, compared exactly (ints, bools) or to float tolerance (floats).
EXACT_PAIR_FIELDS = ('batch_key', 'row', 'sampler', 'prompt', 'prompt_mask', 'response_a', 'response_b',
                     'mask_a', 'mask_b', 'source_a', 'source_b', 'a_preferred')
FLOAT_PAIR_FIELDS = ('policy_logprobs_a', 'policy_logprobs_b', 'ref_logprobs_a', 'ref_logprobs_b',
                     'oracle_reward_a', 'oracle_reward_b')


# --- launching --------------------------------------------------------------------------------------

def subprocess_env(cache_dir: Optional[str] = None) -> dict:
  """The environment for every launch: one persistent compilation cache, kept for all entries."""
  env = dict(os.environ)
  if cache_dir and not env.get('JAX_COMPILATION_CACHE_DIR'):
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  return env


def main_command(workdir: str, config: Optional[str], overrides: Sequence[str] = ()) -> list[str]:
  cmd = [sys.executable, '-m', 'pilaf_jax.main', f'--workdir={workdir}']
  if config:
    cmd.append(f'--config={config}')
  return cmd + list(overrides)


@dataclasses.dataclass
class State:
  """What a run has left in its workdir, read without disturbing it."""
  # batch_key of every batch put to the oracle, in order: enqueued in the labelling queue (and, for
  # stores of runs before the queue, logged in oracle_queries).
  queried_keys: tuple = ()
  batch_keys: frozenset = frozenset()  # Committed labelled batches.
  checkpoints: tuple = ()  # Finished checkpoint steps.
  saving: tuple = ()  # Checkpoint directories still being written (orbax temporaries).
  answers: int = 0  # Answers in the labelling queue.
  partly_answered: int = 0  # Batches with some but not all queries resolved (an oracle mid-batch).
  # Batches whose every query is resolved but whose labels are not committed to the store yet: the
  # loop is inside a label commit (between the oracle's last answer and the labelled batch's commit).
  resolved_uncommitted: int = 0

  @property
  def batches(self) -> int:
    return len(self.batch_keys)

  @property
  def queries(self) -> int:
    return len(self.queried_keys)

  def pending_since(self, before: 'State') -> list[str]:
    """Batches put to the oracle after `before` whose labels are not committed: with the queue they
    wait there (a resumed run takes them up); before it, their answers were lost."""
    return [k for k in self.queried_keys[before.queries:] if k not in self.batch_keys]


class StateReader:
  """Reads a workdir's State repeatedly (one read-only SQLite connection: cheap enough to poll every
  few milliseconds; in WAL mode every query sees the latest commit and never blocks the writer)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._db = None

  def _connection(self) -> Optional[sqlite3.Connection]:
    if self._db is None:
      path = store_file(self.workdir)
      if not os.path.exists(path):
        return None
      self._db = sqlite3.connect(f'file:{path}?mode=ro', uri=True, timeout=1.0)
    return self._db

  def read(self) -> State:
    queried, batches, answers, partly, uncommitted = (), frozenset(), 0, 0, 0
    for _ in range(20):
      try:
        db = self._connection()
        if db is not None:
          queried = tuple(r[0] for r in db.execute('SELECT batch_key FROM oracle_queries ORDER BY id'))
          batches = frozenset(r[0] for r in db.execute('SELECT batch_key FROM batches'))
          if db.execute("SELECT 1 FROM sqlite_master WHERE name='queue_answers'").fetchone():
            queried += tuple(r[0] for r in db.execute('SELECT batch_key FROM queue_batches ORDER BY rowid'))
            answers = db.execute('SELECT COUNT(*) FROM queue_answers').fetchone()[0]
            partly = db.execute(
                'SELECT COUNT(*) FROM (SELECT SUM(resolved) AS r, COUNT(*) AS n FROM queue_queries WHERE '
                'batch_key IN (SELECT batch_key FROM queue_queries WHERE resolved=0) GROUP BY batch_key) '
                'WHERE r > 0').fetchone()[0]
            uncommitted = db.execute(
                'SELECT COUNT(*) FROM (SELECT batch_key, SUM(resolved) AS r, COUNT(*) AS n FROM queue_queries '
                'WHERE batch_key NOT IN (SELECT batch_key FROM batches) GROUP BY batch_key) WHERE r = n'
            ).fetchone()[0]
        break
      except sqlite3.Error:  # Tables not created yet, or busy for a moment: try again.
        self.close()
        time.sleep(0.005)
    steps, saving = checkpoint_dirs(self.workdir)
    return State(queried, batches, tuple(sorted(steps)), tuple(sorted(saving)), answers, partly,
                 uncommitted)

  def close(self) -> None:
    if self._db is not None:
      self._db.close()
      self._db = None


def store_file(workdir: str) -> str:
  """The run's label store: <workdir>/labels.sqlite for a local workdir; for a gs:// workdir, this
  machine's local store (pilaf_jax.paths.label_store_path, labelling.store_path left at its default)."""
  from pilaf_jax import paths
  return paths.label_store_path(workdir)


def checkpoint_dirs(workdir: str) -> tuple[list[int], list[str]]:
  """(finished checkpoint steps, checkpoint directories still being written). Locally orbax writes a
  temporary directory and renames it; on an object store (no rename) it writes the step directory in
  place and marks it finished with commit_success.txt."""
  from pilaf_jax import paths
  steps, saving = [], []
  ckpt_dir = paths.join(workdir, 'checkpoints')
  for name in paths.listdir(ckpt_dir):
    if paths.is_remote(workdir) and name.isdigit():
      if paths.exists(paths.join(ckpt_dir, name, 'commit_success.txt')):
        steps.append(int(name))
      else:
        saving.append(name + '.uncommitted')
    elif name.isdigit():
      steps.append(int(name))
    elif 'tmp' in name:
      saving.append(name)
  return steps, saving


def read_state(workdir: str) -> State:
  reader = StateReader(workdir)
  try:
    return reader.read()
  finally:
    reader.close()


@dataclasses.dataclass
class Launch:
  """One process of a run: how it ended and where a kill landed."""
  rc: Optional[int]
  killed: bool  # A signal was sent while it ran (False: it had finished first).
  seconds: float
  phase: str
  before: State
  at_kill: Optional[State]
  after: State
  log: str
  first_progress_s: Optional[float] = None  # Seconds from launch to its first new label/checkpoint.

  @property
  def pending(self) -> list[str]:
    """Oracle queries this launch logged whose answers it never committed."""
    return self.after.pending_since(self.before)


def _newest(state: State) -> str:
  return f'checkpoint {max(state.checkpoints)} done' if state.checkpoints else 'no checkpoint yet'


def infer_phase(before: State, after: State, log: str, loop: str, chunks: int = 0) -> str:
  """Where a killed process was, from what it left behind."""
  pending = after.pending_since(before)
  progressed = (after.batch_keys != before.batch_keys or after.checkpoints != before.checkpoints
                or after.queries != before.queries or set(after.saving) - set(before.saving))
  if pending:
    where = f'labelling ({pending[-1]}: enqueued, labels not committed)'
  elif not progressed:
    where = ('startup (restore, compile, evaluation)' if 'Resuming' in log or 'Reference policy' in log
             else 'startup (imports, reference)')
  elif loop == 'iterative' and chunks:
    latest = max(after.batch_keys)  # 'iterationIII/chunkCCCCC' sorts by iteration, then chunk.
    iteration = latest.split('/')[0]
    done = sum(k.startswith(iteration + '/') for k in after.batch_keys)
    where = (f'sampling ({iteration}, {done}/{chunks} chunks labelled)' if done < chunks else
             f'training ({iteration}, {_newest(after)})')
  else:
    where = f'sampling/training (batch {max(after.batch_keys, default="-")} labelled, {_newest(after)})'
  saving = sorted(set(after.saving) - set(before.saving))
  if saving:
    return f'saving (async checkpoint {saving[-1].split(".")[0]} in flight) during {where}'
  return where


def launch(cmd: Sequence[str], workdir: str, log_path: str, env: dict, *,
           kill_when: Optional[Callable[[State, float], bool]] = None,
           kill_after_progress: Optional[float] = None, sig: int = signal.SIGKILL,
           loop: str = 'online', chunks: int = 0, poll_s: float = 0.003,
           timeout_s: float = 1800.0, kill_moment: Optional[Callable[[State, State], bool]] = None,
           patience_s: float = 30.0) -> Launch:
  """Runs cmd once (cwd: the repository root; output to log_path). With kill_when(state,
  seconds_since_launch) or kill_after_progress (seconds after this launch's first progress: a new
  oracle query, label batch or checkpoint), sends `sig` as soon as that holds. The workdir is polled
  every poll_s seconds, so the signal lands within a few milliseconds of the condition.
  kill_moment(state, before): with kill_after_progress, the kill waits past the delay for the first
  poll where this holds (e.g. a checkpoint write in flight, a label commit under way), at most
  patience_s seconds more."""
  before = read_state(workdir)
  start = time.monotonic()
  first_progress = None
  at_kill = None
  reader = StateReader(workdir)
  with open(log_path, 'w') as log_file:
    proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
      watching = kill_when is not None or kill_after_progress is not None
      while proc.poll() is None:
        now = time.monotonic() - start
        if now > timeout_s:
          proc.kill()
          raise TimeoutError(f'{" ".join(cmd)} ran longer than {timeout_s} s; log: {log_path}')
        if not watching:
          time.sleep(0.05)
          continue
        state = reader.read()
        if first_progress is None and (state.batch_keys != before.batch_keys
                                       or set(state.checkpoints) - set(before.checkpoints)
                                       or set(state.saving) - set(before.saving)
                                       or state.queries != before.queries):
          first_progress = now
        due = (kill_after_progress is not None and first_progress is not None
               and now - first_progress >= kill_after_progress)
        if due and kill_moment is not None:
          due = kill_moment(state, before) or now - first_progress >= kill_after_progress + patience_s
        fire = (kill_when is not None and kill_when(state, now)) or due
        if fire and proc.poll() is None:
          proc.send_signal(sig)
          at_kill = state
          break
        time.sleep(poll_s)
      rc = proc.wait(timeout=timeout_s)
    finally:
      reader.close()
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  seconds = time.monotonic() - start
  with open(log_path) as f:
    log = f.read()
  after = read_state(workdir)
  # A process that exited between the last poll and the signal was not killed.
  killed = at_kill is not None and not (sig == signal.SIGKILL and rc == 0)
  if not killed:
    phase = 'finished before the kill' if rc == 0 else f'exited with status {rc}'
  elif sig != signal.SIGKILL:
    phase = f'signal {signal.Signals(sig).name}, exit status {rc}'
  else:
    phase = infer_phase(before, after, log, loop, chunks)
    if at_kill is not None and at_kill.resolved_uncommitted:
      phase = f'inside a label commit (a batch resolved, its labels not yet committed); {phase}'
  return Launch(rc, killed, seconds, phase, before, at_kill, after, log, first_progress)


def finished(workdir: str, launch_result: Launch) -> bool:
  return launch_result.rc == 0 and 'Labels:' in launch_result.log


# --- comparing ----------------------------------------------------------------------------------------

def read_metrics(workdir: str) -> list[dict]:
  from pilaf_jax import paths
  text = paths.read_text(paths.join(workdir, 'metrics.jsonl'))
  rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  return [{k: v for k, v in row.items() if not any(w in k for w in VOLATILE_FIELDS)} for row in rows]


def metrics_difference(expected: list[dict], actual: list[dict], rel: float = 1e-4,
                       abs_tol: float = 1e-6) -> tuple[float, list[str]]:
  """(largest absolute difference over every numeric field, descriptions of mismatches)."""
  problems, largest = [], 0.0
  if [r.get('step') for r in expected] != [r.get('step') for r in actual]:
    problems.append(f'steps differ: {[r.get("step") for r in expected]} vs {[r.get("step") for r in actual]}')
    return math.inf, problems
  for a, b in zip(expected, actual):
    if set(a) != set(b):
      problems.append(f'step {a.get("step")}: fields differ: {sorted(set(a) ^ set(b))}')
    for key in sorted(set(a) & set(b)):
      x, y = a[key], b[key]
      if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        largest = max(largest, abs(float(x) - float(y)))
        if isinstance(x, int) and isinstance(y, int):
          ok = x == y
        else:
          ok = math.isclose(x, y, rel_tol=rel, abs_tol=abs_tol)
      else:
        ok = x == y
      if not ok:
        problems.append(f'step {a.get("step")}: {key} {x!r} != {y!r}')
  return largest, problems


def store_rows(workdir: str) -> dict:
  """{(batch_key, row): pair dict} of a finished run's label store, through LabelStore.iter_rows."""
  from pilaf_jax.labelling.label_store import LabelStore
  path = store_file(workdir)
  db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  try:  # The store's own fingerprint: reading must never be refused.
    fingerprint = json.loads(db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()[0])
  finally:
    db.close()
  store = LabelStore(path, fingerprint)
  try:
    rows = {(r['batch_key'], r['row']): r for r in store.iter_rows()}
    counts = store.counts()
  finally:
    store.close()
  return {'rows': rows, 'counts': counts}


def labels_lost(expected: dict, actual: dict, rel: float = 1e-5) -> list[str]:
  """Pairs of `expected` that are missing from `actual` or differ there (by field)."""
  lost = []
  for key, a in expected.items():
    b = actual.get(key)
    if b is None:
      lost.append(f'{key}: missing')
      continue
    bad = [f for f in EXACT_PAIR_FIELDS if a[f] != b[f]]
    for f in FLOAT_PAIR_FIELDS:
      x, y = a[f], b[f]
      xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
      if len(xs) != len(ys) or any(not math.isclose(u, v, rel_tol=rel, abs_tol=1e-6) for u, v in zip(xs, ys)):
        bad.append(f)
    if bad:
      lost.append(f'{key}: differs in {bad}')
  return lost


def requeried_after_commit(workdir: str) -> int:
  """Questions asked about a batch whose labels were already committed (labels bought twice): oracle
  queries logged after the commit (runs before the queue), plus queue answers given after it."""
  db = sqlite3.connect(f'file:{store_file(workdir)}?mode=ro', uri=True)
  try:
    n = db.execute('SELECT COUNT(*) FROM oracle_queries q JOIN batches b USING (batch_key) '
                   'WHERE q.time > b.time').fetchone()[0]
    if db.execute("SELECT 1 FROM sqlite_master WHERE name='queue_answers'").fetchone():
      n += db.execute('SELECT COUNT(*) FROM queue_answers a JOIN queue_queries q USING (query_id) '
                      'JOIN batches b USING (batch_key) WHERE a.time > b.time').fetchone()[0]
    return n
  finally:
    db.close()


def queue_audit(workdir: str) -> dict:
  """The labelling queue of a finished run against its label store, from the file alone.

  queries / distinct_pairs: queries enqueued, and distinct (batch_key, row) among them (a pair asked
  twice would show as a difference); answers; answered_twice: answers past those a query needed
  (deciding answers beyond answers_per_query, or one labeller answering a query twice); lost:
  labelled pairs whose stored label is not their query's resolution, resolved queries whose pair is
  not in the store, and labelled pairs that have no resolved query; open: queries still unresolved.
  """
  db = sqlite3.connect(f'file:{store_file(workdir)}?mode=ro', uri=True)
  try:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name='queue_answers'").fetchone():
      return {}
    settings = db.execute("SELECT value FROM queue_meta WHERE key='settings'").fetchone()
    k = json.loads(settings[0])['answers_per_query'] if settings else 1
    one = lambda sql, *args: db.execute(sql, args).fetchone()[0]
    audit = {
        'queries': one('SELECT COUNT(*) FROM queue_queries'),
        'distinct_pairs': one('SELECT COUNT(*) FROM (SELECT DISTINCT batch_key, row FROM queue_queries)'),
        'answers': one('SELECT COUNT(*) FROM queue_answers'),
        'answered_twice': one(
            "SELECT COALESCE(SUM(MAX(n - ?, 0)), 0) FROM (SELECT COUNT(*) AS n FROM queue_answers "
            "WHERE choice != 'skip' GROUP BY query_id)", k) + one(
            'SELECT COALESCE(SUM(n - 1), 0) FROM (SELECT COUNT(*) AS n FROM queue_answers '
            'GROUP BY query_id, labeller)'),
        'lost': one('SELECT COUNT(*) FROM pairs p JOIN queue_queries q USING (batch_key, row) '
                    'WHERE q.resolved = 0 OR q.a_preferred != p.a_preferred')
                + one('SELECT COUNT(*) FROM queue_queries q WHERE q.resolved = 1 AND NOT EXISTS '
                      '(SELECT 1 FROM pairs p WHERE p.batch_key = q.batch_key AND p.row = q.row)')
                + one('SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM queue_queries q '
                      'WHERE q.batch_key = p.batch_key AND q.row = p.row)'),
        'open': one('SELECT COUNT(*) FROM queue_queries WHERE resolved = 0'),
        'answered_after_commit': one(
            'SELECT COUNT(*) FROM queue_answers a JOIN queue_queries q USING (query_id) '
            'JOIN batches b USING (batch_key) WHERE a.time > b.time'),
    }
    return audit
  finally:
    db.close()


# --- an external oracle worker ------------------------------------------------------------------------

def worker_command(workdir: str, poll_seconds: float = 0.02) -> list[str]:
  return [sys.executable, '-m', 'pilaf_jax.labelling.worker', f'--workdir={workdir}',
          f'--poll_seconds={poll_seconds}']


class WorkerProcess:
  """`python -m pilaf_jax.labelling.worker` beside a run (labelling.worker='external'), which can be
  SIGKILLed and restarted at any moment; each start appends to one log."""

  def __init__(self, workdir: str, log_path: str, env: dict, poll_seconds: float = 0.02):
    self.workdir, self.log_path, self.env, self.poll_seconds = workdir, log_path, env, poll_seconds
    self.proc: Optional[subprocess.Popen] = None
    self.starts = 0
    self.answers_at_start = 0  # Answers in the queue when the current process started.
    self.kills: list[str] = []  # Where each SIGKILL landed.

  def start(self) -> None:
    self.starts += 1
    self.answers_at_start = read_state(self.workdir).answers
    with open(self.log_path, 'a') as log:
      self.proc = subprocess.Popen(worker_command(self.workdir, self.poll_seconds), cwd=REPO, env=self.env,
                                   stdout=log, stderr=subprocess.STDOUT)

  def alive(self) -> bool:
    return self.proc is not None and self.proc.poll() is None

  def freeze(self, frozen: bool) -> None:
    """SIGSTOP / SIGCONT: while frozen, what the queue shows is what the worker has committed."""
    if self.alive():
      self.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

  def kill(self, reader: Optional['StateReader'] = None) -> bool:
    """SIGKILLs the worker if it runs; records what the queue looked like then. True if it ran."""
    if not self.alive():
      return False
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()
    state = reader.read() if reader is not None else None
    if state is None:
      self.kills.append('killed')
    elif state.answers == self.answers_at_start:
      self.kills.append(f'before its first answer ({state.answers} answers in)')
    elif state.partly_answered:
      self.kills.append(f'mid-batch ({state.answers} answers in, a batch partly answered)')
    elif len(set(state.queried_keys)) > state.batches:
      self.kills.append(f'between batches ({state.answers} answers in, queries open)')
    else:
      self.kills.append(f'idle ({state.answers} answers in, nothing open)')
    return True

  def stop(self) -> Optional[int]:
    """SIGTERM (the worker finishes the answer in progress and exits 0); its exit status."""
    if self.proc is None:
      return None
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      self.proc.send_signal(signal.SIGCONT)  # A frozen worker would hold the SIGTERM until then.
    try:
      return self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      return self.proc.wait()


class WorkerKiller:
  """A thread that SIGKILLs the worker K times and restarts it each time: the k-th kill waits
  delays[k] seconds, then fires at the first poll that sees a batch partly answered by the current
  worker process (an oracle mid-batch), or after `patience` seconds more whatever the queue shows.
  patience None: only mid-batch, checked on the frozen worker (SIGSTOP, read the queue, SIGKILL or
  SIGCONT), so that the worker cannot finish the batch between the look and the kill; a kill that
  finds no such moment before stop() does not fire."""

  def __init__(self, worker: WorkerProcess, delays: Sequence[float], patience: Optional[float] = 10.0,
               poll_s: float = 0.001):
    import threading
    self.worker, self.delays, self.patience, self.poll_s = worker, list(delays), patience, poll_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def start(self) -> 'WorkerKiller':
    self._thread.start()
    return self

  def _run(self) -> None:
    reader = StateReader(self.worker.workdir)
    try:
      for delay in self.delays:
        if self._stop.wait(delay):
          return
        deadline = math.inf if self.patience is None else time.monotonic() + self.patience
        while not self._stop.is_set():
          if self._mid_batch(reader.read()):
            if self.patience is not None:
              break
            self.worker.freeze(True)
            if self._mid_batch(reader.read()):
              break
            self.worker.freeze(False)
          elif time.monotonic() >= deadline:
            break
          time.sleep(self.poll_s)
        if self._stop.is_set():
          self.worker.freeze(False)  # Harmless when it was not frozen.
          return
        self.worker.kill(reader)
        self.worker.start()
    finally:
      reader.close()

  def _mid_batch(self, state) -> bool:
    return state.partly_answered and state.answers > self.worker.answers_at_start

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


# --- the benchmark ------------------------------------------------------------------------------------

# --moments=mixed: what each kill waits for once its delay has passed.
KILL_KINDS = ('random', 'checkpoint write', 'label commit')
KILL_MOMENTS = {
    'random': None,
    'checkpoint write': lambda state, before: bool(set(state.saving) - set(before.saving)),
    'label commit': lambda state, before: state.resolved_uncommitted > 0,
}


def _override(overrides: Sequence[str], name: str, default):
  for o in overrides:
    if o.startswith(f'--config.{name}='):
      return o.split('=', 1)[1]
  return default


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=None, help='config file (default: the embedded default)')
  parser.add_argument('--kills', type=int, default=5, help='SIGKILLs (K)')
  parser.add_argument('--seed', type=int, default=0, help='seeds the kill moments')
  parser.add_argument('--steps', type=int, default=None,
                      help='online.steps (online loop) or iterative.iterations (iterative loop)')
  parser.add_argument('--workdir', default=None, help='where both runs go (default: a temp dir, removed)')
  parser.add_argument('--keep', action='store_true', help='keep the temp dir')
  parser.add_argument('--worker', choices=('inline', 'external'), default='inline',
                      help="who answers the oracle's queries: the loop (inline) or a separate "
                           'pilaf_jax.labelling.worker process beside every run (external)')
  parser.add_argument('--moments', choices=('random', 'mixed'), default='random',
                      help='random: each kill at its random moment; mixed: kills cycle through a random '
                           'moment, the first moment after it with a checkpoint write in flight, and the '
                           'first with a label commit under way (each at most 30 s later)')
  parser.add_argument('--worker_kills', type=int, default=5,
                      help='--worker=external: SIGKILLs of the worker during the killed run (each '
                           'restarted at once)')
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    parser.error(f'unknown arguments {bad} (only --config.<field>=<value> passes through)')

  import importlib.util
  path = args.config or os.path.join(REPO, 'pilaf_jax', 'default_config.py')
  spec = importlib.util.spec_from_file_location('_kill_resume_config', path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, REPO)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  loop = _override(overrides, 'loop', cfg.loop)
  chunks = (int(_override(overrides, 'iterative.prompts_per_iteration', cfg.iterative.prompts_per_iteration))
            // int(_override(overrides, 'dpo.batch_size', cfg.dpo.batch_size)))
  if args.worker == 'external':
    overrides += ['--config.labelling.worker=external', '--config.labelling.poll_seconds=0.02']
  if args.steps is not None:
    overrides.append(f'--config.{"online.steps" if loop == "online" else "iterative.iterations"}='
                     f'{args.steps}')

  root = args.workdir or tempfile.mkdtemp(prefix='kill_resume_')
  os.makedirs(root, exist_ok=True)
  env = subprocess_env(os.path.join(root, 'jax_cache'))
  ref_dir, timing_dir, killed_dir = (os.path.join(root, d) for d in ('uninterrupted', 'timing', 'killed'))
  for d in (ref_dir, timing_dir, killed_dir):
    shutil.rmtree(d, ignore_errors=True)
  print(f'kill_resume: config={args.config or "<default>"} {" ".join(overrides)} loop={loop} '
        f'kills={args.kills} seed={args.seed} worker={args.worker}'
        + (f' worker_kills={args.worker_kills}' if args.worker == 'external' else '')
        + f' workdir={root}', flush=True)
  external = args.worker == 'external'

  def with_worker(workdir: str, name: str):
    """A started worker beside the run in workdir (external), else None."""
    if not external:
      return None
    worker = WorkerProcess(workdir, os.path.join(root, f'{name}_worker.log'), env)
    worker.start()
    atexit.register(worker.stop)  # Also when a run fails and main returns early.
    return worker

  # 1. Uninterrupted (it trains the SFT reference that the other runs load).
  t0 = time.monotonic()
  worker = with_worker(ref_dir, 'uninterrupted')
  ref = launch(main_command(ref_dir, args.config, overrides), ref_dir,
               os.path.join(root, 'uninterrupted.log'), env)
  if worker is not None:
    worker.stop()
  if not finished(ref_dir, ref):
    print(ref.log[-3000:])
    print(f'error: the uninterrupted run failed (status {ref.rc})')
    return 1
  total_steps = max(ref.after.checkpoints)
  print(f'uninterrupted: {ref.seconds:.1f} s, {ref.after.batches} label batches, final step {total_steps}',
        flush=True)
  reuse_reference = [f'--config.sft.init_checkpoint={os.path.join(ref_dir, "reference")}']

  # 2. The same again with the compiled programs cached: how long the loop itself takes (the kill
  # moments are drawn over it), and a check that a second process computes the same run.
  worker = with_worker(timing_dir, 'timing')
  timing = launch(main_command(timing_dir, args.config, overrides + reuse_reference), timing_dir,
                  os.path.join(root, 'timing.log'), env, kill_when=lambda s, t: False, poll_s=0.01)
  if worker is not None:
    worker.stop()
  if not finished(timing_dir, timing):
    print(timing.log[-3000:])
    print(f'error: the timing run failed (status {timing.rc})')
    return 1
  loop_s = timing.seconds - (timing.first_progress_s or 0.0)
  same, same_problems = metrics_difference(read_metrics(ref_dir), read_metrics(timing_dir))
  print(f'second uninterrupted run (warm): {timing.seconds:.1f} s, of which {loop_s:.1f} s after its first '
        f'oracle query; largest metric difference to the first: {same:.3g}', flush=True)

  # 3. Killed at K random moments, resumed each time, then run to the end.
  # Kill moments: K points drawn uniformly over the uninterrupted loop's time, in order. A launch
  # resumes from its newest checkpoint, i.e. about (step / total steps) of the way through that time,
  # and is killed when it reaches its point (at once if it is already past it).
  rng = random.Random(args.seed)
  targets = sorted(rng.uniform(0.0, loop_s) for _ in range(args.kills))
  cmd = main_command(killed_dir, args.config, overrides + reuse_reference)
  launches = []
  # The worker runs through every launch of the killed run (a loop restart does not restart it) and
  # is SIGKILLed at its own seeded moments: a random delay (on average the loop time / kills), then
  # the first moment a batch is partly answered (at most 30 s later: a loop restart takes a while).
  worker = with_worker(killed_dir, 'killed')
  killer = None
  if worker is not None:
    delays = [rng.uniform(0.0, 2 * loop_s / max(args.worker_kills, 1)) for _ in range(args.worker_kills)]
    killer = WorkerKiller(worker, delays, patience=30.0).start()
    atexit.register(killer.stop)  # Runs before the worker's stop (registered earlier).
  for k, target in enumerate(targets):
    done = max(read_state(killed_dir).checkpoints, default=0)
    delay = max(target - done / total_steps * loop_s, 0.0)
    kind = KILL_KINDS[k % len(KILL_KINDS)] if args.moments == 'mixed' else 'random'
    if kind != 'random':
      delay = min(delay, 0.5 * loop_s * (1 - done / total_steps))  # Leave time for the moment to come.
    result = launch(cmd, killed_dir, os.path.join(root, f'killed_{k}.log'), env, kill_after_progress=delay,
                    loop=loop, chunks=chunks, kill_moment=KILL_MOMENTS[kind])
    result.phase = f'[{kind}] {result.phase}'

    launches.append(result)
    where = (f'{result.phase}; store {result.after.batches} batches, checkpoints '
             f'{list(result.after.checkpoints)}')
    when = f'{result.first_progress_s + delay:.2f} s' if result.first_progress_s is not None else '-'
    print(f'kill {k + 1}: {delay:.2f} s after first progress (launch +{when}): {where}', flush=True)
    if not result.killed and not finished(killed_dir, result):
      print(result.log[-3000:])
      print(f'error: a launch of the killed run failed (status {result.rc})')
      return 1
  final = launch(cmd, killed_dir, os.path.join(root, 'killed_final.log'), env)
  if killer is not None:
    killer.stop()
    worker.stop()
  if not finished(killed_dir, final):
    print(final.log[-3000:])
    print(f'error: the final resume failed (status {final.rc})')
    return 1
  resumes = sum(r.killed for r in launches)

  # 4. Compare.
  expected, actual = store_rows(ref_dir), store_rows(killed_dir)
  lost = labels_lost(expected['rows'], actual['rows'])
  extra = sorted(set(actual['rows']) - set(expected['rows']))
  largest, problems = metrics_difference(read_metrics(ref_dir), read_metrics(killed_dir))
  carried = sum(len(r.pending) for r in launches)
  twice_after_commit = requeried_after_commit(killed_dir)
  audit = queue_audit(killed_dir)
  print()
  print(f'kill points tried: {args.kills} ({resumes} landed while running, '
        f'{args.kills - resumes} after it had finished)')
  for k, r in enumerate(launches):
    print(f'  {k + 1}. {r.phase}')
  print(f'labels lost: {len(lost)} of {len(expected["rows"])} pairs'
        + (f' (e.g. {lost[:3]})' if lost else '') + (f'; {len(extra)} extra pairs' if extra else ''))
  print(f'labels queried twice: {actual["counts"]["queried_twice"]} pairs (queried_pairs '
        f'{actual["counts"]["queried_pairs"]}, labelled_pairs {actual["counts"]["labelled_pairs"]}); '
        f'batches the kills left enqueued and unlabelled (taken up by the resumed run): {carried}; '
        f'questions asked again after their labels were committed: {twice_after_commit}')
  if worker is not None:
    print(f'worker: {worker.starts} starts, {len(worker.kills)} SIGKILLs:')
    for k, where in enumerate(worker.kills):
      print(f'  {k + 1}. {where}')
  if audit:
    print(f'labelling queue: {audit["queries"]} queries ({audit["distinct_pairs"]} distinct pairs), '
          f'{audit["answers"]} answers; answers lost: {audit["lost"]}; queries answered twice: '
          f'{audit["answered_twice"]}; answered after their batch was committed: '
          f'{audit["answered_after_commit"]}; left open: {audit["open"]}')
  print(f'largest absolute difference of the final metrics vs the uninterrupted run: {largest:.3g}'
        + (f' ({len(problems)} fields beyond tolerance, e.g. {problems[:3]})' if problems else ''))
  killed_s = sum(r.seconds for r in launches) + final.seconds
  print(f'time: uninterrupted {ref.seconds:.0f} s, second {timing.seconds:.0f} s, killed run {killed_s:.0f} s '
        f'over {len(launches) + 1} launches; total {time.monotonic() - t0:.0f} s')
  if not args.workdir and not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  ok = not lost and not extra and not problems and not same_problems and twice_after_commit == 0
  if audit:
    ok = ok and audit['lost'] == 0 and audit['answered_twice'] == 0 and audit['open'] == 0 and (
        audit['queries'] == audit['distinct_pairs'] == actual['counts']['labelled_pairs'])
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
