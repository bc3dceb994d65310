"""What the labelling queue stores: its tables, a query as a labeller sees it, what a function
oracle needs to answer a batch, and the fixed rules on ids and drawn votes. No connection is kept
here: the functions take one (see queue.py for the transactions around them)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sqlite3
from typing import Optional, Sequence

import numpy as np

from pilaf_jax.labelling.queue_errors import BadChoice, QueueError, UnknownQuery

CHOICES = ('a', 'b', 'tie', 'skip')  # Always in STORAGE order (response_a / response_b of the pair).


SCHEMA = """
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
QUERY_FIELDS = ('query_id', 'batch_key', 'row', 'step', 'sampler', 'prompt_id', 'prompt_text',
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


def check_query_id(query_id) -> int:
  """A query id as SQLite can hold it; UnknownQuery for anything out of range."""
  if isinstance(query_id, bool) or not isinstance(query_id, (int, np.integer)) or not 0 <= query_id <= MAX_QUERY_ID:
    raise UnknownQuery(f'No query {query_id!r}: ids are integers in [0, 2**63).')
  return int(query_id)


def check_choice(choice: str, allow_ties: bool) -> None:
  """BadChoice unless `choice` is one of CHOICES, and allowed ('tie' only when ties are on)."""
  if choice not in CHOICES:
    raise BadChoice(f'choice={choice!r}; allowed: {list(CHOICES)}.')
  if choice == 'tie' and not allow_ties:
    raise BadChoice("choice='tie' is off for this run (labelling.allow_ties=False); answer 'a', 'b' "
                    "or 'skip'.")


def tie_coin(query_id: int) -> bool:
  """The fair coin that settles a drawn vote: a_preferred, a fixed function of the query id."""
  return bool(hashlib.sha256(f'pilaf-label-queue-tie:{int(query_id)}'.encode()).digest()[0] & 1)


def _float_or_none(x) -> Optional[float]:
  if x is None:
    return None
  x = float(x)
  return None if math.isnan(x) else x


def _votes(db: sqlite3.Connection, query_id: int) -> dict:
  votes = dict.fromkeys(CHOICES, 0)
  for c, n in db.execute('SELECT choice, COUNT(*) FROM queue_answers WHERE query_id=? GROUP BY choice',
                         (query_id,)):
    votes[c] = n
  return votes


def resolve_if_complete(db: sqlite3.Connection, query_id: int, answers_per_query: int, now: float,
                        force: bool = False) -> dict:
  """Resolves the query once answers_per_query deciding answers are in (or now, when `force`)."""
  votes = _votes(db, query_id)
  if not force and votes['a'] + votes['b'] + votes['tie'] < answers_per_query:
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


def query_rows(batch_key: str, step: int, sampler: str, queries: Sequence[dict], now: float) -> list[tuple]:
  """A batch's queries as rows of queue_queries (after query_id); QueueError when one lacks a field
  or rows repeat. Each query dict: row, prompt_id, prompt_text, response_a_text, response_b_text,
  source_a, source_b, and optionally oracle_reward_a / oracle_reward_b (None or NaN: no reward)."""
  if not queries:
    raise QueueError(f'batch {batch_key!r} has no queries.')
  rows = []
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
  return rows


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


def queue_progress(db: sqlite3.Connection) -> dict:
  """LabelQueue.progress() on the caller's snapshot."""
  resolved, total = db.execute('SELECT COALESCE(SUM(resolved), 0), COUNT(*) FROM queue_queries').fetchone()
  answers = db.execute('SELECT COUNT(*) FROM queue_answers').fetchone()[0]
  step = db.execute("SELECT value FROM queue_meta WHERE key='loop_step'").fetchone()
  return {'answered': int(resolved), 'pending': int(total - resolved),
          'loop_step': None if step is None else json.loads(step[0]), 'answers': int(answers)}


def oracle_work(db: sqlite3.Connection, batch_key: str, labeller: str) -> Optional[OracleWork]:
  """LabelQueue.oracle_work on the caller's snapshot."""
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
