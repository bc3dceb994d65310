"""The durable store of every oracle answer (SQLite, in the workdir).

Labels are the expensive resource, so the store is the source of truth for labelled data: a batch is
committed (fsync'd, WAL mode, synchronous=FULL) before any update uses it, and holds everything the
update needs (responses, masks, both models' per-token log-probs, labels). After a crash the loop
reads stored batches back instead of asking the oracle again. Every oracle query is logged, committed
before the oracle is called, so a query that was paid for but whose answer was lost still shows up.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Iterator, Optional

import numpy as np

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS oracle_queries (
  id INTEGER PRIMARY KEY AUTOINCREMENT, batch_key TEXT NOT NULL, num_pairs INTEGER NOT NULL,
  pid INTEGER NOT NULL, time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
  batch_key TEXT PRIMARY KEY, step INTEGER NOT NULL, sampler TEXT NOT NULL, num_pairs INTEGER NOT NULL,
  prompt_len INTEGER NOT NULL, response_len INTEGER NOT NULL, cost TEXT NOT NULL, time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
  batch_key TEXT NOT NULL, row INTEGER NOT NULL, prompt_id INTEGER NOT NULL,
  prompt BLOB NOT NULL, prompt_mask BLOB NOT NULL,
  response_a BLOB NOT NULL, response_b BLOB NOT NULL, mask_a BLOB NOT NULL, mask_b BLOB NOT NULL,
  policy_logprobs_a BLOB NOT NULL, policy_logprobs_b BLOB NOT NULL,
  ref_logprobs_a BLOB NOT NULL, ref_logprobs_b BLOB NOT NULL,
  source_a INTEGER NOT NULL, source_b INTEGER NOT NULL, a_preferred INTEGER NOT NULL,
  oracle_reward_a REAL NOT NULL, oracle_reward_b REAL NOT NULL,
  PRIMARY KEY (batch_key, row));
"""
_ARRAY_COLUMNS = {  # column -> (PairBatch field, pair index or None, dtype)
    'prompt': ('prompt_tokens', None, np.int32), 'prompt_mask': ('prompt_mask', None, np.bool_),
    'response_a': ('responses', 0, np.int32), 'response_b': ('responses', 1, np.int32),
    'mask_a': ('response_mask', 0, np.bool_), 'mask_b': ('response_mask', 1, np.bool_),
    'policy_logprobs_a': ('policy_logprobs', 0, np.float32),
    'policy_logprobs_b': ('policy_logprobs', 1, np.float32),
    'ref_logprobs_a': ('ref_logprobs', 0, np.float32), 'ref_logprobs_b': ('ref_logprobs', 1, np.float32),
}


class LabelStoreMismatch(ValueError):
  """The store was written under another config; names the differing fields."""


class LabelStore:
  """Oracle answers keyed by batch ('online/000123', 'iteration2/chunk0004', ...)."""

  def __init__(self, path: str, fingerprint: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._db = sqlite3.connect(path, isolation_level=None)  # Explicit transactions below.
    self._db.execute('PRAGMA journal_mode=WAL')
    self._db.execute('PRAGMA synchronous=FULL')
    self._db.executescript(_SCHEMA)
    self._check_fingerprint(fingerprint)

  def _check_fingerprint(self, fingerprint: dict) -> None:
    from pilaf_jax.config_validation import differing_fields
    row = self._db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
    if row is None:
      with self._transaction():
        self._db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (json.dumps(fingerprint),))
      return
    diff = differing_fields(json.loads(row[0]), fingerprint)
    if diff:
      raise LabelStoreMismatch(f'The label store {self.path} was written under another config; '
                               'refusing to mix labels. Differing fields:\n  ' + '\n  '.join(diff))

  def _transaction(self):
    db = self._db

    class _Txn:
      def __enter__(self):
        db.execute('BEGIN IMMEDIATE')

      def __exit__(self, exc_type, *_):
        db.execute('ROLLBACK' if exc_type else 'COMMIT')
    return _Txn()

  def close(self) -> None:
    self._db.close()

  # --- writing ---
  def log_query(self, batch_key: str, num_pairs: int) -> None:
    """Records (durably) that the oracle is about to be asked about a batch."""
    with self._transaction():
      self._db.execute('INSERT INTO oracle_queries (batch_key, num_pairs, pid, time) VALUES (?,?,?,?)',
                       (batch_key, num_pairs, os.getpid(), time.time()))

  def put(self, batch_key: str, step: int, sampler: str, labelled: PreferenceBatch,
          oracle_rewards: np.ndarray) -> None:
    """Writes one labelled batch atomically; returns after the commit reached the disk."""
    pairs = labelled.pairs
    arrays = {'prompt_tokens': np.asarray(pairs.prompts.tokens), 'prompt_mask': np.asarray(pairs.prompts.mask)}
    prompt_ids = np.asarray(pairs.prompts.ids)
    for name in ('responses', 'response_mask', 'policy_logprobs', 'ref_logprobs'):
      arrays[name] = np.asarray(getattr(pairs, name))
    source, label = np.asarray(pairs.source), np.asarray(labelled.a_preferred)
    rewards = np.asarray(oracle_rewards, np.float64)
    b, _, r = arrays['responses'].shape
    rows = []
    for i in range(b):
      blobs = []
      for field, idx, dtype in _ARRAY_COLUMNS.values():
        x = arrays[field][i] if idx is None else arrays[field][i, idx]
        blobs.append(np.ascontiguousarray(x, dtype).tobytes())
      rows.append((batch_key, i, int(prompt_ids[i]), *blobs, int(source[i, 0]), int(source[i, 1]), int(label[i]),
                   float(rewards[i, 0]), float(rewards[i, 1])))
    cost = json.dumps(pairs.cost.as_dict())
    with self._transaction():
      self._db.execute('INSERT INTO batches VALUES (?,?,?,?,?,?,?,?)',
                       (batch_key, step, sampler, b, arrays['prompt_tokens'].shape[1], r, cost, time.time()))
      self._db.executemany(f'INSERT INTO pairs VALUES ({",".join("?" * (len(_ARRAY_COLUMNS) + 8))})', rows)

  # --- reading ---
  def get(self, batch_key: str) -> Optional[tuple[PreferenceBatch, np.ndarray]]:
    """The stored batch as (PreferenceBatch of numpy arrays, oracle rewards [B, 2]), or None."""
    meta = self._db.execute('SELECT num_pairs, prompt_len, response_len, cost FROM batches '
                            'WHERE batch_key=?', (batch_key,)).fetchone()
    if meta is None:
      return None
    b, p, r, cost = meta
    columns = list(_ARRAY_COLUMNS)
    rows = self._db.execute(f'SELECT {",".join(columns)}, source_a, source_b, a_preferred, '
                            'oracle_reward_a, oracle_reward_b, prompt_id FROM pairs WHERE batch_key=? '
                            'ORDER BY row',
                            (batch_key,)).fetchall()
    if len(rows) != b:
      raise RuntimeError(f'Label store {self.path} batch {batch_key} has {len(rows)} of {b} pairs.')
    decoded = {c: np.stack([np.frombuffer(row[j], _ARRAY_COLUMNS[c][2]) for row in rows])
               for j, c in enumerate(columns)}
    k = len(columns)
    tail = [row[k:] for row in rows]  # source_a, source_b, a_preferred, reward_a, reward_b, prompt_id
    column = lambda lo, hi, dtype: np.asarray([t[lo:hi] for t in tail], dtype)
    both = lambda a, bb: np.stack([decoded[a], decoded[bb]], axis=1)
    cost = SamplingCost(**{name: np.int32(v) for name, v in json.loads(cost).items()})
    pairs = PairBatch(
        prompts=PromptBatch(decoded['prompt'].reshape(b, p), decoded['prompt_mask'].reshape(b, p),
                            column(5, 6, np.int32)[:, 0]),
        responses=both('response_a', 'response_b'), response_mask=both('mask_a', 'mask_b'),
        policy_logprobs=both('policy_logprobs_a', 'policy_logprobs_b'),
        ref_logprobs=both('ref_logprobs_a', 'ref_logprobs_b'),
        source=column(0, 2, np.int8), cost=cost)
    return PreferenceBatch(pairs, column(2, 3, bool)[:, 0]), column(3, 5, np.float64)

  def batch_keys(self) -> list[str]:
    return [row[0] for row in self._db.execute('SELECT batch_key FROM batches ORDER BY rowid')]

  def counts(self) -> dict:
    """Labelled pairs, oracle queries made, and pairs queried more than once."""
    labelled = self._db.execute('SELECT COALESCE(SUM(num_pairs), 0) FROM batches').fetchone()[0]
    queried = self._db.execute('SELECT COALESCE(SUM(num_pairs), 0) FROM oracle_queries').fetchone()[0]
    twice = self._db.execute(
        'SELECT COALESCE(SUM(n - first), 0) FROM (SELECT SUM(num_pairs) AS n, MIN(num_pairs) AS first '
        'FROM oracle_queries GROUP BY batch_key)').fetchone()[0]
    return {'labelled_pairs': int(labelled), 'queried_pairs': int(queried), 'queried_twice': int(twice)}

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
