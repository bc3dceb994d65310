"""A sampler study's plan and saved state: the grid of runs (study.json) and what each run's workdir
holds (config.json, metrics.jsonl, checkpoints). Read by the study runner and by its report."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shlex
import sys
from typing import Optional

from pilaf_jax.paths import read_metrics

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
