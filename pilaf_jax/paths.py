"""Workdir paths that are local directories or object-store URLs (gs://bucket/run), through one layer.

Every file a run reads or writes in its workdir (config.json, versions.json, metrics.jsonl, TensorBoard
events, checkpoints, the SFT reference, the label store's copy, exports) goes through here or through
orbax, which uses the same library (etils.epath; gs:// needs `pip install 'pilaf_jax[gcs]'`, i.e.
gcsfs). What an object store cannot do, and how this layer copes:

  * No append, no rename: a file is rewritten whole (`write_text_atomic`). A single object write is
    atomic on an object store (readers see the old object or the new one, never a torn one, also after
    a SIGKILL mid-upload); locally the same guarantee comes from a temporary file, fsync and rename.
  * No POSIX file for SQLite: the label store lives on local disk (`label_store_path`) and a snapshot of
    it is copied to <workdir>/labels.sqlite at each checkpoint (see Experiment.save_checkpoint).
  * No streaming writers: TensorBoard events are written to a local staging directory and mirrored to
    <workdir>/tensorboard (`mirror_dir`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from typing import Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike]
# Local files that belong to a remote workdir (label store, TensorBoard staging, TFDS builds) live under
# $PILAF_LOCAL_DIR (default ~/.cache/pilaf_jax)/workdirs/<name derived from the workdir>.
LOCAL_DIR_ENV = 'PILAF_LOCAL_DIR'
LABEL_STORE = 'labels.sqlite'
_CHUNK = 8 << 20


def is_remote(path: PathLike) -> bool:
  """True for object-store URLs (gs://, s3://, ...); False for local paths."""
  return '://' in os.fspath(path) and not os.fspath(path).startswith('file://')


def as_path(path: PathLike) -> epath.Path:
  """An epath.Path (what orbax takes): local paths made absolute, URLs as they are."""
  path = os.fspath(path)
  if path.startswith('file://'):
    path = path[len('file://'):]
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.path.expanduser(path)))


def join(base: PathLike, *parts: str) -> str:
  """base/part/...: '/' for URLs (on any OS), os.path.join for local paths."""
  return str(epath.Path(os.fspath(base)).joinpath(*parts)) if is_remote(base) else os.path.join(base, *parts)


def _fresh(path: PathLike) -> epath.Path:
  """The path, with any directory listing cached by this process for it and its parent dropped: other
  processes (other hosts, a killed run) write to the same bucket, and gcsfs caches listings."""
  p = as_path(path)
  if is_remote(p):
    try:
      from etils.epath import backend
      fs = backend.fsspec_backend.fs(str(p))
      fs.invalidate_cache(str(p))
      fs.invalidate_cache(str(p.parent))
    except Exception:  # pylint: disable=broad-except
      pass  # A backend without listing caches (or without this API): nothing to drop.
  return p


def exists(path: PathLike) -> bool:
  return _fresh(path).exists()


def isdir(path: PathLike) -> bool:
  return _fresh(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """Names in a directory (an object-store prefix); [] when there is none."""
  p = _fresh(path)
  if not p.is_dir():
    return []
  return sorted(child.name for child in p.iterdir())


def makedirs(path: PathLike) -> None:
  """mkdir -p. A no-op on object stores, which have no directories (and where gcsfs would create a
  missing *bucket*: `check_remote` refuses one instead)."""
  if not is_remote(path):
    os.makedirs(os.fspath(as_path(path)), exist_ok=True)


def check_remote(path: PathLike, what: str = '--workdir') -> None:
  """For an object-store URL: raises ValueError, saying what to do, when its scheme has no filesystem
  installed or its bucket cannot be reached. Local paths pass."""
  if not is_remote(path):
    return
  url = os.fspath(path)
  scheme, rest = url.split('://', 1)
  package = {'gs': 'gcsfs', 's3': 's3fs', 'az': 'adlfs'}.get(scheme, f'an fsspec filesystem for {scheme}://')
  try:
    import fsspec
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError) as e:
    raise ValueError(f"{what}={url}: {scheme}:// paths need {package} (pip install 'pilaf_jax[gcs]' for "
                     f'gs://): {" ".join(str(e).split())}') from None
  bucket = rest.split('/', 1)[0]
  try:
    found = exists(f'{scheme}://{bucket}')
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{what}={url}: cannot reach the bucket {scheme}://{bucket} '
                     f'({type(e).__name__}: {" ".join(str(e).split())[:300]}).') from None
  if not found:
    raise ValueError(f'{what}={url}: the bucket {scheme}://{bucket} does not exist (or is not visible '
                     'with these credentials); create it first.')


def read_bytes(path: PathLike) -> bytes:
  return _fresh(path).read_bytes()


def read_text(path: PathLike) -> str:
  return _fresh(path).read_text()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Replaces the file with `data`, all or nothing, also if the process is killed half way."""
  if is_remote(path):
    as_path(path).write_bytes(data)  # One object upload: it becomes visible only once complete.
    return
  with _atomic_local_file(os.fspath(as_path(path))) as f:
    f.write(data)


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode())


@contextlib.contextmanager
def _atomic_local_file(path: str):
  """A binary file that appears at `path` whole (temporary file, fsync, rename, fsync of the
  directory) when the block ends, and not at all when it raises."""
  os.makedirs(os.path.dirname(path), exist_ok=True)  # Like an object store, where no directory is needed.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(os.path.dirname(path))


def _fsync_dir(directory: str) -> None:
  """Makes a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file between any two locations (upload, download or local), in chunks. The
  destination appears whole or not at all: a local one through a temporary file and rename, a remote
  one as a single object upload, abandoned (not committed) if anything fails half way."""
  src_path, dst_path = _fresh(src), as_path(dst)
  if not is_remote(dst_path):
    with _atomic_local_file(os.fspath(dst_path)) as out, src_path.open('rb') as f:
      while chunk := f.read(_CHUNK):
        out.write(chunk)
    return
  out = dst_path.open('wb')
  try:
    with src_path.open('rb') as f:
      while chunk := f.read(_CHUNK):
        out.write(chunk)
  except BaseException:
    # fsspec commits whatever was buffered when a write-mode file is closed or collected: cancel the
    # upload and mark the file closed so that no partial object is ever committed.
    if hasattr(out, 'discard'):
      out.discard()
      out.closed = True
    raise
  out.close()


def mirror_dir(local_dir: str, remote_dir: PathLike, uploaded: dict) -> int:
  """Uploads every file under local_dir whose size differs from what `uploaded` (relative path ->
  size, updated here) says was uploaded before; returns how many files were uploaded."""
  count = 0
  if not os.path.isdir(local_dir):
    return 0
  for root, _, files in os.walk(local_dir):
    for name in sorted(files):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, local_dir)
      size = os.path.getsize(full)
      if uploaded.get(rel) == size:
        continue
      copy_file(full, join(remote_dir, *rel.split(os.sep)))
      uploaded[rel] = size
      count += 1
  return count


def copy_tree(local_dir: str, dst_dir: PathLike) -> None:
  """Copies a local directory's files to dst_dir (local or remote)."""
  mirror_dir(local_dir, dst_dir, {})


def local_dir(workdir: PathLike) -> str:
  """Where this machine keeps the workdir's local-only files: the workdir itself when it is local,
  else $PILAF_LOCAL_DIR/workdirs/<the URL made a file name, plus a short hash against collisions>."""
  if not is_remote(workdir):
    return os.fspath(as_path(workdir))
  url = str(as_path(workdir)).rstrip('/')
  name = re.sub(r'[^A-Za-z0-9._-]+', '_', url).strip('_')[-80:]
  digest = hashlib.sha1(url.encode()).hexdigest()[:8]
  root = os.environ.get(LOCAL_DIR_ENV) or os.path.join('~', '.cache', 'pilaf_jax')
  return os.path.join(os.path.abspath(os.path.expanduser(root)), 'workdirs', f'{name}-{digest}')


def label_store_path(workdir: PathLike, configured: str = '') -> str:
  """The label store's local file: `configured` (labelling.store_path) when set, else
  <workdir>/labels.sqlite for a local workdir, else <local_dir(workdir)>/labels.sqlite."""
  if configured:
    return os.path.abspath(os.path.expanduser(configured))
  return os.path.join(local_dir(workdir), LABEL_STORE)


def label_store_copy(workdir: PathLike) -> str:
  """<workdir>/labels.sqlite: the store itself (local default) or its copy (remote workdir, or a store
  configured elsewhere), refreshed at every checkpoint."""
  return join(workdir, LABEL_STORE)


def same_file(a: PathLike, b: PathLike) -> bool:
  """True when two paths name the same local file (False if either is remote)."""
  if is_remote(a) or is_remote(b):
    return False
  return os.path.normpath(os.fspath(as_path(a))) == os.path.normpath(os.fspath(as_path(b)))


def tensorboard_dirs(workdir: PathLike) -> tuple[str, Optional[str]]:
  """(local directory the event writer writes to, remote directory it is mirrored to or None)."""
  if is_remote(workdir):
    return os.path.join(local_dir(workdir), 'tensorboard'), join(workdir, 'tensorboard')
  return os.path.join(os.fspath(as_path(workdir)), 'tensorboard'), None


def read_metrics(workdir: str) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl ([] when absent); a line torn by a crash is skipped."""
  path = join(workdir, 'metrics.jsonl')
  rows = []
  for line in (read_text(path).splitlines() if exists(path) else []):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # Files written by appending, before this writer, may end in a torn line.
  return rows
