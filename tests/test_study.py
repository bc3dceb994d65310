"""The study tool (pilaf_jax/study.py) and its report (pilaf_jax/analysis/report.py).

The end-to-end test runs a real study on configs/tiny.py (2 samplers x 2 seeds, a few steps),
SIGKILLs the study process in the middle of its third or fourth run, checks that the run it was
running died with it, runs the same command again and checks that the finished runs were not rerun
and the killed one resumed from its checkpoint; then it writes the report and its plots.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pilaf_jax import study
from pilaf_jax.analysis import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
STEPS = 4
OVERRIDES = [f'--config.online.steps={STEPS}', '--config.sft.steps=5', '--config.eval.every_steps=2',
             '--config.eval.num_prompts=16', '--config.eval.batch_size=16', '--config.checkpoint.every_steps=1',
             '--config.checkpoint.async_save=False']


def _env(cache):
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', str(cache))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  return env


def _checkpoints(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def test_study_runs_resumes_after_a_kill_and_reports(tmp_path):
  env = _env(tmp_path / 'jax_cache')
  workdir = str(tmp_path / 'study')
  cmd = [sys.executable, '-m', 'pilaf_jax.study', f'--config={TINY}', '--samplers=vanilla,hybrid',
         '--seeds=0-1', f'--workdir={workdir}', *OVERRIDES]
  spec = None
  log = open(tmp_path / 'first.log', 'w')
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
  killed_in = None
  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline:
    if spec is None and os.path.exists(os.path.join(workdir, study.STUDY_FILE)):
      spec = study.load_spec(workdir)
    if spec is not None:
      runs = study.plan(spec, workdir)
      # Kill once a run after the first two is under way: it has a checkpoint but is not done.
      for run in runs[2:]:
        if any(0 < s < STEPS for s in _checkpoints(run.workdir)) and study.run_state(run.workdir)[0] != 'done':
          proc.send_signal(signal.SIGKILL)
          killed_in = run.name
          break
      if killed_in:
        break
    time.sleep(0.02)
  proc.wait()
  log.close()
  assert killed_in, f'the study ended before a kill could land:\n{(tmp_path / "first.log").read_text()}'
  runs = {r.name: r for r in study.plan(spec, workdir)}
  # The run the study was running died with it: the study lock is free again at once.
  time.sleep(0.5)
  lock = study._Lock(workdir)
  lock.release()
  states = {name: study.run_state(r.workdir)[0] for name, r in runs.items()}
  assert states[killed_in] == 'partial'
  done_before = [n for n, s in states.items() if s == 'done']
  assert len(done_before) >= 2
  snapshot = {n: open(os.path.join(runs[n].workdir, 'metrics.jsonl')).read() for n in done_before}
  partial_rows = len(study.read_metrics(runs[killed_in].workdir))

  # Same command again: finished runs are skipped, the killed run resumes, the rest run.
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert f'{killed_in}: resuming after step' in out.stdout, out.stdout
  for name in done_before:
    assert f'{name}: starting' not in out.stdout and f'{name}: resuming' not in out.stdout
    assert open(os.path.join(runs[name].workdir, 'metrics.jsonl')).read() == snapshot[name]
    with open(runs[name].log) as f:
      assert f.read().count('\n$ ') == 1  # Launched once.
  with open(runs[killed_in].log) as f:
    text = f.read()
  assert text.count('\n$ ') == 2 and 'Resuming the online loop at step' in text
  assert all(study.run_state(r.workdir)[0] == 'done' for r in runs.values())
  assert partial_rows >= 1
  for r in runs.values():  # One shared SFT reference, trained by the first run.
    assert os.path.isdir(os.path.join(r.workdir, 'reference')) == (r.name == 'base/vanilla/seed0')
  assert 'runs done' in out.stdout and '4/4' in out.stdout

  # A third time: nothing left to do.
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
  assert again.returncode == 0 and 'starting' not in again.stdout and 'resuming' not in again.stdout

  assert study.main(['report', f'--workdir={workdir}']) == 0
  text = open(os.path.join(workdir, 'report.md')).read()
  assert '| vanilla | 2 |' in text and '| hybrid | 2 |' in text
  assert '| method - vanilla |' in text and '| hybrid | 2 |' in text
  assert 'Labels to reach J >=' in text
  for name in ('base_J_vs_labels.png', 'base_J_vs_compute.png', 'base_reward_vs_kl.png'):
    path = os.path.join(workdir, 'plots', name)
    assert os.path.getsize(path) > 1000 and f'plots/{name}' in text
  metrics = study.read_metrics(runs['base/hybrid/seed1'].workdir)
  assert metrics[-1]['ref_decode_tokens_executed'] > 0  # The compute axis has what ran.
  for row in metrics:  # Per-prompt values, in prompt order, that average to the row's figures.
    for key in ('reward', 'kl'):
      assert len(row['per_prompt'][key]) == 16
      assert np.mean(row['per_prompt'][key]) == pytest.approx(row[key], abs=1e-4)
  assert '| base/hybrid/seed1 | 0-4 |' in text and '| yes |' in text  # The per-run paired gains.
  assert 'reward gain from step 0' in out.stdout


def test_seeds_sweeps_and_plans(tmp_path):
  assert study.parse_seeds('0-3,7') == [0, 1, 2, 3, 7]
  assert study.parse_sweep('dpo.learning_rate=1e-4,3e-4') == ('dpo.learning_rate', ['1e-4', '3e-4'])
  with pytest.raises(study.StudyError):
    study.parse_seeds('a-b')
  spec = {'config': TINY, 'config_path': TINY, 'overrides': [], 'sweeps': {'dpo.learning_rate': ['1e-4', '3e-4']},
          'protocol': 'iterative_branch', 'samplers': ['vanilla', 'pilaf'], 'seeds': [0, 1]}
  runs = study.plan(spec, str(tmp_path))
  assert len(runs) == 2 * (2 + 2 * 2)  # Per setting: a branch per seed, then every sampler per seed.
  names = [r.name for r in runs]
  for r in runs:
    args = ' '.join(r.command)
    assert '--config.loop=iterative' in args and f'--config.seed={r.seed}' in args
    if r.sampler == 'branch':
      assert '--config.iterative.iterations=1' in args and '--config.sampler.name=vanilla' in args
    else:
      branch = f'{r.setting}/branch/seed{r.seed}'
      assert branch in r.needs and names.index(branch) < names.index(r.name)
      assert f'--config.iterative.init_checkpoint={os.path.join(str(tmp_path), "runs", r.setting, "branch", f"seed{r.seed}", "checkpoints")}' in args
    # One reference for the whole study (the sweep does not touch task/model/sft).
    if r.name != names[0]:
      assert f'--config.sft.init_checkpoint={runs[0].workdir}/reference' in args
  # Sweeping an sft field gives each setting its own reference.
  spec2 = dict(spec, sweeps={'sft.steps': ['5', '10']}, protocol='independent')
  runs2 = study.plan(spec2, str(tmp_path))
  owners = [r for r in runs2 if not any('sft.init_checkpoint' in a for a in r.command)]
  assert len(owners) == 2


def test_spec_changes_are_refused(tmp_path, capsys):
  workdir = str(tmp_path / 's')
  args = ['--config=' + TINY, '--samplers=vanilla', '--seeds=0', f'--workdir={workdir}', '--dry_run']
  assert study.main(args) == 0
  study.write_spec(study.make_spec(study._parser('run').parse_known_args(args)[0], [], None), workdir)
  assert study.main(args[:-1][:3] + [f'--workdir={workdir}', '--config.beta=0.2', '--dry_run']) == 2
  assert 'overrides' in capsys.readouterr().err
  assert study.main(['--samplers=vanilla', '--seeds=0', f'--workdir={workdir}', '--config.seed=3']) == 2
  # More seeds and samplers extend the saved grid.
  assert study.main(['--samplers=pilaf', '--seeds=1', f'--workdir={workdir}', '--dry_run']) == 0
  assert 'base/pilaf/seed1' in capsys.readouterr().out


def test_statistics():
  iv = stats.t_interval([1.0, 2.0, 3.0])
  assert iv.estimate == 2.0 and abs(iv.half_width - 4.303 * 1 / np.sqrt(3)) < 1e-3
  diff, wins = stats.paired_difference({0: 2.0, 1: 3.0, 2: 5.0}, {0: 1.0, 1: 1.0, 3: 9.0})
  assert diff.n == 2 and diff.estimate == 1.5 and wins == 2
  assert stats.labels_to_reach([0, 10, 20], [0.0, 1.0, 3.0], 2.0) == 15.0
  assert stats.labels_to_reach([0, 10], [0.0, 1.0], 2.0) == float('inf')
  b = stats.bootstrap_interval([1.0, 2.0, 3.0, 4.0])
  assert b.lo < 2.5 < b.hi
  r = stats.paired_bootstrap_ratio({0: 2.0, 1: 4.0}, {0: 4.0, 1: 8.0})
  assert abs(r.estimate - 0.5) < 1e-12 and abs(r.lo - 0.5) < 1e-12


def _fake_study(root, overrides, j_of):
  """A finished study written by hand: j_of(sampler, seed) is every run's final J."""
  spec = {'config': 'c.py', 'config_path': __file__, 'overrides': overrides, 'sweeps': {},
          'protocol': 'independent', 'samplers': ['vanilla', 'pilaf'], 'seeds': [0, 1, 2, 3]}
  study.write_spec(spec, str(root))
  config = {'loop': 'online', 'online': {'steps': 2}, 'beta': 0.1}
  for run in study.plan(spec, str(root)):
    os.makedirs(os.path.join(run.workdir, 'checkpoints', '2'))
    with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
      json.dump({'config': config}, f)
    j = j_of(run.sampler, run.seed)
    with open(os.path.join(run.workdir, 'metrics.jsonl'), 'w') as f:
      for step, value in ((0, 0.0), (2, j)):
        f.write(json.dumps({'step': step, 'labels_used': 64 * step, 'J': value, 'reward': value + 1.0,
                            'kl': 10.0}) + '\n')
  return str(root)


def test_compare_tabulates_paired_differences_across_studies(tmp_path):
  from pilaf_jax.analysis.report import compare_studies
  noise = [0.1, -0.2, 0.05, 0.3]
  a = _fake_study(tmp_path / 'a', ['--config.online.steps=2', '--config.beta=0.5'],
                  lambda s, k: 1.0 + noise[k] + (0.2 if s == 'pilaf' else 0.0))
  b = _fake_study(tmp_path / 'b', ['--config.online.steps=2'],
                  lambda s, k: 1.0 + noise[k] - (0.1 * k if s == 'pilaf' else 0.0))
  out = compare_studies([a, b], str(tmp_path / 'cmp' / 'regimes.md'), plots=False)
  text = open(out).read()
  rows = [line for line in text.splitlines() if line.startswith('| a') or line.startswith('| b')]
  assert len(rows) == 2
  assert '`beta=0.5`' in rows[0] and '| 0.200 [0.200, 0.200] |' in rows[0] and '| 4/4 |' in rows[0]
  # b: differences 0, -0.1, -0.2, -0.3: mean -0.15, t-interval half width 3.182 * 0.129 / 2.
  assert '| -0.150 [-0.355, 0.055] |' in rows[1] and '| 0/4 |' in rows[1]
  assert 'online.steps=2' in text.split('|')[0]  # Common overrides are named once, above the table.
  assert study.main(['compare', f'--workdirs={a},{tmp_path / "nope"}', f'--out={tmp_path / "x.md"}']) == 2
