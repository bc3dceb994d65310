"""The durable store of every labelled batch (SQLite, in the workdir), and of batches awaiting labels.

Labels are the expensive resource, so the store is the source of truth for labelled data: a batch is
committed (fsync'd, WAL mode, synchronous=FULL) before any update uses it, and holds everything the
update needs (responses, masks, both models' per-token log-probs, labels). After a crash the loop
reads stored batches back instead of asking the oracle again.

The labelling queue (queue.py) lives in the same file. A sampled batch is first written as a
*pending* batch (its arrays, and the oracle's rewards when a function oracle exists) in the same
transaction as its queries, before any oracle sees them; once every query is resolved the loop moves
it, with its labels, into `batches`/`pairs` in one transaction. So a crash at any moment leaves
either nothing of a batch (it is sampled again, identically) or all of it.

`oracle_queries` is the query log of runs made before the queue (a row per batch asked, written
before the oracle was called); it is still counted, and no longer written.
"""
from __future__ import annotations

import enum
import json
import os
import sqlite3
import time
from typing import Iterator, Optional

import numpy as np

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost
from pilaf_jax.labelling import sqlite_db
from pilaf_jax.labelling.queue_records import queue_counts

# Labelled batches (batches, pairs) and batches waiting for labels (pending_*) have the same columns,
# but for the label, which sits before the oracle's rewards (INSERTs below rely on the order).
_BATCH_COLUMNS = """
  batch_key TEXT PRIMARY KEY, step INTEGER NOT NULL, sampler TEXT NOT NULL, num_pairs INTEGER NOT NULL,
  prompt_len INTEGER NOT NULL, response_len INTEGER NOT NULL, cost TEXT NOT NULL, time REAL NOT NULL"""
_PAIR_ARRAYS = """
  batch_key TEXT NOT NULL, row INTEGER NOT NULL, prompt_id INTEGER NOT NULL,
  prompt BLOB NOT NULL, prompt_mask BLOB NOT NULL,
  response_a BLOB NOT NULL, response_b BLOB NOT NULL, mask_a BLOB NOT NULL, mask_b BLOB NOT NULL,
  policy_logprobs_a BLOB NOT NULL, policy_logprobs_b BLOB NOT NULL,
  ref_logprobs_a BLOB NOT NULL, ref_logprobs_b BLOB NOT NULL,
  source_a INTEGER NOT NULL, source_b INTEGER NOT NULL,"""
_PAIR_TAIL = """
  oracle_reward_a REAL, oracle_reward_b REAL,
  PRIMARY KEY (batch_key, row)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_batches ({_BATCH_COLUMNS});
CREATE TABLE IF NOT EXISTS pending_pairs ({_PAIR_ARRAYS}{_PAIR_TAIL});
CREATE TABLE IF NOT EXISTS oracle_queries (
  id INTEGER PRIMARY KEY AUTOINCREMENT, batch_key TEXT NOT NULL, num_pairs INTEGER NOT NULL,
  pid INTEGER NOT NULL, time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches ({_BATCH_COLUMNS});
CREATE TABLE IF NOT EXISTS pairs ({_PAIR_ARRAYS} a_preferred INTEGER NOT NULL,{_PAIR_TAIL});
"""
_ARRAY_COLUMNS = {  # column -> (PairBatch field, pair index or None, dtype)
    'prompt': ('prompt_tokens', None, np.int32), 'prompt_mask': ('prompt_mask', None, np.bool_),
    'response_a': ('responses', 0, np.int32), 'response_b': ('responses', 1, np.int32),
    'mask_a': ('response_mask', 0, np.bool_), 'mask_b': ('response_mask', 1, np.bool_),
    'policy_logprobs_a': ('policy_logprobs', 0, np.float32),
    'policy_logprobs_b': ('policy_logprobs', 1, np.float32),
    'ref_logprobs_a': ('ref_logprobs', 0, np.float32), 'ref_logprobs_b': ('ref_logprobs', 1, np.float32),
}
_PAIR_COLUMNS = ('batch_key, row, prompt_id, ' + ', '.join(_ARRAY_COLUMNS) +
                 ', source_a, source_b, oracle_reward_a, oracle_reward_b')


def empty_preference_batch(n: int, prompt_len: int, response_len: int) -> PreferenceBatch:
  """Zeros shaped and typed like LabelStore.get's batch of n pairs (what a process that does not
  hold the store passes to a broadcast from the one that does)."""
  z = lambda shape, dtype: np.zeros(shape, dtype)
  pairs = PairBatch(
      prompts=PromptBatch(z((n, prompt_len), np.int32), z((n, prompt_len), np.bool_), z((n,), np.int32)),
      responses=z((n, 2, response_len), np.int32), response_mask=z((n, 2, response_len), np.bool_),
      policy_logprobs=z((n, 2, response_len), np.float32), ref_logprobs=z((n, 2, response_len), np.float32),
      source=z((n, 2), np.int8),
      cost=SamplingCost(**{name: np.int32(0) for name in SamplingCost.__dataclass_fields__}))
  return PreferenceBatch(pairs, z((n,), bool))


def _reward(x) -> Optional[float]:
  """A reward for SQLite: NaN (no function oracle) is stored as NULL."""
  x = float(x)
  return None if np.isnan(x) else x


class BatchStatus(enum.IntEnum):
  """What waiting for a batch's labels came to (the values travel between processes as int32)."""
  STOPPED = 0  # should_stop() turned true while waiting: no batch.
  LABELLED_BEFORE = 1  # The store held the labelled batch already (a resumed run).
  RESOLVED_NOW = 2  # Its queries were resolved while waiting, and the batch committed now.


class LabelStoreMismatch(ValueError):
  """The store was written under another config; names the differing fields."""


class LabelStore:
  """Oracle answers keyed by batch ('online/000123', 'iteration2/chunk0004', ...)."""

  def __init__(self, path: str, fingerprint: dict, *, defaults: Optional[dict] = None):
    """defaults: the fingerprint of the default config; a field the stored fingerprint lacks (added
    to the code since the store was written) matches when it has its default value."""
    sqlite_db.create_private(path)
    self.path = path
    # One connection, one thread: the queue's other writers (web server, workers) have their own.
    self._db = sqlite_db.connect(path, create=True)
    self._db.executescript(_SCHEMA)
    self._check_fingerprint(fingerprint, defaults or {})

  def _check_fingerprint(self, fingerprint: dict, defaults: dict) -> None:
    from pilaf_jax.config_validation import differing_fields
    row = self._db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
    if row is None:
      with self._transaction():
        self._db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (json.dumps(fingerprint),))
      return
    saved = json.loads(row[0])
    same = lambda a, b: json.loads(json.dumps(a)) == json.loads(json.dumps(b))
    current = {k: v for k, v in fingerprint.items()
               if k in saved or k not in defaults or not same(defaults[k], v)}
    diff = differing_fields(saved, current)
    if diff:
      raise LabelStoreMismatch(f'The label store {self.path} was written under another config; '
                               'refusing to mix labels. Differing fields:\n  ' + '\n  '.join(diff))

  def _transaction(self):
    return sqlite_db.write(self._db)

  def close(self) -> None:
    self._db.close()

  # --- writing ---
  @staticmethod
  def _pair_rows(batch_key: str, pairs: PairBatch, oracle_rewards: Optional[np.ndarray]) -> list[tuple]:
    """One tuple per pair in _PAIR_COLUMNS order (arrays as raw bytes: bit-exact round trips)."""
    arrays = {'prompt_tokens': np.asarray(pairs.prompts.tokens), 'prompt_mask': np.asarray(pairs.prompts.mask)}
    prompt_ids = np.asarray(pairs.prompts.ids)
    for name in ('responses', 'response_mask', 'policy_logprobs', 'ref_logprobs'):
      arrays[name] = np.asarray(getattr(pairs, name))
    source = np.asarray(pairs.source)
    b = arrays['responses'].shape[0]
    rewards = (np.full((b, 2), np.nan) if oracle_rewards is None else np.asarray(oracle_rewards, np.float64))
    rows = []
    for i in range(b):
      blobs = []
      for field, idx, dtype in _ARRAY_COLUMNS.values():
        x = arrays[field][i] if idx is None else arrays[field][i, idx]
        blobs.append(np.ascontiguousarray(x, dtype).tobytes())
      rows.append((batch_key, i, int(prompt_ids[i]), *blobs, int(source[i, 0]), int(source[i, 1]),
                   _reward(rewards[i, 0]), _reward(rewards[i, 1])))
    return rows

  @staticmethod
  def _batch_row(batch_key: str, step: int, sampler: str, pairs: PairBatch) -> tuple:
    b, _, r = np.shape(pairs.responses)
    return (batch_key, step, sampler, b, np.shape(pairs.prompts.tokens)[1], r, json.dumps(pairs.cost.as_dict()),
            time.time())

  def put(self, batch_key: str, step: int, sampler: str, labelled: PreferenceBatch,
          oracle_rewards: Optional[np.ndarray]) -> None:
    """Writes one labelled batch atomically; returns after the commit reached the disk.
    oracle_rewards: [B, 2], or None (stored as NaN) when no function oracle exists."""
    label = np.asarray(labelled.a_preferred)
    rows = [(*r[:-2], int(label[r[1]]), *r[-2:])
            for r in self._pair_rows(batch_key, labelled.pairs, oracle_rewards)]
    with self._transaction():
      self._db.execute('INSERT INTO batches VALUES (?,?,?,?,?,?,?,?)',
                       self._batch_row(batch_key, step, sampler, labelled.pairs))
      self._db.executemany(f'INSERT INTO pairs VALUES ({",".join("?" * (len(_ARRAY_COLUMNS) + 8))})', rows)

  def put_pending(self, queue, batch_key: str, step: int, sampler: str, pairs: PairBatch,
                  oracle_rewards: Optional[np.ndarray], queries: list[dict],
                  oracle_index: Optional[int] = None) -> bool:
    """Writes a sampled batch's arrays and enqueues its queries in ONE transaction (through the
    queue's connection to this file); returns False, writing nothing, when the queue already holds
    batch_key. queue: a LabelQueue on this store's file."""
    if os.path.abspath(queue.path) != os.path.abspath(self.path):
      raise ValueError(f'The queue ({queue.path}) must live in the label store\'s file ({self.path}).')
    rows = self._pair_rows(batch_key, pairs, oracle_rewards)
    batch_row = self._batch_row(batch_key, step, sampler, pairs)

    def write(db: sqlite3.Connection) -> None:
      db.execute('INSERT INTO pending_batches VALUES (?,?,?,?,?,?,?,?)', batch_row)
      db.executemany(f'INSERT INTO pending_pairs ({_PAIR_COLUMNS}) VALUES '
                     f'({",".join("?" * (len(_ARRAY_COLUMNS) + 7))})', rows)
    return queue.enqueue_batch(batch_key, step, sampler, queries, oracle_index=oracle_index, also=write)

  def commit_resolved(self, batch_key: str, a_preferred: np.ndarray) -> bool:
    """Moves a pending batch, with its labels [B] (by row), into the labelled batches, in one
    transaction; returns False when it is labelled already (a no-op)."""
    label = np.asarray(a_preferred, bool)
    with self._transaction():
      if self._db.execute('SELECT 1 FROM batches WHERE batch_key=?', (batch_key,)).fetchone():
        return False
      meta = self._db.execute('SELECT num_pairs FROM pending_batches WHERE batch_key=?', (batch_key,)).fetchone()
      if meta is None:
        raise KeyError(f'Label store {self.path} holds no pending batch {batch_key!r}.')
      if label.shape != (meta[0],):
        raise ValueError(f'{batch_key}: {label.shape} labels for {meta[0]} pairs.')
      self._db.execute('INSERT INTO batches SELECT batch_key, step, sampler, num_pairs, prompt_len, '
                       'response_len, cost, ? FROM pending_batches WHERE batch_key=?',
                       (time.time(), batch_key))  # batches.time: when the labels were committed.
      self._db.executemany(
          f'INSERT INTO pairs ({_PAIR_COLUMNS}, a_preferred) SELECT {_PAIR_COLUMNS}, ? FROM pending_pairs '
          'WHERE batch_key=? AND row=?', [(int(label[i]), batch_key, i) for i in range(meta[0])])
      self._db.execute('DELETE FROM pending_pairs WHERE batch_key=?', (batch_key,))
      self._db.execute('DELETE FROM pending_batches WHERE batch_key=?', (batch_key,))
    return True

  # --- reading ---
  def _read(self, batch_key: str):
    """A labelled batch's (PairBatch of numpy arrays, a_preferred [B], oracle rewards [B, 2]) or None."""
    meta = self._db.execute('SELECT num_pairs, prompt_len, response_len, cost FROM batches '
                            'WHERE batch_key=?', (batch_key,)).fetchone()
    if meta is None:
      return None
    b, p, r, cost = meta
    columns = list(_ARRAY_COLUMNS)
    rows = self._db.execute(f'SELECT {",".join(columns)}, source_a, source_b, a_preferred, '
                            'oracle_reward_a, oracle_reward_b, prompt_id FROM pairs WHERE batch_key=? '
                            'ORDER BY row', (batch_key,)).fetchall()
    if len(rows) != b:
      raise RuntimeError(f'Label store {self.path} batch {batch_key} has {len(rows)} of {b} pairs.')
    decoded = {c: np.stack([np.frombuffer(row[j], _ARRAY_COLUMNS[c][2]) for row in rows])
               for j, c in enumerate(columns)}
    k = len(columns)
    tail = [row[k:] for row in rows]  # source_a, source_b, a_preferred, reward_a, reward_b, prompt_id
    column = lambda lo, hi, dtype: np.asarray([t[lo:hi] for t in tail], dtype)
    rewards = np.asarray([[np.nan if x is None else x for x in t[3:5]] for t in tail], np.float64)
    both = lambda a, bb: np.stack([decoded[a], decoded[bb]], axis=1)
    cost = SamplingCost(**{name: np.int32(v) for name, v in json.loads(cost).items()})
    batch = PairBatch(
        prompts=PromptBatch(decoded['prompt'].reshape(b, p), decoded['prompt_mask'].reshape(b, p),
                            column(5, 6, np.int32)[:, 0]),
        responses=both('response_a', 'response_b'), response_mask=both('mask_a', 'mask_b'),
        policy_logprobs=both('policy_logprobs_a', 'policy_logprobs_b'),
        ref_logprobs=both('ref_logprobs_a', 'ref_logprobs_b'),
        source=column(0, 2, np.int8), cost=cost)
    return batch, column(2, 3, bool)[:, 0], rewards

  def get(self, batch_key: str) -> Optional[tuple[PreferenceBatch, np.ndarray]]:
    """The labelled batch as (PreferenceBatch of numpy arrays, oracle rewards [B, 2], NaN where no
    function oracle exists), or None."""
    read = self._read(batch_key)
    return None if read is None else (PreferenceBatch(read[0], read[1]), read[2])

  def status(self, batch_key: str) -> str:
    """'labelled', 'pending' or 'absent'."""
    if self._db.execute('SELECT 1 FROM batches WHERE batch_key=?', (batch_key,)).fetchone():
      return 'labelled'
    if self._db.execute('SELECT 1 FROM pending_batches WHERE batch_key=?', (batch_key,)).fetchone():
      return 'pending'
    return 'absent'

  def counts(self) -> dict:
    """labelled_pairs; queried_pairs: pairs put to an oracle (the queue's queries, plus the query log
    of runs before the queue); queried_twice: pairs whose question was asked again (a pre-queue run's
    re-logged batches, plus deciding answers a queue query got beyond what it needed: 0 unless the
    queue's invariants broke); pending_pairs: sampled pairs waiting for their labels."""
    labelled = self._db.execute('SELECT COALESCE(SUM(num_pairs), 0) FROM batches').fetchone()[0]
    pending = self._db.execute('SELECT COALESCE(SUM(num_pairs), 0) FROM pending_batches').fetchone()[0]
    queried = self._db.execute('SELECT COALESCE(SUM(num_pairs), 0) FROM oracle_queries').fetchone()[0]
    twice = self._db.execute(
        'SELECT COALESCE(SUM(n - first), 0) FROM (SELECT SUM(num_pairs) AS n, MIN(num_pairs) AS first '
        'FROM oracle_queries GROUP BY batch_key)').fetchone()[0]
    queue = queue_counts(self._db)
    return {'labelled_pairs': int(labelled), 'queried_pairs': int(queried) + queue['queries'],
            'queried_twice': int(twice) + queue['excess_answers'], 'pending_pairs': int(pending)}

  def iter_rows(self) -> Iterator[dict]:
    """One dict per labelled pair, arrays as lists (for export and analysis)."""
    cur = self._db.execute(
        f'SELECT p.batch_key, b.step, b.sampler, p.row, p.prompt_id, '
        f'{",".join("p." + c for c in _ARRAY_COLUMNS)}, '
        'p.source_a, p.source_b, p.a_preferred, p.oracle_reward_a, p.oracle_reward_b '
        'FROM pairs p JOIN batches b USING (batch_key) ORDER BY b.rowid, p.row')
    for row in cur:
      out = dict(batch_key=row[0], step=row[1], sampler=row[2], row=row[3], prompt_id=row[4])
      for j, (column, (_, _, dtype)) in enumerate(_ARRAY_COLUMNS.items()):
        out[column] = np.frombuffer(row[5 + j], dtype).tolist()
      k = 5 + len(_ARRAY_COLUMNS)
      out.update(source_a=row[k], source_b=row[k + 1], a_preferred=bool(row[k + 2]),
                 oracle_reward_a=row[k + 3], oracle_reward_b=row[k + 4])
      yield out
