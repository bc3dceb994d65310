"""The label server's two secrets beside the label store (0600 files, made on first use), and the
per-(labeller, query) display order they key: which response a labeller sees on the left."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from typing import Callable

OWNER_TOKEN_FILE = 'label_server_owner_token'
ORDER_KEY_FILE = 'label_server_order_key'
# What the page posts (display order) -> what the queue stores (storage order), before any swap.
DISPLAY_CHOICES = ('left', 'right', 'tie', 'skip')
_UNSWAPPED = {'left': 'a', 'right': 'b', 'tie': 'tie', 'skip': 'skip'}
_SWAPPED = {'left': 'b', 'right': 'a', 'tie': 'tie', 'skip': 'skip'}


def _read_or_create_secret(path: str, make: Callable[[], str]) -> str:
  """The secret in `path`; on first use a new one, written to a 0600 temporary file and linked into
  place (atomic: two processes starting at once agree on one secret, and none reads a partial file)."""
  if not os.path.exists(path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.' + os.path.basename(path))
    try:  # mkstemp makes the file 0600.
      with os.fdopen(fd, 'w') as f:
        f.write(make() + '\n')
        f.flush()
        os.fsync(f.fileno())
      try:
        os.link(tmp, path)
      except FileExistsError:
        pass  # Another process made it first: use theirs.
    finally:
      os.unlink(tmp)
  with open(path) as f:
    value = f.read().strip()
  if not value:
    raise RuntimeError(f'{path} is empty; delete it to make a new one.')
  return value


def owner_token(directory: str) -> str:
  """The run owner's token (<directory>/label_server_owner_token, 0600), made on first use."""
  os.makedirs(directory, exist_ok=True)
  return _read_or_create_secret(os.path.join(directory, OWNER_TOKEN_FILE), lambda: secrets.token_urlsafe(32))


def order_key(directory: str) -> bytes:
  """The key of the per-(labeller, query) display order. It must survive restarts: an answer is
  mapped back to storage order with the same key that ordered the page the labeller saw."""
  os.makedirs(directory, exist_ok=True)
  return bytes.fromhex(_read_or_create_secret(os.path.join(directory, ORDER_KEY_FILE),
                                              lambda: secrets.token_hex(32)))


def is_swapped(key: bytes, labeller: str, query_id: int) -> bool:
  """Whether `labeller` sees response b on the left for `query_id`: a keyed hash, so the order is
  fixed per (labeller, query), differs between labellers, and cannot be predicted without the key."""
  digest = hmac.new(key, f'{labeller}\0{int(query_id)}'.encode(), hashlib.sha256).digest()
  return bool(digest[0] & 1)


def storage_choice(display_choice: str, swapped: bool) -> str:
  """'left' / 'right' / 'tie' / 'skip' as the page posts it -> 'a' / 'b' / 'tie' / 'skip'."""
  return (_SWAPPED if swapped else _UNSWAPPED)[display_choice]
