"""A 2-process jax.distributed run on localhost (CPU collectives) matches the single-process run."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--config=configs/tiny.py', '--config.sft.steps=20', '--config.online.steps=4',
        '--config.eval.every_steps=2', '--config.checkpoint.every_steps=2']


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path):
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  proc = subprocess.run([sys.executable, '-m', 'pilaf_jax.main', f'--workdir={single}', *ARGS], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, 'launch/local_multiprocess.py', '--num_processes=2',
                         '--devices_per_process=1', '--', f'--workdir={multi}', *ARGS], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert '[p0]' in proc.stdout and '[p1]' in proc.stdout
  one, two = _rows(single), _rows(multi)
  assert [r['step'] for r in one] == [r['step'] for r in two] == [0, 2, 4]
  for a, b in zip(one, two):
    for key in ('reward', 'kl', 'J'):
      assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    for key in ('labels_used', 'policy_decode_tokens', 'ref_decode_tokens', 'ref_scoring_tokens'):
      assert a[key] == b[key], (key, a, b)
  # Running the same job again restores the final checkpoint across both processes and stops there.
  proc = subprocess.run([sys.executable, 'launch/local_multiprocess.py', '--num_processes=2',
                         '--devices_per_process=1', '--', f'--workdir={multi}', *ARGS], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert 'Resuming the online loop at step 4' in proc.stdout, proc.stdout[-3000:]
  assert _rows(multi) == two
  # Process 0 alone wrote the label store; both processes checkpointed together.
  assert os.path.exists(os.path.join(multi, 'labels.sqlite'))
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == sorted(
      os.listdir(os.path.join(single, 'checkpoints')))
