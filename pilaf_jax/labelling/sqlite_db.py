"""The one way the labelling code opens its SQLite file and writes to it.

The label store and the labelling queue share one file, written by several processes (the loop, an
oracle worker, the labelling web server). Every connection gets the same set-up: autocommit mode
(transactions are explicit), synchronous=FULL (a commit reaches the disk before the call returns),
and a busy timeout long enough for another process's transaction. Only the process that creates the
file switches it to WAL (the mode persists in the file). Every write is one `BEGIN IMMEDIATE`
transaction (`write`), so concurrent writers never interleave inside one.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import urllib.request
from typing import Iterator

BUSY_TIMEOUT_S = 60.0  # How long a writer waits for another process's transaction.


def make_private(path: str) -> None:
  """Creates the SQLite file `path` readable by its owner only (it holds every answer and the hidden
  sources of every pair), or narrows an existing one of ours to 0600. SQLite gives the -wal and
  -shm files beside it the database's mode."""
  # Never open (and close) an existing database file here: closing any descriptor of a file drops
  # every POSIX lock this process holds on it, those of SQLite's own connections included.
  try:
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    return
  except FileExistsError:
    pass
  st = os.stat(path)
  if st.st_mode & 0o077 and st.st_uid == os.getuid():
    os.chmod(path, 0o600)


def is_wal_database(path: str) -> bool:
  """Whether `path` is an SQLite database in WAL mode (header bytes 18-19 = 2), as the run leaves its
  store once created. Until then (an empty file, or a restored copy in rollback mode) another process
  must not open it: opening runs recovery and may change the journal mode under the run."""
  try:
    with open(path, 'rb') as f:
      header = f.read(100)
  except OSError:
    return False
  return len(header) == 100 and header.startswith(b'SQLite format 3\x00') and header[18] == 2 == header[19]


def create_private(path: str) -> None:
  """Makes the folder of `path` and the file itself, private (see make_private)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  make_private(path)


def connect(path: str, *, create: bool) -> sqlite3.Connection:
  """A connection set up as every writer of the file needs it (see the module doc). create=False
  opens an existing file only (never creates it) and leaves its journal mode alone: a second
  process switching it while the run creates the file loses writes."""
  uri = f'file:{urllib.request.pathname2url(os.path.abspath(path))}' + ('' if create else '?mode=rw')
  db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                       check_same_thread=False)  # Each caller keeps a connection to one thread.
  if create:
    db.execute('PRAGMA journal_mode=WAL')
  db.execute('PRAGMA synchronous=FULL')
  db.execute(f'PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}')
  return db


def read_only(path: str) -> sqlite3.Connection:
  """A connection that can only read (copies, exports, audits): it never writes, creates or
  recovers the file."""
  return sqlite3.connect(f'file:{urllib.request.pathname2url(os.path.abspath(path))}?mode=ro', uri=True)


@contextlib.contextmanager
def write(db: sqlite3.Connection, fsync: bool = True) -> Iterator[sqlite3.Connection]:
  """One BEGIN IMMEDIATE transaction, committed on exit, rolled back on any error.

  fsync=False commits with synchronous=NORMAL: durable against any crash of a process (the commit
  is in the WAL file), not against a power loss until the next fsync'd commit in the file (a WAL
  fsync covers every earlier frame). Only for writes that are recomputed identically if lost.
  """
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
def snapshot(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
  """A consistent snapshot for reads spanning several statements."""
  db.execute('BEGIN')
  try:
    yield db
  finally:
    db.execute('COMMIT')


class PerThreadConnections:
  """One connection per thread (made on first use) to one file; a forked child makes fresh ones and
  never touches its parent's."""

  def __init__(self, path: str, *, create: bool):
    self.path, self._create = path, create
    self._local = threading.local()
    self._lock = threading.Lock()
    self._connections: list[sqlite3.Connection] = []
    self._pid = os.getpid()

  def get(self) -> sqlite3.Connection:
    """This thread's connection."""
    if os.getpid() != self._pid:
      self._pid, self._local, self._connections = os.getpid(), threading.local(), []
    db = getattr(self._local, 'db', None)
    if db is None:
      db = self._local.db = connect(self.path, create=self._create)
      with self._lock:
        self._connections.append(db)
    return db

  def close(self) -> None:
    """Closes every connection made (call when no thread uses them any more)."""
    with self._lock:
      for db in self._connections:
        try:
          db.close()
        except sqlite3.Error:
          pass
      self._connections = []
    self._local = threading.local()
