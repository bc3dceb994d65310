"""The labelling queue: pending preference queries, who is working on them, and every answer.

The loop writes each sampled batch's pairs as queries (prompt and both responses as text, their
sources, the step that asked) and later takes the batch back once every query is resolved. Oracles
answer asynchronously through one call, `answer()`: people through the labelling web server,
function oracles (the synthetic task's reward, reward models, judges) under a labeller name like
'oracle:bradley_terry'. So there is one path for every oracle, and one place where an answer lives.

Storage: the label store's SQLite file, in its own `queue_*` tables (WAL, synchronous=FULL, a busy
timeout). Every write is one `BEGIN IMMEDIATE` transaction committed before the call returns, so a
crash of any process (loop, worker, server) loses no answer that a caller was told about, and the
constraints (one answer per labeller and query, at most `answers_per_query` deciding answers) hold
whatever order concurrent writers commit in. Function oracles' answers skip the fsync (see
LabelQueue._write): one per answer would cost as much as a training step, and they are
recomputable. Each thread and each process gets its own connection (made on first use; a forked
child makes fresh ones).

Resolution: a query is resolved once `answers_per_query` answers other than 'skip' are in. The
majority of 'a' / 'b' wins; a draw ('tie' votes, or as many 'a' as 'b') is settled by a fair coin
keyed by the query id (deterministic), and recorded as such. Choices are always in storage order
(response_a / response_b of the pair); a server that shows them in another order maps back first.

Assignments: `next_query` hands a labeller the oldest unresolved query it has not answered whose
deciding answers plus live assignments to others are fewer than `answers_per_query`, and records the
assignment durably. An assignment unanswered for `assignment_timeout_s` expires: the query goes to
someone else, and a late answer from the first labeller is still accepted while the query is
unresolved (it is never lost; once the query is resolved it gets QueryResolved).

Skips: a skip is stored as that labeller's answer and hands the query to someone else. When nobody
else may answer it any more (every other labeller has answered it, so its deciding answers can never
reach answers_per_query without the skipper), it is offered again to the skipper once they have
nothing else to do, and their next answer replaces the skip. The run owner sees such queries
(`waiting()`) and can `drop()` one (resolve it from the answers in) or `reassign()` it to someone.

Beside this module: labellers.py (accounts and tokens), agreement.py (the owner's agreement
statistics), queue_errors.py (what is refused, with the HTTP status the web server answers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from pilaf_jax.labelling import agreement
from pilaf_jax.labelling import labellers as accounts
from pilaf_jax.labelling.labellers import ORACLE_PREFIX, token_hash  # noqa: F401  (part of this module's API)
from pilaf_jax.labelling.queue_errors import (AlreadyAnswered, BadChoice, NotAssigned,  # noqa: F401
                                              QueryResolved, QueueError, QueueSettingsMismatch,
                                              UnknownLabeller, UnknownQuery)

CHOICES = ('a', 'b', 'tie', 'skip')  # Always in STORAGE order (response_a / response_b of the pair).
BUSY_TIMEOUT_S = 60.0  # How long a writer waits for another process's transaction.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue_labellers (
  name TEXT PRIMARY KEY, token_hash TEXT UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS queue_batches (
  batch_key TEXT PRIMARY KEY, step INTEGER NOT NULL, sampler TEXT NOT NULL,
  num_queries INTEGER NOT NULL, oracle_index INTEGER, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS queue_queries (
  query_id INTEGER PRIMARY KEY AUTOINCREMENT, batch_key TEXT NOT NULL, row INTEGER NOT NULL,
  step INTEGER NOT NULL, sampler TEXT NOT NULL, prompt_id INTEGER NOT NULL, prompt_text TEXT NOT NULL,
  response_a_text TEXT NOT NULL, response_b_text TEXT NOT NULL,
  source_a INTEGER NOT NULL, source_b INTEGER NOT NULL, oracle_reward_a REAL, oracle_reward_b REAL,
  created REAL NOT NULL, resolved INTEGER NOT NULL DEFAULT 0, a_preferred INTEGER, resolution TEXT,
  resolved_time REAL, UNIQUE (batch_key, row));
CREATE INDEX IF NOT EXISTS queue_queries_open ON queue_queries (resolved, query_id);
CREATE TABLE IF NOT EXISTS queue_assignments (
  query_id INTEGER NOT NULL, labeller TEXT NOT NULL, assigned REAL NOT NULL,
  PRIMARY KEY (query_id, labeller));
CREATE TABLE IF NOT EXISTS queue_answers (
  answer_id INTEGER PRIMARY KEY AUTOINCREMENT, query_id INTEGER NOT NULL, labeller TEXT NOT NULL,
  choice TEXT NOT NULL, time REAL NOT NULL, UNIQUE (query_id, labeller));
CREATE INDEX IF NOT EXISTS queue_answers_by_labeller ON queue_answers (labeller, query_id);
"""
_QUERY_FIELDS = ('query_id', 'batch_key', 'row', 'step', 'sampler', 'prompt_id', 'prompt_text',
                 'response_a_text', 'response_b_text', 'source_a', 'source_b', 'created')
_REQUIRED_KEYS = ('row', 'prompt_id', 'prompt_text', 'response_a_text', 'response_b_text', 'source_a',
                  'source_b')


@dataclasses.dataclass(frozen=True)
class Query:
  """One pair to label, as a labeller sees it (sources are for reports, never shown)."""
  query_id: int
  batch_key: str  # 'online/000012', 'iteration001/chunk00003'
  row: int  # Row of the pair in its batch.
  step: int  # The loop step that asked.
  sampler: str
  prompt_id: int
  prompt_text: str  # The conversation, as text (Task.describe).
  response_a_text: str
  response_b_text: str
  source_a: int  # Which distribution produced each response (never shown to labellers).
  source_b: int
  created: float


@dataclasses.dataclass(frozen=True)
class OracleWork:
  """What a function oracle needs to answer one batch: the rewards stored with its queries (NaN
  where none), the index its labelling rule's random stream is keyed by, and the queries it still
  has to answer as (query_id, row)."""
  batch_key: str
  oracle_index: Optional[int]
  rewards: np.ndarray  # [B, 2] float64, by row.
  todo: list


MAX_QUERY_ID = 2**63 - 1  # SQLite's INTEGER range: a larger id is no query.


def _query_id(query_id) -> int:
  """A query id as SQLite can hold it; UnknownQuery for anything out of range."""
  if isinstance(query_id, bool) or not isinstance(query_id, (int, np.integer)) or not 0 <= query_id <= MAX_QUERY_ID:
    raise UnknownQuery(f'No query {query_id!r}: ids are integers in [0, 2**63).')
  return int(query_id)


def tie_coin(query_id: int) -> bool:
  """The fair coin that settles a drawn vote: a_preferred, a fixed function of the query id."""
  return bool(hashlib.sha256(f'pilaf-label-queue-tie:{int(query_id)}'.encode()).digest()[0] & 1)


def _is_wal_database(path: str) -> bool:
  """Whether `path` is an SQLite database in WAL mode (header bytes 18-19 = 2), as the run leaves its
  store once created. Until then (an empty file, or a restored copy in rollback mode) another process
  must not open it: opening runs recovery and may change the journal mode under the run."""
  try:
    with open(path, 'rb') as f:
      header = f.read(100)
  except OSError:
    return False
  return len(header) == 100 and header.startswith(b'SQLite format 3\x00') and header[18] == 2 == header[19]


def _float_or_none(x) -> Optional[float]:
  if x is None:
    return None
  x = float(x)
  return None if math.isnan(x) else x


class LabelQueue:
  """The queue in one SQLite file (normally the label store's). Safe to share between threads: each
  thread uses its own connection."""

  def __init__(self, path: str, *, answers_per_query: int = 1, allow_ties: bool = False,
               assignment_timeout_s: float = 600.0):
    if not isinstance(answers_per_query, int) or answers_per_query < 1:
      raise QueueError(f'answers_per_query={answers_per_query!r} must be an integer >= 1.')
    self._setup(path, assignment_timeout_s, create=True)
    self._settle({'answers_per_query': int(answers_per_query), 'allow_ties': bool(allow_ties)})

  @classmethod
  def open_existing(cls, path: str, *, assignment_timeout_s: float = 600.0) -> 'LabelQueue':
    """Opens a queue a run created (for the web server and workers): its settings come from the file.
    Raises QueueError when the file or its queue does not exist (yet)."""
    if not os.path.exists(path):
      raise QueueError(f'{path} does not exist: start the run (python -m pilaf_jax.main) first.')
    if not _is_wal_database(path):
      raise QueueError(f'{path} holds no labelling queue yet (the run is still creating it).')
    queue = cls.__new__(cls)
    queue._setup(path, assignment_timeout_s, create=False)
    settings = queue._settings_in_file()
    if settings is None:
      queue.close()
      raise QueueError(f'{path} holds no labelling queue yet: start the run first.')
    queue.answers_per_query, queue.allow_ties = settings['answers_per_query'], settings['allow_ties']
    return queue

  def _setup(self, path: str, assignment_timeout_s: float, create: bool) -> None:
    if not assignment_timeout_s > 0:
      raise QueueError(f'assignment_timeout_s={assignment_timeout_s!r} must be > 0.')
    self.path = path
    self.assignment_timeout_s = float(assignment_timeout_s)
    self._local = threading.local()
    self._lock = threading.Lock()
    self._connections: list[sqlite3.Connection] = []
    self._pid = os.getpid()
    self._create = create  # open_existing never creates the file or its tables.
    if create:
      from pilaf_jax.labelling.label_store import make_private
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      make_private(path)
      self._db.executescript(_SCHEMA)

  # --- connections and transactions ---
  @property
  def _db(self) -> sqlite3.Connection:
    if os.getpid() != self._pid:  # A forked child: never touch the parent's connections.
      self._pid, self._local, self._connections = os.getpid(), threading.local(), []
    db = getattr(self._local, 'db', None)
    if db is None:
      uri = f'file:{os.path.abspath(self.path)}' + ('' if self._create else '?mode=rw')
      db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                           check_same_thread=False)  # Used by its own thread only; closed by close().
      if self._create:  # Only the run sets the mode (it persists in the file): a second process
        db.execute('PRAGMA journal_mode=WAL')  # switching it while the run creates the file loses writes.
      db.execute('PRAGMA synchronous=FULL')
      db.execute(f'PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}')
      self._local.db = db
      with self._lock:
        self._connections.append(db)
    return db

  @contextlib.contextmanager
  def _write(self, fsync: bool = True) -> Iterator[sqlite3.Connection]:
    """One BEGIN IMMEDIATE transaction, committed on exit, rolled back on any error.

    fsync=False commits with synchronous=NORMAL: durable against any crash of a process (the commit
    is in the WAL file), not against a power loss until the next fsync'd commit in the file (a WAL
    fsync covers every earlier frame). Only function-oracle answers use it: they are recomputed
    identically if lost, and the loop's commit of the labelled batch is fsync'd.
    """
    db = self._db
    if not fsync:
      db.execute('PRAGMA synchronous=NORMAL')
    try:
      db.execute('BEGIN IMMEDIATE')
      try:
        yield db
      except BaseException:
        db.execute('ROLLBACK')
        raise
      db.execute('COMMIT')
    finally:
      if not fsync:
        db.execute('PRAGMA synchronous=FULL')

  @contextlib.contextmanager
  def _read(self) -> Iterator[sqlite3.Connection]:
    """A consistent snapshot for reads spanning several statements."""
    db = self._db
    db.execute('BEGIN')
    try:
      yield db
    finally:
      db.execute('COMMIT')

  def close(self) -> None:
    """Closes every connection this object opened (call when no thread uses it any more)."""
    with self._lock:
      for db in self._connections:
        try:
          db.close()
        except sqlite3.Error:
          pass
      self._connections = []
    self._local = threading.local()

  # --- settings ---
  def _settings_in_file(self) -> Optional[dict]:
    try:
      row = self._db.execute("SELECT value FROM queue_meta WHERE key='settings'").fetchone()
    except sqlite3.OperationalError:  # No queue tables in the file (yet).
      return None
    return None if row is None else json.loads(row[0])

  def _settle(self, settings: dict) -> None:
    with self._write() as db:
      row = db.execute("SELECT value FROM queue_meta WHERE key='settings'").fetchone()
      if row is None:
        db.execute("INSERT INTO queue_meta VALUES ('settings', ?)", (json.dumps(settings),))
        saved = settings
      else:
        saved = json.loads(row[0])
    diff = [f'{k}: {saved.get(k)!r} in the file, {v!r} asked' for k, v in settings.items() if saved.get(k) != v]
    if diff:
      self.close()
      raise QueueSettingsMismatch(f'The labelling queue in {self.path} was created with other settings '
                                  '(labelling.* in the config): ' + '; '.join(diff) + '.')
    self.answers_per_query, self.allow_ties = saved['answers_per_query'], saved['allow_ties']

  # --- labellers (pilaf_jax/labelling/labellers.py; tokens are stored only as hashes) ---
  def add_labeller(self, name: str) -> str:
    """Adds a person and returns a fresh random token; for an existing name, a new token replaces the
    old one (which stops working)."""
    accounts.check_name(name)
    with self._write() as db:
      return accounts.add(db, name)

  def add_oracle_labeller(self, rule: str) -> str:
    """Registers the function oracle of a labelling rule (no token: it never goes through the web
    server) and returns its labeller name, 'oracle:<rule>'. Idempotent."""
    with self._write() as db:
      return accounts.add_oracle(db, rule)

  def labeller_for_token(self, token: str) -> str:
    """The name a token belongs to; UnknownLabeller for a missing or unknown token."""
    return accounts.name_for_token(self._db, token)

  def labellers(self) -> list[str]:
    """Every labeller's name (people and function oracles), sorted."""
    return accounts.names(self._db)

  @staticmethod
  def _require_labeller(db: sqlite3.Connection, labeller: str) -> bool:
    """Whether the labeller is a function oracle (no token); UnknownLabeller if it does not exist."""
    return accounts.require(db, labeller)

  # --- the loop side ---
  def enqueue(self, batch_key: str, step: int, sampler: str, queries: list[dict]) -> None:
    """Writes a batch's queries (see enqueue_batch); a batch_key that exists is left as it is."""
    self.enqueue_batch(batch_key, step, sampler, queries)

  def enqueue_batch(self, batch_key: str, step: int, sampler: str, queries: Sequence[dict], *,
                    oracle_index: Optional[int] = None,
                    also: Optional[Callable[[sqlite3.Connection], None]] = None) -> bool:
    """Writes a batch's queries in one transaction; returns False (and writes nothing, `also`
    included) when batch_key is already in the queue.

    Each query dict: row, prompt_id, prompt_text, response_a_text, response_b_text, source_a,
    source_b, and optionally oracle_reward_a / oracle_reward_b (floats; None or NaN when no function
    oracle exists). oracle_index keys a function oracle's random stream for this batch. `also(db)`
    runs inside the same transaction (the label store writes the batch's arrays with it), so the
    batch and its queries are committed together or not at all.
    """
    if not queries:
      raise QueueError(f'batch {batch_key!r} has no queries.')
    rows = []
    now = time.time()
    for q in queries:
      missing = [k for k in _REQUIRED_KEYS if k not in q]
      if missing:
        raise QueueError(f'batch {batch_key!r}: a query lacks {missing}.')
      rows.append((batch_key, int(q['row']), int(step), sampler, int(q['prompt_id']), str(q['prompt_text']),
                   str(q['response_a_text']), str(q['response_b_text']), int(q['source_a']),
                   int(q['source_b']), _float_or_none(q.get('oracle_reward_a')),
                   _float_or_none(q.get('oracle_reward_b')), now))
    if len({r[1] for r in rows}) != len(rows):
      raise QueueError(f'batch {batch_key!r}: rows repeat.')
    with self._write() as db:
      if db.execute('SELECT 1 FROM queue_batches WHERE batch_key=?', (batch_key,)).fetchone():
        return False
      db.execute('INSERT INTO queue_batches VALUES (?, ?, ?, ?, ?, ?)',
                 (batch_key, int(step), sampler, len(rows), oracle_index, now))
      db.executemany('INSERT INTO queue_queries (batch_key, row, step, sampler, prompt_id, prompt_text, '
                     'response_a_text, response_b_text, source_a, source_b, oracle_reward_a, '
                     'oracle_reward_b, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)', rows)
      if also is not None:
        also(db)
    return True

  def batch_status(self, batch_key: str) -> str:
    """'absent' (never enqueued), 'pending' (a query is unresolved) or 'resolved'."""
    total, resolved = self._db.execute(
        'SELECT COUNT(*), COALESCE(SUM(resolved), 0) FROM queue_queries WHERE batch_key=?',
        (batch_key,)).fetchone()
    return 'absent' if total == 0 else ('resolved' if resolved == total else 'pending')

  def batch_progress(self, batch_key: str) -> tuple[int, int]:
    """(resolved queries, queries) of a batch."""
    total, resolved = self._db.execute(
        'SELECT COUNT(*), COALESCE(SUM(resolved), 0) FROM queue_queries WHERE batch_key=?',
        (batch_key,)).fetchone()
    return int(resolved), int(total)

  def resolved_labels(self, batch_key: str) -> Optional[np.ndarray]:
    """bool [B]: a_preferred of each query by row, once every query of the batch is resolved."""
    rows = self._db.execute('SELECT resolved, a_preferred FROM queue_queries WHERE batch_key=? ORDER BY row',
                            (batch_key,)).fetchall()
    if not rows or not all(r[0] for r in rows):
      return None
    return np.asarray([bool(r[1]) for r in rows], bool)

  def set_loop_step(self, step: int) -> None:
    """Records the loop's current step (shown by the web server)."""
    with self._write() as db:
      db.execute("INSERT OR REPLACE INTO queue_meta VALUES ('loop_step', ?)", (json.dumps(int(step)),))

  def pending_batches(self) -> list[str]:
    """Keys of batches with an unresolved query, oldest first."""
    return [r[0] for r in self._db.execute(
        'SELECT b.batch_key FROM queue_batches b WHERE EXISTS (SELECT 1 FROM queue_queries q '
        'WHERE q.batch_key=b.batch_key AND q.resolved=0) ORDER BY b.rowid')]

  # --- the labeller side ---
  def _query(self, db: sqlite3.Connection, query_id: int) -> Query:
    row = db.execute(f'SELECT {",".join(_QUERY_FIELDS)} FROM queue_queries WHERE query_id=?',
                     (_query_id(query_id),)).fetchone()
    if row is None:
      raise UnknownQuery(f'No query {query_id}.')
    return Query(*row)

  def get_query(self, query_id: int) -> Query:
    """One query by id (UnknownQuery if there is none)."""
    return self._query(self._db, query_id)

  def next_query(self, labeller: str) -> Optional[Query]:
    """The query this labeller should answer next, assigned to it durably; None when none is open.

    The labeller's own assignment comes first (a reload shows the same pair), unless it expired and
    others took the slot; else the oldest unresolved query it has not answered whose deciding answers plus live assignments to others are
    fewer than answers_per_query. Fetching renews the assignment's time.
    """
    now = time.time()
    cutoff = now - self.assignment_timeout_s
    open_slot = ('(SELECT COUNT(*) FROM queue_answers x WHERE x.query_id=q.query_id AND x.choice!=\'skip\') '
                 '+ (SELECT COUNT(*) FROM queue_assignments o WHERE o.query_id=q.query_id AND o.labeller!=? '
                 'AND o.assigned>?) < ?')
    with self._write() as db:
      self._require_labeller(db, labeller)
      # Its own assignment first: live, or expired while nobody else took the slot.
      row = db.execute(
          'SELECT q.query_id FROM queue_queries q JOIN queue_assignments a ON a.query_id=q.query_id '
          f'WHERE q.resolved=0 AND a.labeller=? AND (a.assigned>? OR {open_slot}) ORDER BY q.query_id LIMIT 1',
          (labeller, cutoff, labeller, cutoff, self.answers_per_query)).fetchone()
      if row is None:
        row = db.execute(
            'SELECT q.query_id FROM queue_queries q WHERE q.resolved=0 '
            'AND NOT EXISTS (SELECT 1 FROM queue_answers x WHERE x.query_id=q.query_id AND x.labeller=?) '
            f'AND {open_slot} ORDER BY q.query_id LIMIT 1',
            (labeller, labeller, cutoff, self.answers_per_query)).fetchone()
      if row is None:
        # Nothing new: a query it skipped that nobody else may answer any more (every other labeller
        # has answered it) comes back, or the run would wait for it forever.
        row = db.execute(
            'SELECT q.query_id FROM queue_queries q JOIN queue_answers s ON s.query_id=q.query_id '
            "WHERE q.resolved=0 AND s.labeller=? AND s.choice='skip' "
            "AND (SELECT COUNT(*) FROM queue_answers x WHERE x.query_id=q.query_id AND x.choice!='skip') "
            '+ (SELECT COUNT(*) FROM queue_labellers l WHERE l.name!=? AND NOT EXISTS '
            '(SELECT 1 FROM queue_answers y WHERE y.query_id=q.query_id AND y.labeller=l.name)) < ? '
            f'AND {open_slot} ORDER BY q.query_id LIMIT 1',
            (labeller, labeller, self.answers_per_query, labeller, cutoff, self.answers_per_query)).fetchone()
      if row is None:
        return None
      db.execute('INSERT OR REPLACE INTO queue_assignments VALUES (?, ?, ?)', (row[0], labeller, now))
      return self._query(db, row[0])

  def answer(self, query_id: int, labeller: str, choice: str) -> dict:
    """Records one answer of a labeller to a query assigned to it; commits before returning.

    Raises (changing nothing) BadChoice, UnknownLabeller, UnknownQuery, AlreadyAnswered, NotAssigned
    or QueryResolved. Returns {'query_id', 'resolved': bool, 'a_preferred': Optional[bool]}.
    """
    return self._answer(query_id, labeller, choice, need_assignment=True)

  def oracle_answer(self, query_id: int, labeller: str, choice: str) -> dict:
    """answer() for a function oracle ('oracle:<rule>', see add_oracle_labeller): it needs no
    assignment (it never holds queries), so asking and answering is one transaction, committed
    without an fsync of its own (see _write; a SIGKILL loses nothing that was answered)."""
    return self._answer(query_id, labeller, choice, need_assignment=False)

  def _answer(self, query_id: int, labeller: str, choice: str, need_assignment: bool) -> dict:
    if choice not in CHOICES:
      raise BadChoice(f'choice={choice!r}; allowed: {list(CHOICES)}.')
    if choice == 'tie' and not self.allow_ties:
      raise BadChoice("choice='tie' is off for this run (labelling.allow_ties=False); answer 'a', 'b' "
                      "or 'skip'.")
    query_id = _query_id(query_id)
    with self._write(fsync=need_assignment) as db:  # See _write: function oracles skip the fsync.
      is_oracle = self._require_labeller(db, labeller)
      if not need_assignment and not is_oracle:
        raise NotAssigned(f'{labeller!r} is not a function oracle; people answer queries assigned to them.')
      query = db.execute('SELECT resolved FROM queue_queries WHERE query_id=?', (query_id,)).fetchone()
      if query is None:
        raise UnknownQuery(f'No query {query_id}.')
      prior = db.execute('SELECT choice FROM queue_answers WHERE query_id=? AND labeller=?',
                         (query_id, labeller)).fetchone()
      held = need_assignment and db.execute('SELECT 1 FROM queue_assignments WHERE query_id=? AND labeller=?',
                                            (query_id, labeller)).fetchone() is not None
      # A skip is replaced only by an answer to the same query offered again (see the module doc).
      if prior is not None and not (prior[0] == 'skip' and held):
        raise AlreadyAnswered(f'{labeller!r} has answered query {query_id} already.')
      if query[0]:
        raise QueryResolved(f'Query {query_id} has all its answers already.')
      if need_assignment and not held:
        raise NotAssigned(f'Query {query_id} is not assigned to {labeller!r}; ask for the next query.')
      now = time.time()
      if prior is not None:
        db.execute('DELETE FROM queue_answers WHERE query_id=? AND labeller=?', (query_id, labeller))
      db.execute('INSERT INTO queue_answers (query_id, labeller, choice, time) VALUES (?, ?, ?, ?)',
                 (query_id, labeller, choice, now))
      db.execute('DELETE FROM queue_assignments WHERE query_id=? AND labeller=?', (query_id, labeller))
      return self._resolve_if_complete(db, query_id, now)

  def _votes(self, db: sqlite3.Connection, query_id: int) -> dict:
    votes = dict.fromkeys(CHOICES, 0)
    for c, n in db.execute('SELECT choice, COUNT(*) FROM queue_answers WHERE query_id=? GROUP BY choice',
                           (query_id,)):
      votes[c] = n
    return votes

  def _resolve_if_complete(self, db: sqlite3.Connection, query_id: int, now: float,
                           force: bool = False) -> dict:
    """Resolves the query once answers_per_query deciding answers are in (or now, when `force`)."""
    votes = self._votes(db, query_id)
    if not force and votes['a'] + votes['b'] + votes['tie'] < self.answers_per_query:
      return {'query_id': query_id, 'resolved': False, 'a_preferred': None}
    if votes['a'] != votes['b']:
      a_preferred, how = votes['a'] > votes['b'], 'majority'
    else:
      a_preferred, how = tie_coin(query_id), 'coin'
    if force:
      how = 'dropped'
    db.execute('UPDATE queue_queries SET resolved=1, a_preferred=?, resolution=?, resolved_time=? '
               'WHERE query_id=?', (int(a_preferred), how, now, query_id))
    db.execute('DELETE FROM queue_assignments WHERE query_id=?', (query_id,))
    return {'query_id': query_id, 'resolved': True, 'a_preferred': bool(a_preferred)}

  # --- the run owner's hand on queries that wait ---
  def waiting(self, batch_key: Optional[str] = None, limit: int = 50) -> list[dict]:
    """Unresolved queries (of one batch, or all) and who may still answer them, stuck ones first.

    Each: query_id, batch_key, row, deciding (answers other than skips), needed (answers_per_query),
    holders (live assignments), skipped_by, may_answer (labellers who have not answered it), and
    stuck: the answers still needed exceed the labellers who may give them, so only a skipper (it is
    offered to them again) or the owner (drop / reassign) can finish it.
    """
    cutoff = time.time() - self.assignment_timeout_s
    with self._read() as db:
      sql = 'SELECT query_id, batch_key, row FROM queue_queries WHERE resolved=0'
      args: tuple = ()
      if batch_key is not None:
        sql, args = sql + ' AND batch_key=?', (batch_key,)
      queries = db.execute(sql + ' ORDER BY query_id', args).fetchall()
      names = [r[0] for r in db.execute('SELECT name FROM queue_labellers ORDER BY name')]
      answers: dict = {}
      holders: dict = {}
      if queries:
        first = queries[0][0]
        for qid, name, choice in db.execute('SELECT query_id, labeller, choice FROM queue_answers '
                                            'WHERE query_id>=? ORDER BY answer_id', (first,)):
          answers.setdefault(qid, {})[name] = choice
        for qid, name in db.execute('SELECT query_id, labeller FROM queue_assignments WHERE query_id>=? '
                                    'AND assigned>? ORDER BY labeller', (first, cutoff)):
          holders.setdefault(qid, []).append(name)
    out = []
    for qid, key, row in queries:
      given = answers.get(qid, {})
      deciding = sum(c != 'skip' for c in given.values())
      may_answer = [n for n in names if n not in given]
      out.append({'query_id': qid, 'batch_key': key, 'row': row, 'deciding': deciding,
                  'needed': self.answers_per_query, 'holders': holders.get(qid, []),
                  'skipped_by': sorted(n for n, c in given.items() if c == 'skip'), 'may_answer': may_answer,
                  'stuck': deciding + len(may_answer) < self.answers_per_query})
    out.sort(key=lambda w: (not w['stuck'], w['query_id']))
    return out[:limit]

  def drop(self, query_id: int) -> dict:
    """Stops waiting for a query: resolves it now from the deciding answers it has (the majority;
    the query's coin on a draw or when it has none), recorded as resolution 'dropped'. Returns what
    answer() returns; UnknownQuery / QueryResolved otherwise."""
    query_id = _query_id(query_id)
    with self._write() as db:
      row = db.execute('SELECT resolved FROM queue_queries WHERE query_id=?', (query_id,)).fetchone()
      if row is None:
        raise UnknownQuery(f'No query {query_id}.')
      if row[0]:
        raise QueryResolved(f'Query {query_id} has all its answers already.')
      return self._resolve_if_complete(db, query_id, time.time(), force=True)

  def reassign(self, query_id: int, labeller: str) -> None:
    """Gives `labeller` (a person who has not given a deciding answer to it) the query on their next
    fetch, whatever the other assignments; a skip of theirs is replaced by their answer."""
    query_id = _query_id(query_id)
    with self._write() as db:
      if self._require_labeller(db, labeller):
        raise QueueError(f'{labeller!r} is a function oracle; reassign to a person.')
      row = db.execute('SELECT resolved FROM queue_queries WHERE query_id=?', (query_id,)).fetchone()
      if row is None:
        raise UnknownQuery(f'No query {query_id}.')
      if row[0]:
        raise QueryResolved(f'Query {query_id} has all its answers already.')
      prior = db.execute('SELECT choice FROM queue_answers WHERE query_id=? AND labeller=?',
                         (query_id, labeller)).fetchone()
      if prior is not None and prior[0] != 'skip':
        raise AlreadyAnswered(f'{labeller!r} has answered query {query_id} already.')
      db.execute('INSERT OR REPLACE INTO queue_assignments VALUES (?, ?, ?)', (query_id, labeller, time.time()))

  def skipped(self, query_id: int, labeller: str) -> bool:
    """Whether the labeller's answer to the query is a skip (it is being offered to them again)."""
    row = self._db.execute('SELECT choice FROM queue_answers WHERE query_id=? AND labeller=?',
                           (_query_id(query_id), labeller)).fetchone()
    return row is not None and row[0] == 'skip'

  def oracle_work(self, batch_key: str, labeller: str) -> Optional[OracleWork]:
    """A batch's stored rewards and the unresolved queries `labeller` has not answered (None when the
    batch is not in the queue)."""
    with self._read() as db:
      meta = db.execute('SELECT oracle_index FROM queue_batches WHERE batch_key=?', (batch_key,)).fetchone()
      if meta is None:
        return None
      rows = db.execute(
          'SELECT q.query_id, q.row, q.oracle_reward_a, q.oracle_reward_b, q.resolved, '
          'EXISTS (SELECT 1 FROM queue_answers x WHERE x.query_id=q.query_id AND x.labeller=?) '
          'FROM queue_queries q WHERE q.batch_key=? ORDER BY q.row', (labeller, batch_key)).fetchall()
    rewards = np.asarray([[np.nan if r[2] is None else r[2], np.nan if r[3] is None else r[3]] for r in rows],
                         np.float64)
    todo = [(r[0], r[1]) for r in rows if not r[4] and not r[5]]
    return OracleWork(batch_key, meta[0], rewards, todo)

  # --- reports ---
  def answers(self, labeller: Optional[str] = None) -> list[dict]:
    """Every stored answer in commit order (optionally one labeller's), as {'query_id', 'labeller',
    'choice' (storage order), 'time'}."""
    sql = 'SELECT query_id, labeller, choice, time FROM queue_answers'
    rows = (self._db.execute(sql + ' ORDER BY answer_id') if labeller is None else
            self._db.execute(sql + ' WHERE labeller=? ORDER BY answer_id', (labeller,)))
    return [{'query_id': r[0], 'labeller': r[1], 'choice': r[2], 'time': r[3]} for r in rows]

  def answer_count(self, labeller: str) -> int:
    """How many answers (any choice) a labeller has given."""
    return int(self._db.execute('SELECT COUNT(*) FROM queue_answers WHERE labeller=?',
                                (labeller,)).fetchone()[0])

  def progress(self) -> dict:
    """{'answered': resolved queries, 'pending': unresolved, 'loop_step': int or None, 'answers': total}."""
    with self._read() as db:
      resolved, total = db.execute(
          'SELECT COALESCE(SUM(resolved), 0), COUNT(*) FROM queue_queries').fetchone()
      answers = db.execute('SELECT COUNT(*) FROM queue_answers').fetchone()[0]
      step = db.execute("SELECT value FROM queue_meta WHERE key='loop_step'").fetchone()
    return {'answered': int(resolved), 'pending': int(total - resolved),
            'loop_step': None if step is None else json.loads(step[0]), 'answers': int(answers)}

  def labeller_report(self) -> dict:
    """Answers, skips, ties and agreement per labeller and per pair of labellers (see
    pilaf_jax/labelling/agreement.py)."""
    with self._read() as db:
      return agreement.labeller_report(db)

  def counts(self) -> dict:
    """Queries enqueued and resolved, answers given, and answers beyond what resolution needed
    (deciding answers past answers_per_query: 0 unless the queue's invariants broke)."""
    return queue_counts(self._db)


def describe_waiting(waiting: list[dict], limit: int = 4) -> str:
  """One line on what a batch waits for (LabelQueue.waiting's rows): each open query, its answers,
  who holds it, who skipped it and who may still answer it."""
  if not waiting:
    return 'no query is open'
  parts = []
  for w in waiting[:limit]:
    bits = [f'row {w["row"]}', f'{w["deciding"]}/{w["needed"]} answers']
    if w['holders']:
      bits.append('on screen for ' + ', '.join(w['holders']))
    if w['skipped_by']:
      bits.append('skipped by ' + ', '.join(w['skipped_by']))
    bits.append('may answer: ' + (', '.join(w['may_answer']) or 'nobody'))
    if w['stuck'] and w['skipped_by']:
      bits.append(f'needs {" or ".join(w["skipped_by"])} again (offered back once they have nothing else; '
                  'the owner page can drop or reassign it)')
    elif w['stuck']:
      bits.append('fewer labellers than answers needed: add one, or drop it on the owner page')
    parts.append(f'query {w["query_id"]} ({"; ".join(bits)})')
  more = f' and {len(waiting) - limit} more' if len(waiting) > limit else ''
  return ', '.join(parts) + more


def queue_counts(db: sqlite3.Connection) -> dict:
  """LabelQueue.counts() on any connection to the file (zeros when it holds no queue)."""
  have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
  if 'queue_queries' not in have:
    return {'queries': 0, 'resolved': 0, 'answers': 0, 'excess_answers': 0}
  settings = db.execute("SELECT value FROM queue_meta WHERE key='settings'").fetchone()
  k = json.loads(settings[0])['answers_per_query'] if settings else 1
  queries, resolved = db.execute('SELECT COUNT(*), COALESCE(SUM(resolved), 0) FROM queue_queries').fetchone()
  answers = db.execute('SELECT COUNT(*) FROM queue_answers').fetchone()[0]
  excess = db.execute(
      "SELECT COALESCE(SUM(MAX(n - ?, 0)), 0) FROM (SELECT COUNT(*) AS n FROM queue_answers "
      "WHERE choice != 'skip' GROUP BY query_id)", (k,)).fetchone()[0]
  return {'queries': int(queries), 'resolved': int(resolved), 'answers': int(answers),
          'excess_answers': int(excess)}
