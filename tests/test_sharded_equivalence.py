"""Sharded sampling, DPO steps and evaluation agree with one device (8 forced CPU devices)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_meshes_agree_with_one_device():
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'sharding_check.py')], capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(report) == {'8x1x1', '2x2x2', '1x4x2'}
  for mesh, diff in report.items():
    for sampler in ('pilaf', 'hybrid'):
      assert diff[f'{sampler}_tokens_equal'], (mesh, sampler)
      assert diff[f'{sampler}_logprob_diff'] < 1e-4, (mesh, diff)
    assert diff['loss_diff'] < 1e-5 and diff['param_diff'] < 1e-5, (mesh, diff)
    assert diff['eval_reward_diff'] < 1e-4 and diff['eval_kl_diff'] < 1e-3, (mesh, diff)
