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
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Optional

from pilaf_jax.paths import read_metrics
from pilaf_jax.study_spec import (LOCK_FILE, PROTOCOLS, STUDY_FILE, Run, StudyError, load_spec,  # noqa: F401
                                  make_spec, parse_seeds, parse_sweep, plan, read_config, run_state,
                                  settings, write_spec)

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
  summary = f'J {r["J"]:.3f} ± {r["J_se"]:.3f} (reward {r["reward"]:.3f}, KL {r["kl"]:.3f}) at step {r["step"]}'
  if len(rows) > 1:
    from pilaf_jax.evaluation.gains import gain  # The package imports jax; the study process need not.
    g = gain(rows[0], r, 'reward')
    summary += f'; reward gain from step {g.first_step} {g.delta:+.3f} ± {g.se:.3f} ({g.z:.1f} SE)'
  return summary


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
