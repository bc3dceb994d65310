"""Labeller accounts of the labelling queue: people, who log in with a random token stored only as its
SHA-256 hash, and function oracles ('oracle:<labelling rule>'), who have no token and answer only
through the queue. Functions of an open connection to the queue's file; LabelQueue runs the writing
ones inside its transactions."""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time

from pilaf_jax.labelling.queue_errors import QueueError, UnknownLabeller

ORACLE_PREFIX = 'oracle:'  # Function oracles answer under 'oracle:<labelling rule>'.


def token_hash(token: str) -> str:
  return hashlib.sha256(token.encode('utf-8')).hexdigest()


def check_name(name: str) -> None:
  """QueueError unless `name` can be a person's name: 1-64 printable characters, not 'oracle:...'."""
  if not isinstance(name, str) or not name.strip() or len(name) > 64 or not name.isprintable():
    raise QueueError(f'labeller name {name!r}: use 1-64 printable characters.')
  if name.startswith(ORACLE_PREFIX):
    raise QueueError(f'labeller name {name!r}: names starting with {ORACLE_PREFIX!r} are reserved for '
                     'function oracles.')


def add(db: sqlite3.Connection, name: str) -> str:
  """Adds a person (or gives an existing one a new token, which replaces the old); returns the token."""
  token = secrets.token_urlsafe(24)
  db.execute('INSERT INTO queue_labellers (name, token_hash, created) VALUES (?, ?, ?) '
             'ON CONFLICT (name) DO UPDATE SET token_hash=excluded.token_hash',
             (name, token_hash(token), time.time()))
  return token


def add_oracle(db: sqlite3.Connection, rule: str) -> str:
  """Registers the function oracle of a labelling rule; returns its name. Idempotent."""
  name = ORACLE_PREFIX + rule
  db.execute('INSERT OR IGNORE INTO queue_labellers (name, token_hash, created) VALUES (?, NULL, ?)',
             (name, time.time()))
  return name


def name_for_token(db: sqlite3.Connection, token: str) -> str:
  """The name a token belongs to; UnknownLabeller for a missing or unknown token."""
  if not token:
    raise UnknownLabeller('A labeller token is required.')
  row = db.execute('SELECT name FROM queue_labellers WHERE token_hash=?', (token_hash(token),)).fetchone()
  if row is None:
    raise UnknownLabeller('Unknown labeller token.')
  return row[0]


def names(db: sqlite3.Connection) -> list[str]:
  """Every labeller's name (people and function oracles), sorted."""
  return [r[0] for r in db.execute('SELECT name FROM queue_labellers ORDER BY name')]


def require(db: sqlite3.Connection, labeller: str) -> bool:
  """Whether the labeller is a function oracle (no token); UnknownLabeller if it does not exist."""
  row = db.execute('SELECT token_hash FROM queue_labellers WHERE name=?', (labeller,)).fetchone()
  if row is None:
    raise UnknownLabeller(f'Unknown labeller {labeller!r}.')
  return row[0] is None
