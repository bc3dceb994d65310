r"""Runs one experiment: python -m pilaf_jax.main --config=configs/<name>.py --workdir=<dir>.

Without --config it runs the embedded default (online DPO with PILAF on the synthetic task, CPU,
minutes). Any field can be overridden: --config.sampler.name=vanilla --config.seed=3. Running again
with the same workdir resumes where the run stopped.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_USER_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def _exit_bad_command_line(e: Exception) -> None:
  """User mistakes (unknown fields, bad values, missing files) in one line, not a traceback."""
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
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the resolved config, the mesh and the per-device '
                             'memory estimate, then exit without running (no --workdir, data or '
                             'checkpoint files needed).')
_TOPOLOGY = flags.DEFINE_string('topology', '', 'With --dry_run: plan for this TPU topology (v5p-32, '
                                'v5p:2x2x4) and compile every program of the run for it '
                                '(python -m pilaf_jax.tools.aot; needs libtpu, not a TPU).')


def _config_list() -> str:
  """One line per config file in the repository's configs/ (its docstring's first line)."""
  import ast
  directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  if not os.path.isdir(directory):
    return ''
  lines = []
  for name in sorted(os.listdir(directory)):
    if name.endswith('.py'):
      with open(os.path.join(directory, name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ''
      lines.append(f'  configs/{name:<24} {doc.splitlines()[0] if doc else ""}')
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
  from pilaf_jax import config_validation
  from pilaf_jax.config_validation import ConfigError
  from pilaf_jax.labelling.label_store import LabelStoreMismatch
  from pilaf_jax.model.checkpoints import CheckpointError
  user_errors = (ConfigError, LabelStoreMismatch, CheckpointError)

  try:
    config_validation.validate(config)
    config = config_validation.resolve_checkpoints(config)
    from pilaf_jax.parallel import multihost
    multihost.initialize_distributed(config.distributed)
    from pilaf_jax import experiment
    from pilaf_jax.loops.common import Timer, format_table
    timer = Timer()
    from pilaf_jax import paths
    try:
      paths.check_remote(workdir)  # A gs:// workdir: gcsfs installed, bucket reachable.
    except ValueError as e:
      raise ConfigError(str(e)) from None
    paths.makedirs(workdir)  # A local directory, or a gs:// URL (see pilaf_jax/paths.py).
    experiment.check_workdir(config, workdir)
    exp = experiment.Experiment(config, workdir)  # Opens (and checks) the label store.
    experiment.write_workdir(config, workdir)  # Only once everything agreed with the workdir.
  except user_errors as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  _print(f'pilaf_jax: {config.loop} DPO, sampler={config.sampler.name}, oracle={config.oracle.name}, '
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
  finally:
    exp.close()

  if counts is not None:  # Process 0 holds the label store and writes the metrics.
    metrics = paths.join(workdir, 'metrics.jsonl')
    rows = [json.loads(line) for line in paths.read_text(metrics).splitlines() if line.strip()]
    print('\n' + format_table(rows))
    print(f'\nLabels: {counts["labelled_pairs"]} pairs labelled, {counts["queried_twice"]} queried twice. '
          f'Wall time {timer.elapsed():.0f} s. Metrics: {metrics}')
    print(time_split, flush=True)
  return 0


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _USER_ERRORS as e:
    _exit_bad_command_line(e)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _DRY_RUN.value:
    try:
      config = _CONFIG.value
      config.to_dict()
    except _USER_ERRORS as e:
      _exit_bad_command_line(e)
    sys.exit(dry_run(config, _TOPOLOGY.value))
  if _TOPOLOGY.value:
    print('error: --topology plans a run; use it with --dry_run.', file=sys.stderr)
    sys.exit(2)
  if not _WORKDIR.value:
    print('error: --workdir is required (a directory for checkpoints, labels and metrics).',
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  try:  # The config file and its overrides load lazily: force them here.
    config = _CONFIG.value
    config.to_dict()
  except _USER_ERRORS as e:
    _exit_bad_command_line(e)
  sys.exit(run(config, _WORKDIR.value))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
