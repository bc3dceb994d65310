"""Fault injection: restores that meet errors never delete a checkpoint; one loop per workdir; every
workdir and file-system failure is one line (exit 2); errors show where they happen.

Fast by design: checkpoints of small pytrees, in-process; the subprocesses stop before any model is
built (a refused workdir, a broken config), except one short configs/tiny.py run (module fixture)
that the end-to-end restore tests share.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pilaf_jax import checkpointing, config_validation, workdir_lock  # noqa: E402
from pilaf_jax.checkpointing import Checkpointer, RestoreError  # noqa: E402

TINY = os.path.join(REPO, 'configs', 'tiny.py')


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
  monkeypatch.setattr(checkpointing, 'RESTORE_BACKOFF_S', 0.0)


def _tree(extra: bool = False, size: int = 3):
  tree = {'a': jnp.arange(size, dtype=jnp.float32), 'opt': {'mu': jnp.ones(2), 'nu': jnp.zeros(2)}}
  if extra:
    tree['opt']['count'] = jnp.zeros((), jnp.int32)  # What an optimiser upgrade adds.
  return tree


def _saved(tmp_path, steps=(1, 2, 3), metas=None) -> Checkpointer:
  ck = Checkpointer(str(tmp_path / 'checkpoints'), max_to_keep=10, every_steps=1, every_seconds=1e9,
                    async_save=False)
  for i, s in enumerate(steps):
    ck.save(s, jax.tree.map(lambda x: x + s, _tree()), (metas[i] if metas else {'step': s}))
  ck.wait()
  return ck


def _listing(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob('*')) if p.is_file()}


def _flaky(monkeypatch, error: Exception, failures: int) -> list:
  """Checkpointer reads raise `error` on their first `failures` calls."""
  calls = []
  real = Checkpointer._restore_step

  def restore_step(self, step, abstract):
    calls.append(step)
    if len(calls) <= failures:
      raise error
    return real(self, step, abstract)
  monkeypatch.setattr(Checkpointer, '_restore_step', restore_step)
  return calls


# --- restores -------------------------------------------------------------------------------------

@pytest.mark.parametrize('error', [OSError(5, 'Input/output error'), TimeoutError('read timed out'),
                                   ValueError('DEADLINE_EXCEEDED: tensorstore read')])
def test_transient_errors_are_retried_and_resume_from_the_same_checkpoint(tmp_path, monkeypatch, error):
  ck = _saved(tmp_path)
  before = _listing(tmp_path)
  calls = _flaky(monkeypatch, error, failures=3)
  messages = []
  step, state, meta = ck.restore_latest(_tree(), messages.append)
  assert step == 3 and meta == {'step': 3} and calls == [3, 3, 3, 3]
  np.testing.assert_array_equal(state['a'], np.arange(3) + 3)
  assert sum('retrying' in m for m in messages) == 3
  assert ck.all_steps() == [1, 2, 3] and _listing(tmp_path) == before  # 0 deleted, 0 set aside.


def test_a_persistent_transient_error_fails_loudly_and_changes_nothing(tmp_path, monkeypatch):
  ck = _saved(tmp_path)
  before = _listing(tmp_path)
  _flaky(monkeypatch, OSError(110, 'Connection timed out'), failures=10**6)
  with pytest.raises(RestoreError, match='failed 5 times with a transient error') as e:
    ck.restore_latest(_tree(), lambda m: None)
  assert '\n' not in str(e.value)
  assert _listing(tmp_path) == before


@pytest.mark.parametrize('target,leaf', [(_tree(extra=True), 'opt.count'), (_tree(size=4), 'leaf a has shape')])
def test_a_structure_mismatch_names_the_leaf_and_deletes_nothing(tmp_path, target, leaf):
  ck = _saved(tmp_path)
  before = _listing(tmp_path)
  with pytest.raises(RestoreError) as e:
    ck.restore_latest(target, lambda m: None)
  assert leaf in str(e.value) and 'nothing was deleted' in str(e.value) and '\n' not in str(e.value)
  assert _listing(tmp_path) == before and ck.all_steps() == [1, 2, 3]


def test_an_unreadable_finished_checkpoint_is_set_aside_not_deleted(tmp_path):
  ck = _saved(tmp_path)
  state_dir = tmp_path / 'checkpoints' / '3' / 'state'
  victim = max((p for p in state_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  os.truncate(victim, victim.stat().st_size // 2)
  files_of_3 = {str(p.relative_to(tmp_path / 'checkpoints' / '3')): p.stat().st_size
                for p in (tmp_path / 'checkpoints' / '3').rglob('*') if p.is_file()}
  messages = []
  step, _, _ = ck.restore_latest(_tree(), messages.append)
  assert step == 2 and ck.all_steps() == [1, 2]
  (aside,) = list((tmp_path / 'checkpoints.unreadable').iterdir())
  assert aside.name.startswith('3-')
  assert {str(p.relative_to(aside)): p.stat().st_size for p in aside.rglob('*') if p.is_file()} == files_of_3
  assert any(str(aside) in m and 'set aside' in m for m in messages)
  ck.save(3, _tree(), {'step': 3})  # The resumed run writes that step afresh.
  ck.wait()
  assert ck.all_steps() == [1, 2, 3]


def test_a_partial_write_is_not_set_aside(tmp_path):
  ck = _saved(tmp_path)
  ck.close()
  partial = tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-1234567'
  partial.mkdir()
  (partial / 'half').write_bytes(b'x' * 10)
  messages = []
  reopened = Checkpointer(str(tmp_path / 'checkpoints'), max_to_keep=10, every_steps=1,
                          every_seconds=1e9, async_save=False, read_only=True)
  step, _, _ = reopened.restore_latest(_tree(), messages.append)
  assert step == 3 and not (tmp_path / 'checkpoints.unreadable').exists()
  assert any('partial checkpoint write' in m for m in messages)


def test_read_only_checkpointer_never_renames(tmp_path):
  ck = _saved(tmp_path)
  victim = max((p for p in (tmp_path / 'checkpoints' / '3').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  os.truncate(victim, victim.stat().st_size // 2)
  before = _listing(tmp_path)
  source = Checkpointer(str(tmp_path / 'checkpoints'), max_to_keep=1, every_steps=1, every_seconds=1e9,
                        read_only=True)
  with pytest.raises(RestoreError, match='left as it is'):
    source.restore_latest(_tree(), lambda m: None)
  assert _listing(tmp_path) == before


def test_branch_point_is_the_end_of_iteration_one_read_only(tmp_path):
  from pilaf_jax.config_validation import ConfigError
  from pilaf_jax.loops.iterative import _branch_point
  metas = [{'loop': 'iterative', 'iteration': 0, 'epoch': 1, 'minibatch': 2},
           {'loop': 'iterative', 'iteration': 1, 'epoch': 0, 'minibatch': 0},
           {'loop': 'iterative', 'iteration': 1, 'epoch': 1, 'minibatch': 0}]
  _saved(tmp_path, steps=(4, 8, 12), metas=metas).close()
  before = _listing(tmp_path)
  exp = types.SimpleNamespace(config=types.SimpleNamespace(iterative=types.SimpleNamespace(
      init_checkpoint=str(tmp_path / 'checkpoints'))))
  step, state, meta = _branch_point(exp, _tree(), lambda m: None)
  assert step == 8 and meta['iteration'] == 1  # Not the newest (12: inside iteration 2).
  np.testing.assert_array_equal(state['a'], np.arange(3) + 8)
  assert _listing(tmp_path) == before
  mid = tmp_path / 'mid'
  _saved(mid, steps=(4, 12), metas=[metas[0], metas[2]]).close()
  with pytest.raises(ConfigError, match='ends iteration 1'):
    _branch_point(types.SimpleNamespace(config=types.SimpleNamespace(iterative=types.SimpleNamespace(
        init_checkpoint=str(mid / 'checkpoints')))), _tree(), lambda m: None)


def test_growth_of_run_length_is_allowed_shrinking_is_not():
  saved = {'online.steps': 20, 'iterative.iterations': 2, 'seed': 0}
  assert config_validation.differing_fields(saved, {**saved, 'online.steps': 30}) == []
  assert config_validation.differing_fields(saved, {**saved, 'iterative.iterations': 3}) == []
  assert config_validation.differing_fields(saved, {**saved, 'online.steps': 10}) == [
      'online.steps: 20 -> 10 (may only grow)']
  assert config_validation.differing_fields(saved, {**saved, 'seed': 1}) == ['seed: 0 -> 1']


# --- the workdir lock -----------------------------------------------------------------------------

def test_second_lock_is_refused_naming_host_and_pid(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(workdir_lock.WorkdirBusy) as e:
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert f'host {socket.gethostname()}, pid {os.getpid()}' in str(e.value) and '\n' not in str(e.value)
  first.release()
  with workdir_lock.WorkdirLock(str(tmp_path)):  # Free again once released.
    pass


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  return env


def _main(workdir, *args, timeout=120):
  return subprocess.run([sys.executable, '-m', 'pilaf_jax.main', f'--config={TINY}', f'--workdir={workdir}',
                         *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def test_a_loop_on_a_locked_workdir_exits_2_in_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', (
      'import sys, time; from pilaf_jax.workdir_lock import WorkdirLock; '
      f'WorkdirLock({str(workdir)!r}).acquire(); print("held", flush=True); time.sleep(600)')],
      stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == 'held'
    result = _main(workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().count('\n') == 0 and 'Traceback' not in result.stderr
    assert f'pid {holder.pid}' in result.stderr and socket.gethostname() in result.stderr
    assert sorted(os.listdir(workdir)) == ['.lock']
  finally:
    holder.kill()  # SIGKILL: the kernel drops the flock with the process.
    holder.wait()
  with workdir_lock.WorkdirLock(str(workdir)):
    pass


class _FakeBucket:
  """The part of gcsfs the lock uses, with GCS's semantics: create-only uploads fail when the object
  exists; a delete with ifGenerationMatch fails when the generation moved on."""

  def __init__(self):
    self.objects, self.generation = {}, 0

  def pipe_file(self, path, data, mode='overwrite'):
    if mode == 'create' and path in self.objects:
      raise FileExistsError(path)
    self.generation += 1
    self.objects[path] = (data, str(self.generation))
    return {'generation': str(self.generation)}

  def info(self, path):
    if path not in self.objects:
      raise FileNotFoundError(path)
    return {'generation': self.objects[path][1]}

  def cat_file(self, path):
    return self.info(path) and self.objects[path][0]

  def call(self, method, template, bucket, key, ifGenerationMatch=None):
    path = f'gs://{bucket}/{key}'
    assert method == 'DELETE'
    if path not in self.objects or self.objects[path][1] != ifGenerationMatch:
      raise OSError('412 Precondition Failed')
    del self.objects[path]

  def rm_file(self, path):
    self.objects.pop(path, None)


def test_object_store_lock_precondition_heartbeat_and_stale_takeover(monkeypatch):
  bucket = _FakeBucket()
  monkeypatch.setattr(workdir_lock.WorkdirLock, '_fs', lambda self: bucket)
  first = workdir_lock.WorkdirLock('gs://b/run', heartbeat_s=0.05, stale_after_s=0.5)
  first.acquire()
  with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {os.getpid()}'):
    workdir_lock.WorkdirLock('gs://b/run', stale_after_s=0.5).acquire()
  time.sleep(0.7)  # Heartbeats keep it fresh past stale_after_s.
  with pytest.raises(workdir_lock.WorkdirBusy):
    workdir_lock.WorkdirLock('gs://b/run', stale_after_s=0.5).acquire()
  first._stop.set()  # A crash: heartbeats stop, the object stays.
  first._thread.join()
  first._thread = None
  time.sleep(0.7)
  second = workdir_lock.WorkdirLock('gs://b/run', stale_after_s=0.5)
  second.acquire()  # Taken over.
  assert 'gs://b/run/.lock' in bucket.objects
  second.release()
  assert 'gs://b/run/.lock' not in bucket.objects
  # A holder on this host whose process is gone (SIGKILLed, resumed on the same machine) is taken
  # over at once, heartbeat or not.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  bucket.pipe_file('gs://b/run/.lock', json.dumps({'host': socket.gethostname(), 'pid': dead.pid,
                                                   'heartbeat': time.time()}).encode())
  third = workdir_lock.WorkdirLock('gs://b/run', stale_after_s=60)
  third.acquire()
  third.release()


# --- bad workdirs and broken configs: exit 2, one line --------------------------------------------

def _one_line_exit_2(result):
  """Exit status 2 and one line of ours on stderr. The accelerator runtime (libtpu installed, no TPU)
  may print its own lines on stderr of any process that starts jax: only lines of the program's own
  kinds (error / warning / a traceback) are counted."""
  assert result.returncode == 2, result.stderr[-3000:]
  ours = [l for l in result.stderr.splitlines() if l.startswith(('error', 'warning', 'Traceback'))]
  assert len(ours) == 1 and ours[0].startswith('error: ') and 'Traceback' not in result.stderr, ours
  return ours[0]


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'f').write_text('x')
  assert 'is a file' in _one_line_exit_2(_main(tmp_path / 'f'))


def test_workdir_under_a_file(tmp_path):
  (tmp_path / 'f').write_text('x')
  assert 'which is a file' in _one_line_exit_2(_main(tmp_path / 'f' / 'sub'))


@pytest.fixture
def read_only_dir(tmp_path):
  """A read-only file system (a tmpfs mounted ro; needs root), else a chmod-ed directory."""
  path = tmp_path / 'ro'
  path.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro', 'tmpfs', str(path)],
                                                  capture_output=True).returncode == 0
  if not mounted:
    if os.geteuid() == 0:
      pytest.skip('cannot mount a read-only tmpfs here')
    path.chmod(0o555)
  yield path
  if mounted:
    subprocess.run(['umount', str(path)], check=False)
  else:
    path.chmod(0o755)


def test_workdir_on_a_read_only_file_system(read_only_dir):
  line = _one_line_exit_2(_main(read_only_dir / 'w'))
  assert 'cannot be written' in line


def test_a_file_system_error_during_setup_is_one_line(tmp_path, monkeypatch):
  """An OSError raised by the file system after the workdir checks (here: the label store's
  directory cannot be created) is reported in one line."""
  code = ('import errno, os, sys, runpy; import pilaf_jax.labelling.label_store as ls; real = ls.LabelStore.__init__\n'
          'def broken(self, *a, **k): raise OSError(errno.ENOSPC, "No space left on device", a[0])\n'
          'ls.LabelStore.__init__ = broken\n'
          f'sys.argv = ["main", "--config={TINY}", "--workdir={tmp_path / "w"}"]\n'
          'runpy.run_module("pilaf_jax.main", run_name="__main__")\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=REPO)
  assert 'the disk is full' in _one_line_exit_2(result)


def test_a_config_files_own_error_shows_its_traceback(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from pilaf_jax import default_config\n\ndef get_config():\n  c = default_config.get_config()\n'
                 "  c.seed = {}['oops']\n  return c\n")
  result = subprocess.run([sys.executable, '-m', 'pilaf_jax.main', f'--config={bad}', f'--workdir={tmp_path / "w"}'],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
  assert result.returncode == 2
  assert 'Traceback' in result.stderr and f'File "{bad}", line 5' in result.stderr
  assert 'not a config field' not in result.stderr.replace('not an unknown field', '')
  # A real unknown override is still the one-line message.
  line = _one_line_exit_2(_main(tmp_path / 'w', '--config.dpo.batchsize=3'))
  assert 'is not a config field' in line


# --- errors shown where they happen --------------------------------------------------------------

def _text_oracle(overlong, lengths):
  from pilaf_jax.labelling.text_oracles import TextOracle
  oracle = object.__new__(TextOracle)
  oracle.max_len, oracle.pad_id, oracle.overlong, oracle.truncated = 8, 0, overlong, 0
  messages = []
  oracle.log = messages.append
  oracle.render = lambda conversation, response: list(range(1, response + 1))
  return oracle, messages, [[]] * len(lengths)


def test_oracle_truncation_is_counted_and_logged():
  oracle, messages, conversations = _text_oracle('truncate', [5, 12, 9])
  tokens, valid = oracle.encode(conversations, [5, 12, 9])
  assert oracle.truncated == 2 and len(messages) == 1 and 'cut 2 of 3' in messages[0]
  assert tokens[1].tolist() == list(range(5, 13)) and valid.sum(1).tolist() == [5, 8, 8]
  oracle.encode(conversations, [20])
  assert oracle.truncated == 3 and '3 so far' in messages[-1]


def test_oracle_overlong_error_refuses():
  from pilaf_jax.config_validation import ConfigError
  oracle, _, conversations = _text_oracle('error', [5, 12])
  with pytest.raises(ConfigError, match='oracle.max_len=8'):
    oracle.encode(conversations, [5, 12])


def test_metrics_writer_needs_the_resume_point_and_marks_the_restart(tmp_path):
  from tensorboardX.proto import event_pb2
  from pilaf_jax.metrics_writer import MetricsWriter
  from test_tensorboard_events import _records
  writer = MetricsWriter(str(tmp_path), resume_step=-1)
  for step in (0, 4, 8):
    writer.write({'step': step, 'J': 1.0}, step)
  writer.close()
  before = (tmp_path / 'metrics.jsonl').read_bytes()
  with pytest.raises(ValueError, match='pass resume_step'):
    MetricsWriter(str(tmp_path))
  assert (tmp_path / 'metrics.jsonl').read_bytes() == before
  time.sleep(1.1)  # Event files are named by the second.
  resumed = MetricsWriter(str(tmp_path), resume_step=4)
  resumed.close()
  newest = max((tmp_path / 'tensorboard').iterdir(), key=lambda p: p.stat().st_mtime_ns)
  events = [event_pb2.Event.FromString(r) for r in _records(str(newest))]
  starts = [e for e in events if e.HasField('session_log')]
  assert len(starts) == 1 and starts[0].session_log.status == event_pb2.SessionLog.START
  assert starts[0].step == 5


def test_hf_checkpoint_config_is_in_place_before_the_weights(tmp_path, monkeypatch):
  from pilaf_jax.model import hf
  from pilaf_jax.model.llama import LlamaConfig, init_params
  cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1)
  params = init_params(cfg, jax.random.key(0))
  seen = []
  real = os.replace

  def replace(src, dst):
    if os.path.basename(dst) == 'model.safetensors':
      seen.append(json.loads(open(os.path.join(os.path.dirname(dst), 'config.json')).read()))
    return real(src, dst)
  monkeypatch.setattr(hf.os, 'replace', replace)
  hf.save_hf_checkpoint(str(tmp_path / 'out'), cfg, params)
  assert len(seen) == 1 and seen[0]['hidden_size'] == 8
  assert not [n for n in os.listdir(tmp_path / 'out') if n.endswith('.tmp')]


# --- end to end: a short tiny run resumed through injected faults -------------------------------

SHORT = ['--config.online.steps=4', '--config.sft.steps=5', '--config.eval.num_prompts=64',
         '--config.eval.batch_size=64']


def _inject(workdir, python: str, *args):
  """`python -m pilaf_jax.main` after running `python` (a fault injection) in the same process."""
  code = (f'import sys, runpy\n{python}\n'
          f'sys.argv = ["main", "--config={TINY}", "--workdir={workdir}", *{list(SHORT + list(args))!r}]\n'
          'runpy.run_module("pilaf_jax.main", run_name="__main__")\n')
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600,
                        env=_env(), cwd=REPO)


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('faults') / 'run'
  result = _main(workdir, *SHORT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _grown(short_run, tmp_path):
  """A copy of the finished run, to be extended by 2 steps (so that it restores and trains)."""
  import shutil
  workdir = tmp_path / 'copy'
  shutil.copytree(short_run, workdir)
  return workdir


def test_run_resumes_from_the_same_checkpoint_through_transient_errors(short_run, tmp_path):
  workdir = _grown(short_run, tmp_path)
  steps = sorted(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  result = _inject(workdir, (
      'from pilaf_jax import checkpointing as ck\nck.RESTORE_BACKOFF_S = 0.0\nreal = ck.Checkpointer._restore_step\n'
      'calls = []\n'
      'def flaky(self, step, abstract):\n'
      '  calls.append(step)\n'
      '  if len(calls) <= 3: raise TimeoutError("injected")\n'
      '  return real(self, step, abstract)\n'
      'ck.Checkpointer._restore_step = flaky'), '--config.online.steps=6')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count('retrying') + result.stderr.count('retrying') == 3
  assert f'Resuming the online loop at step {steps[-1]} ' in result.stdout
  assert (workdir / 'checkpoints' / str(steps[-1])).is_dir()
  assert not (workdir / 'checkpoints.unreadable').exists()


def test_structure_mismatch_exits_2_in_one_line_and_deletes_nothing(short_run, tmp_path):
  workdir = _grown(short_run, tmp_path)
  before = _listing(workdir / 'checkpoints')
  result = _inject(workdir, (
      'import jax.numpy as jnp\nfrom pilaf_jax import checkpointing as ck\nreal = ck.Checkpointer.restore\n'
      'def upgraded(self, step, target, log=print):  # An optimiser upgrade: one more leaf.\n'
      '  return real(self, step, {"train": target.train, "labels_used": target.labels_used, '
      '"new_leaf": jnp.zeros(())}, log)\n'
      'ck.Checkpointer.restore = upgraded'), '--config.online.steps=6')
  line = _one_line_exit_2(result)
  assert 'new_leaf' in line and 'nothing was deleted' in line
  assert _listing(workdir / 'checkpoints') == before


def test_iterative_counts_labels_when_bought_and_logs_training_scalars(tmp_path):
  from tensorboardX.proto import event_pb2
  from test_tensorboard_events import _records
  workdir = tmp_path / 'iterative'
  result = _main(workdir, '--config.loop=iterative', '--config.iterative.iterations=1',
                 '--config.iterative.prompts_per_iteration=32', '--config.iterative.epochs=2',
                 '--config.eval.every_steps=1', '--config.runtime.log_every_steps=1', *SHORT[1:], timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [0, 1, 2, 3, 4]
  assert [r['labels_used'] for r in rows] == [0, 32, 32, 32, 32]  # Bought before step 1's update.
  assert rows[1]['oracle_responses'] == rows[-1]['oracle_responses'] > 0
  (events,) = list((workdir / 'tensorboard').iterdir())
  logged = {(v.tag, e.step) for e in (event_pb2.Event.FromString(r) for r in _records(str(events)))
            for v in e.summary.value}
  assert {('train/dpo_loss', s) for s in (1, 2, 3, 4)} <= logged


def test_two_loops_on_one_workdir_second_refused_first_as_solo(short_run, tmp_path):
  """The small version of benchmarks/concurrent_loops.py: the second loop starts once the first holds
  the lock, exits 2 in one line; the first ends with the solo run's metrics and labels."""
  from benchmarks import kill_resume as kr
  workdir = tmp_path / 'shared'
  cmd = [sys.executable, '-m', 'pilaf_jax.main', f'--config={TINY}', f'--workdir={workdir}', *SHORT]
  first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                           cwd=REPO)
  try:
    deadline = time.monotonic() + 120
    while not ((workdir / '.lock').exists() and (workdir / '.lock').read_text()) and first.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    second = _main(workdir, *SHORT)
    line = _one_line_exit_2(second)
    assert f'pid {first.pid}' in line
    log, _ = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, log[-3000:]
  largest, problems = kr.metrics_difference(kr.read_metrics(str(short_run)), kr.read_metrics(str(workdir)))
  assert not problems, problems
  assert kr.labels_lost(kr.store_rows(str(short_run))['rows'], kr.store_rows(str(workdir))['rows']) == []


@pytest.mark.parametrize('case', ['transient', 'mismatch', 'unreadable', 'unreadable_given'])
def test_cached_reference_follows_the_same_rules(tmp_path, monkeypatch, case):
  import orbax.checkpoint as ocp
  from pilaf_jax.config_validation import ConfigError
  from pilaf_jax.learning.reference import restore_reference
  cached = tmp_path / 'reference' / 'params'
  saver = ocp.StandardCheckpointer()
  saver.save(cached, _tree())
  saver.wait_until_finished()
  given = str(tmp_path / 'reference') if case == 'unreadable_given' else ''
  target = _tree(extra=case == 'mismatch')
  if case.startswith('unreadable'):
    victim = max((p for p in cached.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)
  if case == 'transient':
    real, calls = ocp.StandardCheckpointer.restore, []

    def flaky(self, *args, **kwargs):
      calls.append(1)
      if len(calls) <= 2:
        raise OSError(5, 'Input/output error')
      return real(self, *args, **kwargs)
    monkeypatch.setattr(ocp.StandardCheckpointer, 'restore', flaky)
  before = _listing(tmp_path)
  messages = []
  restore = lambda: restore_reference(cached, target, given, messages.append)
  if case == 'transient':
    params = restore()
    np.testing.assert_array_equal(params['a'], np.arange(3))
    assert _listing(tmp_path) == before
  elif case == 'mismatch':
    with pytest.raises(RestoreError, match='opt.count'):
      restore()
    assert _listing(tmp_path) == before
  elif case == 'unreadable_given':  # Another run's reference: refused, left as it is.
    with pytest.raises(ConfigError, match='sft.init_checkpoint'):
      restore()
    assert _listing(tmp_path) == before
  else:  # The workdir's own cache: set aside whole (then trained again by the caller).
    assert restore() is None
    assert not cached.exists()
    (aside,) = list((tmp_path / 'reference.unreadable').iterdir())
    assert sorted(_listing(aside).values()) == sorted(before.values())
    assert any('set aside' in m for m in messages)
