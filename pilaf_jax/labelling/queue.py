"""The labelling queue: pending preference queries, who is working on them, and every answer.

The loop writes each sampled batch's pairs as queries (prompt and both responses as text, their
sources, the step that asked) and later takes the batch back once every query is resolved. Oracles
answer asynchronously through one call, `answer()`: people through the labelling web server,
function oracles (the synthetic task's reward, reward models, judges) under a labeller name like
'oracle:bradley_terry'. So there is one path for every oracle, and one place where an answer lives.

Storage: the label store's SQLite file, in its own `queue_*` tables (set up by sqlite_db.py). Every
write is one `BEGIN IMMEDIATE` transaction committed before the call returns, so a crash of any
process (loop, worker, server) loses no answer that a caller was told about, and the constraints (one answer per labeller and query, at most `answers_per_query` deciding answers) hold
whatever order concurrent writers commit in. Function oracles' answers skip the fsync (see
LabelQueue._write): one per answer would cost as much as a training step, and they are
recomputable. Each thread and each process gets its own connection (sqlite_db.PerThreadConnections).

Resolution: a query is resolved once `answers_per_query` answers other than 'skip' are in. The
majority of 'a' / 'b' wins; a draw ('tie' votes, or as many 'a' as 'b') is settled by a fair coin
keyed by the query id (deterministic), and recorded as such. Choices are always in storage order
(response_a / response_b of the pair); a server that shows them in another order maps back first.

Assignments: `next_query` hands a labeller the oldest unresolved query it has not answered whose
deciding answers plus live assignments to others are fewer than `answers_per_query`, and records the
assignment durably. An assignment unanswered for `assignment_timeout_s` expires: the query goes to
someone else, and a late answer from the first labeller is still accepted while the query is
unresolved (it is never lost; once the query is resolved it gets QueryResolved).

Skips: a skip is stored as that labeller's answer and hands the query to someone else; a query
nobody else may answer any more goes back to the skipper (see queue_owner.py), and the run owner
can `drop()` or `reassign()` it.

Beside this module: queue_records.py (tables, Query, the tie coin), labellers.py (accounts and
tokens), agreement.py (the owner's agreement statistics), queue_owner.py (what waits, and why),
queue_errors.py (what is refused, with the HTTP status the web server answers), sqlite_db.py
(connections and transactions).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Callable, Optional, Sequence

import numpy as np

from pilaf_jax.labelling import agreement, queue_owner, sqlite_db
from pilaf_jax.labelling import labellers as accounts
from pilaf_jax.labelling.labellers import ORACLE_PREFIX  # noqa: F401  (part of this module's API)
from pilaf_jax.labelling.queue_errors import (AlreadyAnswered, BadChoice, NotAssigned,  # noqa: F401
                                              QueryResolved, QueueError, QueueSettingsMismatch,
                                              UnknownLabeller, UnknownQuery)
from pilaf_jax.labelling.queue_owner import describe_waiting  # noqa: F401  (part of this module's API)
from pilaf_jax.labelling.queue_records import (CHOICES, MAX_QUERY_ID, QUERY_FIELDS, SCHEMA,  # noqa: F401
                                               OracleWork, Query, check_choice, check_query_id,
                                               oracle_work, query_rows, queue_counts,
                                               queue_progress, resolve_if_complete, tie_coin)


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
    if not sqlite_db.is_wal_database(path):
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
    # open_existing never creates the file or its tables, nor sets its journal mode.
    self._connections = sqlite_db.PerThreadConnections(path, create=create)
    if create:
      sqlite_db.create_private(path)
      self._db.executescript(SCHEMA)

  # --- connections and transactions (sqlite_db.py) ---
  @property
  def _db(self) -> sqlite3.Connection:
    return self._connections.get()

  def _write(self, fsync: bool = True):
    """One BEGIN IMMEDIATE transaction (sqlite_db.write). Only function oracles' answers skip the
    fsync: they are recomputed identically if lost, and the loop's commit of the batch is fsync'd."""
    return sqlite_db.write(self._db, fsync)

  def _read(self):  # A consistent snapshot for reads spanning several statements.
    return sqlite_db.snapshot(self._db)

  def close(self) -> None:
    """Closes every connection this object opened (call when no thread uses it any more)."""
    self._connections.close()

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
    now = time.time()
    rows = query_rows(batch_key, step, sampler, queries, now)
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
    row = db.execute(f'SELECT {",".join(QUERY_FIELDS)} FROM queue_queries WHERE query_id=?',
                     (check_query_id(query_id),)).fetchone()
    if row is None:
      raise UnknownQuery(f'No query {query_id}.')
    return Query(*row)

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
      accounts.require(db, labeller)
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
    check_choice(choice, self.allow_ties)
    query_id = check_query_id(query_id)
    with self._write(fsync=need_assignment) as db:  # See _write: function oracles skip the fsync.
      is_oracle = accounts.require(db, labeller)
      if not need_assignment and not is_oracle:
        raise NotAssigned(f'{labeller!r} is not a function oracle; people answer queries assigned to them.')
      resolved = self._is_resolved(db, query_id)
      prior = self._prior_choice(db, query_id, labeller)
      held = need_assignment and db.execute('SELECT 1 FROM queue_assignments WHERE query_id=? AND labeller=?',
                                            (query_id, labeller)).fetchone() is not None
      # A skip is replaced only by an answer to the same query offered again (see the module doc).
      if prior is not None and not (prior == 'skip' and held):
        raise AlreadyAnswered(f'{labeller!r} has answered query {query_id} already.')
      if resolved:
        raise QueryResolved(f'Query {query_id} has all its answers already.')
      if need_assignment and not held:
        raise NotAssigned(f'Query {query_id} is not assigned to {labeller!r}; ask for the next query.')
      now = time.time()
      if prior is not None:
        db.execute('DELETE FROM queue_answers WHERE query_id=? AND labeller=?', (query_id, labeller))
      db.execute('INSERT INTO queue_answers (query_id, labeller, choice, time) VALUES (?, ?, ?, ?)',
                 (query_id, labeller, choice, now))
      db.execute('DELETE FROM queue_assignments WHERE query_id=? AND labeller=?', (query_id, labeller))
      return resolve_if_complete(db, query_id, self.answers_per_query, now)

  @staticmethod
  def _is_resolved(db: sqlite3.Connection, query_id: int) -> bool:
    """Whether the query is resolved; UnknownQuery when there is none."""
    row = db.execute('SELECT resolved FROM queue_queries WHERE query_id=?', (query_id,)).fetchone()
    if row is None:
      raise UnknownQuery(f'No query {query_id}.')
    return bool(row[0])

  def _require_open(self, db: sqlite3.Connection, query_id: int) -> None:
    if self._is_resolved(db, query_id):
      raise QueryResolved(f'Query {query_id} has all its answers already.')

  @staticmethod
  def _prior_choice(db: sqlite3.Connection, query_id: int, labeller: str) -> Optional[str]:
    row = db.execute('SELECT choice FROM queue_answers WHERE query_id=? AND labeller=?',
                     (query_id, labeller)).fetchone()
    return None if row is None else row[0]

  # --- the run owner's hand on queries that wait ---
  def waiting(self, batch_key: Optional[str] = None, limit: int = 50) -> list[dict]:
    """Unresolved queries (of one batch, or all) and who may still answer them, stuck ones first.

    Each: query_id, batch_key, row, deciding (answers other than skips), needed (answers_per_query),
    holders (live assignments), skipped_by, may_answer (labellers who have not answered it), and
    stuck: the answers still needed exceed the labellers who may give them, so only a skipper (it is
    offered to them again) or the owner (drop / reassign) can finish it.
    """
    with self._read() as db:
      return queue_owner.waiting(db, self.answers_per_query, time.time() - self.assignment_timeout_s,
                                 batch_key, limit)

  def drop(self, query_id: int) -> dict:
    """Stops waiting for a query: resolves it now from the deciding answers it has (the majority;
    the query's coin on a draw or when it has none), recorded as resolution 'dropped'. Returns what
    answer() returns; UnknownQuery / QueryResolved otherwise."""
    query_id = check_query_id(query_id)
    with self._write() as db:
      self._require_open(db, query_id)
      return resolve_if_complete(db, query_id, self.answers_per_query, time.time(), force=True)

  def reassign(self, query_id: int, labeller: str) -> None:
    """Gives `labeller` (a person who has not given a deciding answer to it) the query on their next
    fetch, whatever the other assignments; a skip of theirs is replaced by their answer."""
    query_id = check_query_id(query_id)
    with self._write() as db:
      if accounts.require(db, labeller):
        raise QueueError(f'{labeller!r} is a function oracle; reassign to a person.')
      self._require_open(db, query_id)
      if self._prior_choice(db, query_id, labeller) not in (None, 'skip'):
        raise AlreadyAnswered(f'{labeller!r} has answered query {query_id} already.')
      db.execute('INSERT OR REPLACE INTO queue_assignments VALUES (?, ?, ?)', (query_id, labeller, time.time()))

  def skipped(self, query_id: int, labeller: str) -> bool:
    """Whether the labeller's answer to the query is a skip (it is being offered to them again)."""
    return self._prior_choice(self._db, check_query_id(query_id), labeller) == 'skip'

  def oracle_work(self, batch_key: str, labeller: str) -> Optional[OracleWork]:
    """A batch's stored rewards and the unresolved queries `labeller` has not answered (None when the
    batch is not in the queue)."""
    with self._read() as db:
      return oracle_work(db, batch_key, labeller)

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
      return queue_progress(db)

  def labeller_report(self) -> dict:
    """Answers, skips, ties and agreement per labeller and per pair of labellers (see
    pilaf_jax/labelling/agreement.py)."""
    with self._read() as db:
      return agreement.labeller_report(db)

  def counts(self) -> dict:
    """Queries enqueued and resolved, answers given, and answers beyond what resolution needed
    (deciding answers past answers_per_query: 0 unless the queue's invariants broke)."""
    return queue_counts(self._db)
