r"""Sampler studies: a grid of runs (samplers x seeds x settings), each its own resumable workdir, and
a report with statistics over seeds.

  python -m pilaf_jax.study --config=configs/default.py --samplers=vanilla,pilaf,hybrid,best_of_n \
      --seeds=0-9 --workdir=studies/online [--config.dpo.learning_rate=1e-4 ...] \
      [--sweep=dpo.batch_size=32,64 ...] [--protocol=iterative_branch]
  python -m pilaf_jax.study report --workdir=studies/online [--threshold_fraction=0.9]
  python -m pilaf_jax.study status --workdir=studies/online
  python -m pilaf_jax.study compare --workdirs=studies/a,studies/b --out=docs/x.md  # one table across studies

Every run is a subprocess `python -m pilaf_jax.main` with its own workdir under <workdir>/runs/, so a
crash or a kill of one run loses nothing of the others. Running the same study command again (or just
`python -m pilaf_jax.study --workdir=<dir>`, which reads the saved study.json) resumes: finished runs
are skipped, an unfinished run resumes from its own checkpoints and label store.

All runs of a setting share one SFT reference: the first run trains it in its workdir, every other
run gets --config.sft.init_checkpoint=<that workdir>/reference. (Settings that sweep task.*, model.*
or sft.* fields get one reference each.)

Protocols:
  independent       (default) every (sampler, seed) runs the config's loop from the reference.
  iterative_branch  the paper's Table 2 protocol: per seed, iteration 1 of iterative DPO runs once
                    with vanilla sampling (runs/<setting>/branch/seed<k>); every sampler then branches
                    from its final checkpoint (--config.iterative.init_checkpoint) for the remaining
                    iterations.

--config.* flags apply to every run; each --sweep=field=v1,v2 adds an axis to the grid (settings are
the product of the sweeps). study.json records the grid and the exact command of every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Optional

STUDY_FILE = 'study.json'
LOCK_FILE = 'study.lock'
PROTOCOLS = ('independent', 'iterative_branch')
# Overrides whose change makes another SFT reference.
_REFERENCE_FIELDS = ('task.', 'model.', 'sft.')
# Fields of the spec that fix what the existing runs mean: a rerun must not change them.
_FIXED_SPEC_FIELDS = ('config', 'overrides', 'sweeps', 'protocol')


class StudyError(ValueError):
  """A user mistake; printed in one line, exit status 2."""


# --- the grid --------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
  """'0-9' -> [0..9]; '0,3,5-7' -> [0, 3, 5, 6, 7]."""
  seeds = []
  for part in str(text).split(','):
    part = part.strip()
    if not part:
      continue
    try:
      if '-' in part[1:]:
        lo, hi = part.split('-', 1) if not part.startswith('-') else (part, part)
        seeds.extend(range(int(lo), int(hi) + 1))
      else:
        seeds.append(int(part))
    except ValueError:
      raise StudyError(f'--seeds={text!r}: expected integers and ranges, e.g. 0-9 or 0,2,5-7.') from None
  if not seeds:
    raise StudyError(f'--seeds={text!r} names no seed.')
  return sorted(set(seeds))


def parse_sweep(text: str) -> tuple[str, list[str]]:
  """'dpo.learning_rate=1e-4,3e-4' -> ('dpo.learning_rate', ['1e-4', '3e-4'])."""
  field, sep, values = text.partition('=')
  field = field.strip().removeprefix('--config.').removeprefix('config.')
  vals = [v.strip() for v in values.split(',') if v.strip()]
  if not sep or not field or not vals:
    raise StudyError(f'--sweep={text!r}: expected field=value1,value2 (e.g. dpo.learning_rate=1e-4,3e-4).')
  return field, vals


def settings(spec: dict) -> list[tuple[str, list[str]]]:
  """(name, overrides) of every setting: the product of the sweeps ('base' when there are none)."""
  sweeps = spec.get('sweeps') or {}
  if not sweeps:
    return [('base', [])]
  fields = list(sweeps)
  out = []
  for values in itertools.product(*(sweeps[f] for f in fields)):
    name = ','.join(f'{f}={v}' for f, v in zip(fields, values))
    out.append((name, [f'--config.{f}={v}' for f, v in zip(fields, values)]))
  return out


@dataclasses.dataclass
class Run:
  name: str  # '<setting>/<sampler>/seed<k>' or '<setting>/branch/seed<k>'.
  setting: str
  sampler: str  # 'branch' for the shared iteration-1 run of iterative_branch.
  seed: int
  workdir: str
  command: list
  needs: list  # Names of runs that must finish first (the reference owner, the branch point).

  @property
  def log(self) -> str:
    return self.workdir + '.log'


def _has_override(overrides: list[str], field: str) -> bool:
  return any(o.split('=', 1)[0] == f'--config.{field}' for o in overrides)


def plan(spec: dict, workdir: str) -> list[Run]:
  """Every run of the study, in execution order (each after the runs it needs)."""
  workdir = os.path.abspath(workdir)
  base = [sys.executable, '-m', 'pilaf_jax.main', f'--config={spec["config_path"]}']
  shared_ref = not _has_override(spec['overrides'], 'sft.init_checkpoint')
  setting_list = settings(spec)
  per_setting_reference = any(f.startswith(_REFERENCE_FIELDS) for f in (spec.get('sweeps') or {}))
  runs: list[Run] = []
  owner: Optional[Run] = None
  for setting, setting_overrides in setting_list:
    if per_setting_reference:
      owner = None
    root = os.path.join(workdir, 'runs', setting)

    def make(sampler: str, seed: int, extra: list[str]) -> Run:
      nonlocal owner
      wd = os.path.join(root, sampler, f'seed{seed}')
      cmd = base + [f'--workdir={wd}'] + spec['overrides'] + setting_overrides + extra + [
          f'--config.seed={seed}', '--config.runtime.progress_bar=False']
      needs = []
      if shared_ref and owner is not None:
        cmd.append(f'--config.sft.init_checkpoint={os.path.join(owner.workdir, "reference")}')
        needs.append(owner.name)
      run = Run(f'{setting}/{sampler}/seed{seed}', setting, sampler, seed, wd, cmd, needs)
      if shared_ref and owner is None:
        owner = run
      return run

    if spec['protocol'] == 'iterative_branch':
      branches = {}
      for seed in spec['seeds']:
        branches[seed] = make('branch', seed, ['--config.loop=iterative', '--config.sampler.name=vanilla',
                                               '--config.iterative.first_iteration_sampler=vanilla',
                                               '--config.iterative.iterations=1'])
        runs.append(branches[seed])
      for sampler in spec['samplers']:
        for seed in spec['seeds']:
          point = os.path.join(branches[seed].workdir, 'checkpoints')
          run = make(sampler, seed, ['--config.loop=iterative', f'--config.sampler.name={sampler}',
                                     f'--config.iterative.init_checkpoint={point}'])
          run.needs.append(branches[seed].name)
          runs.append(run)
    else:
      for sampler in spec['samplers']:
        for seed in spec['seeds']:
          runs.append(make(sampler, seed, [f'--config.sampler.name={sampler}']))
  return runs


# --- the state of a run, read from its workdir -----------------------------------------------------

def final_step(config: dict) -> int:
  """The step at which a run with this (resolved) config ends."""
  if config['loop'] == 'online':
    return int(config['online']['steps'])
  it = config['iterative']
  return int(it['iterations']) * int(it['epochs']) * (int(it['prompts_per_iteration']) //
                                                       int(config['dpo']['batch_size']))


def read_metrics(workdir: str) -> list[dict]:
  rows = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          pass  # A line torn by a kill.
  return rows


def read_config(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)['config']


def run_state(workdir: str) -> tuple[str, int, int]:
  """('done' | 'partial' | 'new', last evaluated step, final step (0 when unknown)).

  Done means: the final evaluation is in metrics.jsonl and the final checkpoint is on disk (later
  runs may branch from it)."""
  config = read_config(workdir)
  if config is None:
    return 'new', -1, 0
  last = final_step(config)
  rows = read_metrics(workdir)
  evaluated = max((r.get('step', -1) for r in rows), default=-1)
  checkpoint = os.path.isdir(os.path.join(workdir, 'checkpoints', str(last)))
  return ('done' if evaluated >= last and checkpoint else 'partial'), evaluated, last


# --- running ---------------------------------------------------------------------------------------

def _die_with_parent() -> None:
  """In the child: get SIGKILL when the study process dies, so a killed study leaves no run behind."""
  try:
    import ctypes
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # Not Linux: the study lock (inherited by the child) still refuses a second study.


def _final_summary(workdir: str) -> str:
  rows = read_metrics(workdir)
  if not rows:
    return ''
  r = rows[-1]
  return f'J {r["J"]:.3f} ± {r["J_se"]:.3f} (reward {r["reward"]:.3f}, KL {r["kl"]:.3f}) at step {r["step"]}'


def _format_seconds(s: float) -> str:
  return f'{s:.0f} s' if s < 120 else f'{s / 60:.1f} min'


class _Lock:
  """One study process per directory: an flock held (and inherited by the running child) while it runs."""

  def __init__(self, workdir: str):
    self.fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self.fd)
      raise StudyError(f'another study process (or a run it started) is still running in {workdir}; '
                       'wait for it or stop it first.') from None

  def release(self) -> None:
    os.close(self.fd)


def run_study(spec: dict, workdir: str, out=print, env: Optional[dict] = None) -> int:
  """Runs every unfinished run of the study in order; returns 0 when all are done."""
  runs = plan(spec, workdir)
  lock = _Lock(workdir)
  interrupted = {'signal': None}
  child: dict = {'proc': None}

  def on_signal(signum, frame):
    del frame
    interrupted['signal'] = signum
    if child['proc'] is not None and child['proc'].poll() is None:
      child['proc'].send_signal(signal.SIGTERM)  # The run saves a checkpoint and exits.
  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  failed: dict[str, str] = {}
  durations = []
  try:
    states = {r.name: run_state(r.workdir)[0] for r in runs}
    done_at_start = sum(s == 'done' for s in states.values())
    out(f'study {workdir}: {len(runs)} runs ({done_at_start} already done), protocol {spec["protocol"]}.')
    for index, run in enumerate(runs, 1):
      if interrupted['signal']:
        break
      state, evaluated, last = run_state(run.workdir)
      if state == 'done':
        continue
      blocked = [n for n in run.needs if n in failed or run_state(next(
          r.workdir for r in runs if r.name == n))[0] != 'done']
      if blocked:
        failed[run.name] = f'skipped: needs {", ".join(blocked)}'
        out(f'[{index}/{len(runs)}] {run.name}: skipped (needs {", ".join(blocked)}, not finished).')
        continue
      left = sum(run_state(r.workdir)[0] != 'done' for r in runs)
      eta = f', about {_format_seconds(left * sum(durations) / len(durations))} to go' if durations else ''
      what = f'resuming after step {evaluated} of {last}' if state == 'partial' else 'starting'
      out(f'[{index}/{len(runs)}] {run.name}: {what}; {left} runs left{eta}. Log: {run.log}')
      os.makedirs(os.path.dirname(run.workdir), exist_ok=True)
      start = time.time()
      with open(run.log, 'a') as log:
        log.write(f'\n$ {shlex.join(run.command)}\n')
        log.flush()
        proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent, pass_fds=(lock.fd,))
        child['proc'] = proc
        rc = proc.wait()
        child['proc'] = None
      seconds = time.time() - start
      state = run_state(run.workdir)[0]
      if state == 'done':
        durations.append(seconds)
        out(f'[{index}/{len(runs)}] {run.name}: done in {_format_seconds(seconds)}; '
            f'{_final_summary(run.workdir)}.')
      elif interrupted['signal']:
        out(f'[{index}/{len(runs)}] {run.name}: interrupted (signal {interrupted["signal"]}); '
            'run the same command again to resume.')
      else:
        with open(run.log) as f:
          tail = f.read()[-2000:]
        failed[run.name] = f'exit status {rc}'
        out(f'[{index}/{len(runs)}] {run.name}: FAILED (exit status {rc}) after '
            f'{_format_seconds(seconds)}; the end of its log:\n{tail}')
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    lock.release()
  if interrupted['signal']:
    return 128 + interrupted['signal']
  done = sum(run_state(r.workdir)[0] == 'done' for r in runs)
  out(f'study {workdir}: {done}/{len(runs)} runs done' +
      (f'; not done: {"; ".join(f"{k} ({v})" for k, v in failed.items())}' if failed else '') +
      f'. Report: python -m pilaf_jax.study report --workdir={workdir}')
  return 0 if done == len(runs) else 1


def status(spec: dict, workdir: str, out=print) -> int:
  runs = plan(spec, workdir)
  counts = {'done': 0, 'partial': 0, 'new': 0}
  for run in runs:
    state, evaluated, last = run_state(run.workdir)
    counts[state] += 1
    detail = f'step {evaluated}/{last}' if state != 'new' else ''
    out(f'{state:>8}  {run.name}  {detail}')
  out(f'{counts["done"]} done, {counts["partial"]} partial, {counts["new"]} not started, of {len(runs)}.')
  return 0


# --- the spec: command line and study.json ---------------------------------------------------------

def load_spec(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, STUDY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_spec(spec: dict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  runs = plan(spec, workdir)
  spec = dict(spec, commands={r.name: shlex.join(r.command) for r in runs})
  path = os.path.join(workdir, STUDY_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(spec, f, indent=2)
  os.replace(path + '.tmp', path)


def make_spec(args, overrides: list[str], saved: Optional[dict]) -> dict:
  """The study's spec from the command line, completed by (and checked against) the saved one."""
  given = {}
  if args.config is not None:
    given['config'] = args.config
    given['config_path'] = os.path.abspath(args.config)
  if overrides:
    given['overrides'] = overrides
  if args.sweep:
    sweeps = {}
    for text in args.sweep:
      field, values = parse_sweep(text)
      sweeps[field] = values
    given['sweeps'] = sweeps
  if args.protocol is not None:
    given['protocol'] = args.protocol
  if saved is not None:
    for key in _FIXED_SPEC_FIELDS:
      if key in given and given[key] != saved.get(key):
        raise StudyError(f'{args.workdir} holds a study with {key}={saved.get(key)!r}, not {given[key]!r}; '
                         'use a fresh --workdir, or rerun with the saved values (see its study.json).')
    spec = {k: v for k, v in saved.items() if k != 'commands'}
    for key in ('overrides', 'sweeps'):  # Absent on this command line: keep the saved ones.
      given.setdefault(key, spec.get(key))
  else:
    spec = {'config': None, 'config_path': None, 'overrides': [], 'sweeps': {}, 'protocol': 'independent',
            'samplers': [], 'seeds': []}
  spec.update({k: v for k, v in given.items() if v is not None})
  if args.samplers:
    new = [s.strip() for s in args.samplers.split(',') if s.strip()]
    spec['samplers'] = spec['samplers'] + [s for s in new if s not in spec['samplers']]
  if args.seeds:
    spec['seeds'] = sorted(set(spec['seeds']) | set(parse_seeds(args.seeds)))
  if not spec.get('config_path'):
    spec['config'] = 'pilaf_jax/default_config.py'
    spec['config_path'] = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default_config.py')
  if not os.path.exists(spec['config_path']):
    raise StudyError(f'--config={spec["config"]!r}: no such file.')
  if spec['protocol'] not in PROTOCOLS:
    raise StudyError(f'--protocol={spec["protocol"]!r} is unknown; allowed: {list(PROTOCOLS)}.')
  if not spec['samplers']:
    raise StudyError('--samplers is required, e.g. --samplers=vanilla,pilaf,hybrid,best_of_n.')
  if not spec['seeds']:
    raise StudyError('--seeds is required, e.g. --seeds=0-9.')
  for field in ('seed', 'sampler.name', 'loop' if spec['protocol'] == 'iterative_branch' else None):
    if field and _has_override(spec['overrides'], field):
      raise StudyError(f'--config.{field} is set by the study itself (use --samplers / --seeds'
                       f'{" / --protocol" if field == "loop" else ""}).')
  if spec.get('sweeps'):
    for field in spec['sweeps']:
      if field in ('seed', 'sampler.name'):
        raise StudyError(f'--sweep={field}: use --seeds / --samplers for that axis.')
  return spec


def _parser(command: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f'python -m pilaf_jax.study{"" if command == "run" else " " + command}',
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='The study directory.')
  if command == 'run':
    p.add_argument('--config', default=None, help='A config file (default: the embedded default).')
    p.add_argument('--samplers', default=None, help='Comma-separated sampler names.')
    p.add_argument('--seeds', default=None, help="Seeds: '0-9', '0,2,5-7'.")
    p.add_argument('--sweep', action='append', default=[], help='field=v1,v2: an axis of the grid.')
    p.add_argument('--protocol', default=None, choices=PROTOCOLS)
    p.add_argument('--dry_run', action='store_true', help='Print the runs and their commands; run nothing.')
  if command == 'report':
    p.add_argument('--threshold_fraction', type=float, default=0.9,
                   help="J threshold for 'labels to reach': J0 + fraction * (vanilla's final J - J0).")
    p.add_argument('--threshold', type=float, default=None, help='An absolute J threshold instead.')
    p.add_argument('--baseline', default='vanilla', help='The sampler the others are paired against.')
    p.add_argument('--compute', default='decode', choices=('decode', 'all'),
                   help="x axis of the compute plot: decode tokens, or decode + teacher-forced scoring.")
    p.add_argument('--no_plots', action='store_true')
  return p


def _compare(argv: list[str]) -> int:
  """python -m pilaf_jax.study compare --workdirs=a,b,... --out=<file.md>: one table across studies."""
  p = argparse.ArgumentParser(prog='python -m pilaf_jax.study compare')
  p.add_argument('--workdirs', required=True, help='Comma-separated study directories.')
  p.add_argument('--out', required=True, help='The markdown file to write (a forest plot goes beside it).')
  p.add_argument('--baseline', default='vanilla')
  p.add_argument('--threshold_fraction', type=float, default=0.9)
  p.add_argument('--no_plots', action='store_true')
  args = p.parse_args(argv)
  from pilaf_jax.analysis.report import compare_studies
  try:
    path = compare_studies([os.path.abspath(w) for w in args.workdirs.split(',') if w], args.out,
                           baseline=args.baseline, threshold_fraction=args.threshold_fraction,
                           plots=not args.no_plots)
  except ValueError as e:  # A StudyError, whichever module object raised it (this file runs as __main__).
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Wrote {path}')
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv.pop(0) if argv and argv[0] in ('run', 'report', 'status', 'compare') else 'run'
  if command == 'compare':
    return _compare(argv)
  parser = _parser(command)
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown or (overrides and command != 'run'):
    print(f'error: bad command line: unknown arguments {unknown or overrides}.', file=sys.stderr)
    return 2
  workdir = os.path.abspath(args.workdir)
  try:
    saved = load_spec(workdir)
    if command == 'report':
      if saved is None:
        raise StudyError(f'{workdir} holds no {STUDY_FILE}: not a study directory.')
      from pilaf_jax.analysis.report import write_report
      path = write_report(workdir, threshold_fraction=args.threshold_fraction, threshold=args.threshold,
                          baseline=args.baseline, compute=args.compute, plots=not args.no_plots)
      print(f'Wrote {path}')
      return 0
    if command == 'status':
      if saved is None:
        raise StudyError(f'{workdir} holds no {STUDY_FILE}: not a study directory.')
      return status(saved, workdir)
    spec = make_spec(args, overrides, saved)
    if args.dry_run:
      for run in plan(spec, workdir):
        print(f'{run.name}  [{run_state(run.workdir)[0]}]\n  {shlex.join(run.command)}')
      return 0
    write_spec(spec, workdir)
    return run_study(spec, workdir)
  except StudyError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
