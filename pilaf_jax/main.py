r"""Runs one experiment: python -m pilaf_jax.main --config=configs/<name>.py --workdir=<dir>.

Without --config it runs the embedded default (online DPO with PILAF on the synthetic task, CPU,
minutes). Any field can be overridden: --config.sampler.name=vanilla --config.seed=3. Running again
with the same workdir resumes where the run stopped. --help_config lists every config field with
its default and meaning.
"""
from __future__ import annotations

import os
import sys
import time


def _lock_before_imports():
  """(lock, error): the workdir's lock, tried as the very first thing when this module runs as a
  program, so that of two loops started a moment apart the first to start is the one that runs
  (importing jax takes seconds, more on a loaded machine). Only for what can be a single-process run
  on a local workdir, judged from the command line and environment alone; run() decides (a refusal
  is final only once the config says single-process). (None, None) when not tried."""
  args = sys.argv[1:]
  if (os.environ.get('PILAF_COORDINATOR') or os.environ.get('PILAF_NUM_PROCESSES', '1') not in ('', '1')
      or any(a.startswith(('--config.distributed', '--dry_run', '--help', '--helpfull')) for a in args)
      or any(not a.startswith('-') for a in args)):  # A bad command line writes nothing (main says why).
    return None, None
  workdir = next((a.split('=', 1)[1] for a in args if a.startswith('--workdir=')), None)
  if not workdir or '://' in workdir:
    return None, None
  from pilaf_jax import workdir_lock
  try:
    return workdir_lock.take(workdir), None
  except (workdir_lock.WorkdirBusy, workdir_lock.WorkdirError) as e:
    return None, e


_EARLY_LOCK, _EARLY_ERROR = _lock_before_imports() if __name__ == '__main__' else (None, None)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_USER_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def _config_file_traceback(e: Exception) -> str:
  """The traceback of an error raised by the config file's own code (a bug in it), else ''."""
  import traceback
  text = str(e)
  if isinstance(e, flags.Error) and 'Error whilst parsing config file' in text and 'Traceback' in text:
    return text[text.index('Traceback'):].replace('\\n', '\n')  # config_flags formats it into the message.
  library = (os.sep + 'ml_collections' + os.sep, os.sep + 'absl' + os.sep, os.path.abspath(__file__))
  frames = traceback.extract_tb(e.__traceback__)
  if any(not f.filename.startswith('<') and not any(m in f.filename for m in library) for f in frames):
    return ''.join(traceback.format_exception(type(e), e, e.__traceback__))
  return ''


def _exit_bad_command_line(e: Exception) -> None:
  """User mistakes (unknown fields, bad values, missing files) in one line, not a traceback; an error
  raised by the config file's own code is shown with its traceback, where it happened."""
  trace = _config_file_traceback(e)
  if trace:
    raised = trace.strip().splitlines()[-1].split(':')[0]
    print(f'{trace.rstrip()}\nerror: the config file raised {raised} (above: a bug in the file, '
          'not an unknown field).', file=sys.stderr)
    sys.exit(2)
  message = ' '.join(str(e).replace('\\n', '\n').replace("\\'", "'").split()).strip('\'"')
  if isinstance(e, (KeyError, AttributeError)):  # An override of a field the config lacks.
    name, _, hint = message.partition(' Did you mean')
    name = name.strip('\'" ')
    flag = next((a.split('=')[0] for a in sys.argv if a.startswith('--config.') and
                 a.split('=')[0].endswith('.' + name)), name)
    message = f'{flag} is not a config field' + (f' (did you mean{hint.rstrip("?")}?)' if hint else '') + \
        '. Run with --helpfull, or see pilaf_jax/default_config.py, for the fields.'
  print(f'error: bad command line: {message}', file=sys.stderr)
  sys.exit(2)


_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default_config.py')
try:  # With a default file, config_flags applies --config.* overrides right here.
  _CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'An ml_collections config file.')
except _USER_ERRORS as e:
  _exit_bad_command_line(e)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, labels and metrics.')
flags.DEFINE_bool('help_config', False, 'Print every config field with its default and meaning, '
                  'then exit.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the resolved config, the mesh and the per-device '
                             'memory estimate, then exit without running (no --workdir, data or '
                             'checkpoint files needed).')
_TOPOLOGY = flags.DEFINE_string('topology', '', 'With --dry_run: plan for this TPU topology (v5p-32, '
                                'v5p:2x2x4) and compile every program of the run for it '
                                '(python -m pilaf_jax.tools.aot; needs libtpu, not a TPU).')


def _config_list() -> str:
  """One line per config file in the repository's configs/ (its docstring's first sentence)."""
  import ast
  from pilaf_jax.config_help import first_sentence
  directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  if not os.path.isdir(directory):
    return ''
  lines = []
  for name in sorted(os.listdir(directory)):
    if name.endswith('.py'):
      with open(os.path.join(directory, name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ''
      lines.append(f'  configs/{name:<24} {first_sentence(doc.split(chr(10) * 2)[0])}')
  return '\n\nConfigs (--config=...):\n' + '\n'.join(lines)


__doc__ += _config_list()  # absl's --help prints the main module's docstring.


def _print(message: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(message, flush=True)


def dry_run(config, topology: str = '') -> int:
  """Prints what a run would use (resolved config, mesh, memory per device); returns the exit code.

  Checkpoints that are not on this machine are not read: the plan then uses the config's own
  architecture fields (the 8B configs carry the preset). With a topology, the devices are that TPU
  topology's (no TPU needed) and every program of the run is compiled for it (tools/aot.py).
  """
  import jax
  from pilaf_jax import config_validation
  from pilaf_jax.config_validation import ConfigError
  from pilaf_jax.parallel.mesh import resolve_mesh_shape
  from pilaf_jax.tools import memory_report
  try:
    config_validation.validate(config)
    missing = config_validation.missing_checkpoints(config)
    config = config_validation.resolve_checkpoints(config, planning=True)
    if topology:
      from pilaf_jax.tools import aot
      devices = aot.topology_devices(topology)
      where = f'{topology} ({devices[0].device_kind}, compiled here without one)'
    else:
      devices, where = jax.devices(), f'{jax.default_backend()}'
    shape = resolve_mesh_shape(config.mesh, len(devices))
    report = memory_report.build_report(config, len(devices))
  except (ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(config.to_json_best_effort(indent=2, sort_keys=True))
  for entry in missing:
    print(f'note: {entry} is not on this machine; planned with the config\'s architecture fields '
          '(a run needs the file).')
  print(f'\nmesh: data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} over {len(devices)} {where} '
        f'device(s)\n')
  print(memory_report.format_table(report))
  if topology:
    from pilaf_jax.tools import aot
    print()
    return aot.run(config, topology, title=f'Every program compiled for {topology}')
  return 0


def run(config, workdir: str) -> int:
  """The whole experiment; returns the process exit code."""
  import sqlite3
  from pilaf_jax.workdir_lock import WorkdirBusy, WorkdirError, file_system_error
  try:  # First of all: of two loops started a moment apart, the first to start is the one that runs.
    lock = _lock_single_process_workdir(config, workdir)
  except (WorkdirBusy, WorkdirError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  from pilaf_jax import config_validation
  from pilaf_jax.config_validation import ConfigError
  from pilaf_jax.labelling.label_store import LabelStoreMismatch
  from pilaf_jax.checkpointing import RestoreError
  from pilaf_jax.model.checkpoints import CheckpointError
  user_errors = (ConfigError, LabelStoreMismatch, CheckpointError, RestoreError, WorkdirBusy, WorkdirError)
  try:
    from pilaf_jax.parallel import multihost
    config_validation.validate(config)
    config = config_validation.resolve_checkpoints(config)
    multihost.initialize_distributed(config.distributed)
    from pilaf_jax import experiment, workdir_config
    started = time.time()
    from pilaf_jax import paths
    try:
      paths.check_remote(workdir)  # A gs:// workdir: gcsfs installed, bucket reachable.
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if lock is None:
      lock = _lock_workdir(workdir)  # Before anything is written there; released on exit.
    workdir_config.check_workdir(config, workdir)
    exp = experiment.Experiment(config, workdir)  # Opens (and checks) the label store.
    workdir_config.write_workdir(config, workdir)  # Only once everything agreed with the workdir.
  except user_errors as e:
    _release(lock)
    print(f'error: {e}', file=sys.stderr)
    return 2
  except (OSError, sqlite3.Error) as e:
    _release(lock)
    print(f'error: {file_system_error(e, f"--workdir={workdir}")}', file=sys.stderr)
    return 2

  try:
    _print(f'pilaf_jax: {config.loop} DPO, sampler={config.sampler.name}, oracle={config.oracle.label_rule}, '
           f'beta={config.beta}, seed={config.seed}, workdir={workdir}')
    try:
      if config.loop == 'online':
        from pilaf_jax.loops.online import run_online
        run_online(exp, _print)
      else:
        from pilaf_jax.loops.iterative import run_iterative
        run_iterative(exp, _print)
      counts = exp.store.counts() if exp.store is not None else None
      time_split = exp.phases.summary()
    except user_errors as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    except (OSError, sqlite3.Error) as e:  # Disk full, a workdir gone read-only, ...
      print(f'error: {file_system_error(e, f"writing to --workdir={workdir} failed")}', file=sys.stderr)
      return 2
    finally:
      exp.close()

    if counts is not None:  # Process 0 holds the label store and writes the metrics.
      rows = paths.read_metrics(workdir)
      print('\n' + format_table(rows))
      if len(rows) > 1:
        from pilaf_jax.evaluation.gains import format_gains
        print(format_gains(rows[0], rows[-1]))
      if rows and 'responses' in rows[-1]:
        print('\n' + format_responses(rows[0], rows[-1]))
      print(f'\nLabels: {counts["labelled_pairs"]} pairs labelled, {counts["queried_twice"]} queried twice. '
            f'Wall time {time.time() - started:.0f} s. Metrics: {paths.join(workdir, "metrics.jsonl")}')
      print(time_split, flush=True)
    return 0
  finally:
    _release(lock)


def format_table(rows: list[dict]) -> str:
  """The final table printed on stdout."""
  lines = [f'{"step":>6} {"labels":>8} {"reward":>16} {"KL":>16} {"J":>16}']
  for r in rows:
    lines.append(f'{r["step"]:>6} {r["labels_used"]:>8} {r["reward"]:>8.3f} ± {r["reward_se"]:<5.3f} '
                 f'{r["kl"]:>8.3f} ± {r["kl_se"]:<5.3f} {r["J"]:>8.3f} ± {r["J_se"]:<5.3f}')
  return '\n'.join(lines)


def format_responses(first: dict, last: dict) -> str:
  """Held-out responses of two evaluation rows (eval.show_responses), side by side per prompt."""
  lines = []
  for a, b in zip(first['responses'], last['responses']):
    lines += [a['prompt'].replace('\n', ' | '),
              f'  step {first["step"]:>4} (reward {a["reward"]:+.2f}): {a["response"]!r}',
              f'  step {last["step"]:>4} (reward {b["reward"]:+.2f}): {b["response"]!r}']
  return '\n'.join(lines)


def _lock_single_process_workdir(config, workdir: str):
  """The workdir's lock, taken before any heavy import, for a single-process run on a local workdir
  (the common case); None otherwise (_lock_workdir takes it once every process is up)."""
  global _EARLY_LOCK
  from pilaf_jax import paths, workdir_lock
  from pilaf_jax.parallel.multihost import resolve_settings
  try:
    single = not resolve_settings(config.distributed).enabled and not paths.is_remote(workdir)
  except ValueError:
    single = False  # validate() reports it.
  if not single:  # _lock_workdir takes it once every process is up.
    if _EARLY_LOCK is not None:
      _EARLY_LOCK.release()
      _EARLY_LOCK = None
    return None
  if _EARLY_ERROR is not None:
    raise _EARLY_ERROR
  if _EARLY_LOCK is not None:
    return _EARLY_LOCK
  return workdir_lock.take(workdir)


def _lock_workdir(workdir: str):
  """Creates the workdir and takes its lock (process 0; every process learns the outcome)."""
  import jax
  from pilaf_jax import checkpointing, workdir_lock
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      workdir_lock.prepare_workdir(workdir)
      from pilaf_jax import paths
      paths.makedirs(workdir)  # A local directory, or a gs:// URL (see pilaf_jax/paths.py).
      lock = workdir_lock.WorkdirLock(workdir)
      lock.acquire()
    except (workdir_lock.WorkdirBusy, workdir_lock.WorkdirError) as e:
      lock, error = None, e
  if checkpointing.worst_outcome(int(error is not None)):
    raise error or workdir_lock.WorkdirBusy(f'process 0 could not take the workdir {workdir} (see its log).')
  return lock


def _release(lock) -> None:
  if lock is not None:
    lock.release()


_HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def _exit_after_help(write) -> None:
  """Runs write() (help text to stdout) and exits 0; a closed pipe (`| head`) is not an error."""
  try:
    write()
    sys.stdout.flush()
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  sys.exit(0)


def _parse_flags(argv):
  # Help is what was asked for, so it exits 0 (absl's own --help exits 1), before any config loads.
  if '--help_config' in argv[1:]:
    from pilaf_jax.config_help import format_config_help
    _exit_after_help(lambda: print(format_config_help()))
  if any(a in _HELP_FLAGS for a in argv[1:]):
    _exit_after_help(lambda: app.usage(shorthelp='--helpfull' not in argv[1:], writeto_stdout=True))
  from pilaf_jax import config_aliases  # Former field names: renamed here, with a deprecation line.
  argv = config_aliases.rewrite_overrides(argv)
  sys.argv[1:] = argv[1:]  # config_flags reads the overrides from sys.argv when the config loads.
  try:
    return flags.FLAGS(argv)
  except _USER_ERRORS as e:
    _exit_bad_command_line(e)


def _loaded_config():
  """The config file with its overrides (they load lazily: forced here), former field names resolved."""
  from pilaf_jax import config_aliases
  try:
    config = _CONFIG.value
    config.to_dict()
  except _USER_ERRORS as e:
    _exit_bad_command_line(e)
  return config_aliases.resolve(config)


def main(argv) -> None:
  if len(argv) > 1:
    print(f'error: bad command line: unexpected argument {argv[1]!r}; flags are written '
          '--name=value (e.g. --workdir=runs/x, --config.seed=3; see --help).', file=sys.stderr)
    sys.exit(2)
  if _DRY_RUN.value:
    sys.exit(dry_run(_loaded_config(), _TOPOLOGY.value))
  if _TOPOLOGY.value:
    print('error: --topology plans a run; use it with --dry_run.', file=sys.stderr)
    sys.exit(2)
  if not _WORKDIR.value:
    print('error: --workdir is required (a directory for checkpoints, labels and metrics).',
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  sys.exit(run(_loaded_config(), _WORKDIR.value))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
