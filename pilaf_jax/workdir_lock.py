"""One loop per workdir: a lock taken before the loop writes anything, released when it exits.

Two loops on one workdir would both sample, label and checkpoint into it (the second one crashes
inside orbax, or worse, both go on). The lock is `<workdir>/.lock`:
  - local workdir: an flock on that file (the kernel releases it when the process dies, so a
    SIGKILLed run never leaves it behind); the file records the holder's host and pid;
  - gs:// workdir (no flock on an object store): an object created with the precondition
    ifGenerationMatch=0 (exactly one creator wins), rewritten every HEARTBEAT_S seconds by a
    background thread; a lock whose heartbeat is older than STALE_AFTER_S (its holder crashed) is
    taken over, deleting it with its generation as precondition (two takers cannot both win).
The labelling worker and the labelling web server take no lock: they legitimately run beside the loop.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from pilaf_jax import paths

LOCK_NAME = '.lock'
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class WorkdirBusy(Exception):
  """Another loop holds the workdir; main prints this in one line and exits 2."""


class WorkdirError(Exception):
  """A workdir that cannot be used (a file, under a file, read-only, ...); one line, exit 2."""


def file_system_error(error: OSError, what: str) -> str:
  """An OSError (or sqlite3 error) as one line that says what to change."""
  import errno
  reason = {errno.EROFS: 'the file system is read-only', errno.ENOSPC: 'the disk is full',
            errno.EDQUOT: 'the disk quota is exceeded', errno.EACCES: 'permission denied',
            errno.EPERM: 'permission denied', errno.ENOTDIR: 'a component of the path is a file',
            errno.EEXIST: 'a file is in the way', errno.EISDIR: 'a directory is in the way',
            errno.ENAMETOOLONG: 'the path is too long'}.get(getattr(error, 'errno', None))
  where = getattr(error, 'filename', None)
  detail = reason or ' '.join(str(error).split())
  return f'{what}: {detail}' + (f' ({where})' if where and reason else '') + '.'


def prepare_workdir(workdir: str) -> None:
  """Creates a local workdir and checks that it can be written; raises WorkdirError in one line."""
  if paths.is_remote(workdir):
    return
  path = os.fspath(paths.as_path(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory; name a directory (it is '
                       'created when missing).')
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise WorkdirError(f'--workdir={workdir} lies under {parent}, which is a file; name a directory.')
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_test.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(file_system_error(e, f'--workdir={workdir} cannot be written')) from None


def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
          'heartbeat': time.time()}


def _dead_here(holder: dict) -> bool:
  """True when the holder ran on this host and its process no longer exists (a SIGKILLed run
  resumed on the same machine need not wait for the heartbeat to go stale)."""
  if holder.get('host') != socket.gethostname() or not isinstance(holder.get('pid'), int):
    return False
  try:
    os.kill(holder['pid'], 0)
  except ProcessLookupError:
    return True
  except OSError:
    return False
  return False


def _describe(holder: dict, workdir: str) -> str:
  since = holder.get('started')
  when = time.strftime(' since %Y-%m-%d %H:%M:%S UTC', time.gmtime(since)) if since else ''
  who = (f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}{when}' if holder else
         'another process (it has not recorded its host yet)')
  return (f'the workdir {workdir} is in use by another run ({who}). Wait for it to finish or stop it, '
          'or use another --workdir.')


class WorkdirLock:
  """with WorkdirLock(workdir): ... ; or acquire() / release()."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_NAME)
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self._fd: Optional[int] = None
    self._generation: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  # --- local: flock ---
  def _acquire_local(self) -> None:
    import fcntl
    path = os.fspath(paths.as_path(self.path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
      except ValueError:
        holder = {}
      os.close(fd)
      raise WorkdirBusy(_describe(holder, self.workdir)) from None
    data = json.dumps(_holder()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    self._fd = fd

  # --- object store: a create-only object with a heartbeat ---
  def _fs(self):
    from etils.epath import backend
    return backend.fsspec_backend.fs(self.path)

  def _split(self) -> tuple[str, str]:
    bucket, _, key = self.path.split('://', 1)[1].partition('/')
    return bucket, key

  def _acquire_remote(self) -> None:
    fs = self._fs()
    for _ in range(3):
      try:
        info = fs.pipe_file(self.path, json.dumps(_holder()).encode(), mode='create')
        self._generation = (info or {}).get('generation') if isinstance(info, dict) else None
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name='workdir-lock')
        self._thread.start()
        return
      except FileExistsError:
        pass
      except OSError as e:  # gcsfs reports a failed precondition as an HTTP 412.
        if '412' not in str(e) and 'recondition' not in str(e):
          raise
      holder, generation, age = self._read_remote(fs)
      dead = _dead_here(holder)
      if not dead and age < self.stale_after_s:
        raise WorkdirBusy(_describe(holder, self.workdir) + f' Its last heartbeat was {age:.0f} s ago; '
                          f'a lock without one for {self.stale_after_s:.0f} s is taken over.')
      why = 'its process is gone' if dead else f'it sent no heartbeat for {age:.0f} s'
      print(f'note: taking over the lock of {self.workdir}: its holder ({holder.get("host")}, pid '
            f'{holder.get("pid")}) crashed ({why}).', flush=True)
      bucket, key = self._split()
      try:  # Only the lock object we judged stale: a concurrent taker's new lock survives.
        fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=generation)
      except Exception:  # pylint: disable=broad-except
        pass  # Someone else deleted or replaced it first: try to create again.
    raise WorkdirBusy(_describe({}, self.workdir))

  def _read_remote(self, fs) -> tuple[dict, Optional[str], Optional[float]]:
    """(holder, generation, seconds since its last heartbeat) of the lock object."""
    try:
      info = fs.info(self.path)
      holder = json.loads(fs.cat_file(self.path).decode() or '{}')
    except (FileNotFoundError, ValueError):
      return {}, None, float('inf')
    return holder, info.get('generation'), time.time() - float(holder.get('heartbeat', 0.0))

  def _heartbeat(self) -> None:
    fs = self._fs()
    holder = _holder()
    while not self._stop.wait(self.heartbeat_s):
      try:
        current, _, _ = self._read_remote(fs)
        if current and (current.get('host'), current.get('pid')) != (holder['host'], holder['pid']):
          print(f'warning: the lock of {self.workdir} was taken over by {current.get("host")}, pid '
                f'{current.get("pid")}, while this run held it (its heartbeat was late).', flush=True)
          return
        holder['heartbeat'] = time.time()
        fs.pipe_file(self.path, json.dumps(holder).encode())
      except Exception:  # pylint: disable=broad-except
        pass  # A missed heartbeat is retried at the next one; STALE_AFTER_S allows for several.

  # --- both ---
  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusy naming the holder. The workdir must exist."""
    if paths.is_remote(self.workdir):
      self._acquire_remote()
    else:
      self._acquire_local()

  def release(self) -> None:
    if self._fd is not None:
      import fcntl
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join(timeout=5)
      self._thread = None
      try:
        self._fs().rm_file(self.path)
      except Exception:  # pylint: disable=broad-except
        pass  # Stale after STALE_AFTER_S anyway.


def take(workdir: str) -> WorkdirLock:
  """prepare_workdir, then the workdir's lock, acquired (WorkdirBusy / WorkdirError say why not)."""
  prepare_workdir(workdir)
  lock = WorkdirLock(workdir)
  lock.acquire()
  return lock
