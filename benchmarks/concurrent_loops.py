"""Two loops started on one workdir: does the second refuse (exit 2, one line) and the first end
exactly where a run alone ends?

  python benchmarks/concurrent_loops.py                          # configs/tiny.py, 10 trials
  python benchmarks/concurrent_loops.py --trials=3 --config.online.steps=8

A solo run first (it trains the SFT reference the trials load, and is what every trial must match);
then, per trial, a fresh workdir, one `python -m pilaf_jax.main` started, and the same command again
after a seeded delay drawn from [0, --max_delay] s (the first trial uses 0 s). Whichever takes the
workdir's lock first runs; the other must exit 2 with one line naming the holder. With a delay of
about a second or less both processes are still importing when the other starts, so the one started
second can win the race: the report says which one won. Printed per trial: the delay, the winner,
the loser's status and line, the winner's status, and the largest difference of its final metrics
and label store from the solo run's (0 labels lost).

Every launch shares one JAX persistent compilation cache (as benchmarks/kill_resume.py does).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import kill_resume as kr  # noqa: E402


def _start(cmd: list[str], log_path: str, env: dict) -> tuple[subprocess.Popen, object]:
  log = open(log_path, 'w')
  return subprocess.Popen(cmd, cwd=kr.REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def run_pair(cmd: list[str], delay_s: float, root: str, name: str, env: dict) -> dict:
  """Starts cmd, then cmd again delay_s later; returns what each did."""
  first, first_log = _start(cmd, os.path.join(root, f'{name}_first.log'), env)
  time.sleep(delay_s)
  second, second_log = _start(cmd, os.path.join(root, f'{name}_second.log'), env)
  out = {}
  for label, proc, log in (('first', first, first_log), ('second', second, second_log)):
    out[label] = proc.wait(timeout=3600)
    log.close()
    with open(log.name) as f:
      out[label + '_log'] = f.read()
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=os.path.join(kr.REPO, 'configs', 'tiny.py'))
  parser.add_argument('--trials', type=int, default=10)
  parser.add_argument('--max_delay', type=float, default=5.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=None, help='where the runs go (default: a temp dir, removed)')
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    parser.error(f'unknown arguments {bad} (only --config.<field>=<value> passes through)')
  root = args.workdir or tempfile.mkdtemp(prefix='concurrent_loops_')
  os.makedirs(root, exist_ok=True)
  env = kr.subprocess_env(os.path.join(root, 'jax_cache'))
  print(f'concurrent_loops: config={args.config} {" ".join(overrides)} trials={args.trials} '
        f'max_delay={args.max_delay} s seed={args.seed} workdir={root}', flush=True)

  solo_dir = os.path.join(root, 'solo')
  shutil.rmtree(solo_dir, ignore_errors=True)
  t0 = time.monotonic()
  solo = kr.launch(kr.main_command(solo_dir, args.config, overrides), solo_dir,
                   os.path.join(root, 'solo.log'), env)
  if not kr.finished(solo_dir, solo):
    print(solo.log[-3000:])
    print(f'error: the solo run failed (status {solo.rc})')
    return 1
  print(f'solo run: {solo.seconds:.1f} s', flush=True)
  expected_metrics, expected_rows = kr.read_metrics(solo_dir), kr.store_rows(solo_dir)['rows']
  reuse = [f'--config.sft.init_checkpoint={os.path.join(solo_dir, "reference")}']

  rng = random.Random(args.seed)
  delays = [0.0] + [rng.uniform(0.0, args.max_delay) for _ in range(args.trials - 1)]
  refused_in_one_line, winners_identical, second_won = 0, 0, 0
  for k, delay in enumerate(delays):
    workdir = os.path.join(root, f'trial{k}')
    shutil.rmtree(workdir, ignore_errors=True)
    out = run_pair(kr.main_command(workdir, args.config, overrides + reuse), delay, root, f'trial{k}', env)
    winner = 'first' if out['first'] == 0 and out['second'] != 0 else (
        'second' if out['second'] == 0 and out['first'] != 0 else None)
    loser = {'first': 'second', 'second': 'first'}.get(winner)
    line = ''
    if loser is not None:
      lines = [l for l in out[loser + '_log'].splitlines() if l.strip() and not l.startswith(('W', 'I'))]
      line = lines[-1] if lines else ''
      one_line = (out[loser] == 2 and len(lines) == 1 and line.startswith('error: ')
                  and 'in use by another run' in line and 'Traceback' not in out[loser + '_log'])
      refused_in_one_line += one_line
    largest, problems, lost = float('inf'), ['no single winner'], ['-']
    if winner is not None:
      largest, problems = kr.metrics_difference(expected_metrics, kr.read_metrics(workdir))
      lost = kr.labels_lost(expected_rows, kr.store_rows(workdir)['rows'])
      winners_identical += not problems and not lost
      second_won += winner == 'second'
    print(f'trial {k + 1}: second started {delay:.2f} s after the first; winner: {winner}; loser exit '
          f'{out.get(loser) if loser else "-"}: {line!r}; winner vs solo: largest metric difference '
          f'{largest:.3g}, {len(lost)} labels lost/different' + (f' ({problems[:2]})' if problems else ''),
          flush=True)
  n = len(delays)
  print()
  print(f'refused in one line with exit 2: {refused_in_one_line}/{n}; winner identical to the solo run: '
        f'{winners_identical}/{n}; the process started second won the race: {second_won}/{n}')
  print(f'total {time.monotonic() - t0:.0f} s')
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if refused_in_one_line == winners_identical == n else 1


if __name__ == '__main__':
  sys.exit(main())
