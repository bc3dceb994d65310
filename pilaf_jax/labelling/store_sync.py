"""The label store's copy in the workdir, for workdirs on an object store (or a store kept elsewhere).

SQLite needs a local POSIX file, so the store lives on the machine that runs process 0
(labelling.store_path) and `StoreCopy` keeps <workdir>/labels.sqlite up to date:

  * `upload()`, called by Experiment.save_checkpoint *before* the checkpoint is started: a consistent
    snapshot (SQLite's online backup API, which copies one committed state, WAL included) is written
    to a local temporary file and uploaded whole. Labelled batches are only ever added (a batch is
    committed before any update uses it and never changes afterwards), so the copy in the workdir
    always holds every batch that the newest finished checkpoint used: that checkpoint was started
    after the upload. (Batches still waiting in the labelling queue travel with it, as queries.)
  * `restore()`, called before the store is opened: a machine that has no local store (a preempted
    VM resuming on another VM) starts from the workdir's copy. A local store that holds every batch
    of the copy, unchanged, is the same lineage (the same machine resuming; it may be ahead of the
    copy) and is kept: nothing is asked again. One that lacks a batch of the copy or holds it
    differently is stale (the run went on on another machine since): it is moved aside, not
    deleted, and the copy replaces it, because the workdir's checkpoints continue the copy's labels.

What a VM loss costs: the labels committed after the last checkpoint's upload are not in the copy;
the resumed run restarts at that checkpoint anyway, samples those batches again from the same params
and keys and asks the oracle again (the same answers for a seeded oracle; a human labeller is asked
twice). A process killed on the same VM keeps its local store and asks nothing again.
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from typing import Callable, Optional

from pilaf_jax import paths
from pilaf_jax.labelling.sqlite_db import read_only as _read_only


def snapshot(store_path: str, dest: str) -> None:
  """Writes a consistent, self-contained copy of the SQLite database at store_path to dest."""
  src = _read_only(store_path)
  dst = sqlite3.connect(dest)
  try:
    src.backup(dst)  # One committed state of the source, WAL frames included.
    dst.execute('PRAGMA journal_mode=DELETE')  # One file, no -wal beside it: safe to copy as is.
  finally:
    dst.close()
    src.close()


def _fingerprint(db: sqlite3.Connection, schema: str) -> Optional[dict]:
  try:
    row = db.execute(f"SELECT value FROM {schema}.meta WHERE key='fingerprint'").fetchone()
  except sqlite3.Error:
    return None
  return json.loads(row[0]) if row else None


def missing_from(store_path: str, other_path: str) -> int:
  """How many labelled batches of `other` (a store of the same run) the store lacks or holds
  differently (any column, commit time included: a batch labelled again elsewhere differs)."""
  from pilaf_jax.config_validation import differing_fields
  from pilaf_jax.labelling.label_store import LabelStoreMismatch
  # Read-write although it only reads: after a crash, opening a WAL database may need recovery.
  db = sqlite3.connect(store_path)
  try:
    db.execute('ATTACH DATABASE ? AS other', (other_path,))
    mine, theirs = _fingerprint(db, 'main'), _fingerprint(db, 'other')
    if mine is not None and theirs is not None and mine != theirs:
      raise LabelStoreMismatch(
          f'The label store {store_path} and the workdir\'s copy {other_path} were written under '
          'different configs; refusing to mix labels. Differing fields:\n  '
          + '\n  '.join(differing_fields(theirs, mine)))
    try:
      columns = [r[1] for r in db.execute('PRAGMA other.table_info(batches)')]
      if not columns:
        return 0
      same = ' AND '.join(f'm.{c} IS o.{c}' for c in columns)
      return db.execute(f'SELECT COUNT(*) FROM other.batches o WHERE NOT EXISTS '
                        f'(SELECT 1 FROM main.batches m WHERE {same})').fetchone()[0]
    except sqlite3.OperationalError:  # The local store has no batches table yet: it lacks them all.
      return _count(db, 'other', 'batches')
  finally:
    db.close()


def _count(db: sqlite3.Connection, schema: str, table: str) -> int:
  try:
    return db.execute(f'SELECT COUNT(*) FROM {schema}.{table}').fetchone()[0]
  except sqlite3.Error:
    return 0


class StoreCopy:
  """Keeps <workdir>/labels.sqlite a recent snapshot of the local store at store_path."""

  def __init__(self, store_path: str, workdir: str):
    self.store_path = store_path
    self.copy_path = paths.label_store_copy(workdir)
    # Nothing to do when the store is the workdir's own file (a local workdir, the default).
    self.enabled = not paths.same_file(store_path, self.copy_path)
    self._watch: Optional[sqlite3.Connection] = None
    self._uploaded_version: Optional[int] = None

  def restore(self, log: Callable[[str], None] = print) -> None:
    """Before the store is opened: brings the workdir's copy into the local store (see module doc)."""
    if not self.enabled or not paths.exists(self.copy_path):
      return
    directory = os.path.dirname(self.store_path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='labels.', suffix='.download')
    os.close(fd)
    try:
      paths.copy_file(self.copy_path, tmp)
      if not os.path.exists(self.store_path):
        for suffix in ('-wal', '-shm'):  # Left from a store that is gone: never apply them to the copy.
          if os.path.exists(self.store_path + suffix):
            os.remove(self.store_path + suffix)
        os.replace(tmp, self.store_path)
        log(f'Label store: none on this machine at {self.store_path}; starting from the workdir\'s copy '
            f'{self.copy_path} ({_batches(self.store_path)} labelled batches). Labels committed after '
            'the last checkpoint were not in it and are asked for again.')
        return
      missing = missing_from(self.store_path, tmp)
      if missing:
        # This machine's store is not of the lineage that the workdir's checkpoints continue (another
        # machine resumed the run since, and labelled batches anew). Keep it aside (labels were paid
        # for) and go on from the copy.
        aside = f'{self.store_path}.stale-{time.strftime("%Y%m%d-%H%M%S")}'
        for suffix in ('', '-wal', '-shm'):
          if os.path.exists(self.store_path + suffix):
            os.replace(self.store_path + suffix, aside + suffix)
        os.replace(tmp, self.store_path)
        log(f'Label store: {self.store_path} lacks {missing} labelled batches of the workdir\'s copy '
            f'{self.copy_path} (the run went on elsewhere); moved it to {aside} and continuing from '
            'the copy.')
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def upload(self) -> bool:
    """Uploads a snapshot of the store if it changed since the last upload; returns whether it did."""
    if not self.enabled or not os.path.exists(self.store_path):
      return False
    if self._watch is None:
      self._watch = _read_only(self.store_path)
    # data_version changes whenever another connection (the store's) commits.
    version = self._watch.execute('PRAGMA data_version').fetchone()[0]
    if version == self._uploaded_version:
      return False
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.store_path), prefix='labels.', suffix='.snapshot')
    os.close(fd)
    try:
      snapshot(self.store_path, tmp)
      paths.copy_file(tmp, self.copy_path)
    finally:
      os.remove(tmp)
    self._uploaded_version = version
    return True

  def close(self) -> None:
    if self._watch is not None:
      self._watch.close()
      self._watch = None


def _batches(path: str) -> int:
  db = _read_only(path)
  try:
    return _count(db, 'main', 'batches')
  finally:
    db.close()
