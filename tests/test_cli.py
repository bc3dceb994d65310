"""Bad input stops at once with one line naming the field and what is allowed (no traceback)."""
import os
import subprocess
import sys

import pytest

from pilaf_jax import default_config, workdir_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, workdir):
  proc = subprocess.run([sys.executable, '-m', 'pilaf_jax.main', f'--workdir={workdir}', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize('args,expected', [
    (['--config.sampler.nam=pilaf'], '--config.sampler.nam is not a config field (did you mean "name"'),
    (['--config.sampler.name=foo'], "sampler.name='foo' is unknown; allowed: ['best_of_n', 'hybrid', 'pilaf', 't_pilaf', 't_pilaf_half', 'vanilla']"),
    (['--config.beta=0'], 'beta=0.0 must be > 0'),
    (['--config.beta=-0.1'], 'beta=-0.1 must be > 0'),
    (['--config.oracle.label_rule=human'], "oracle.label_rule='human' is unknown; allowed: ['bradley_terry', 'deterministic']"),
    (['--config.loop=offline'], "loop='offline' is unknown; allowed: ['online', 'iterative']"),
    (['--config.sampler.best_of_n=1', '--config.sampler.name=best_of_n'], 'sampler.best_of_n=1 must be >= 2'),
    (['--config.eval.batch_size=100'], 'eval.num_prompts=1024 must be divisible by eval.batch_size=100'),
    (['--config.dpo.batch_size=48'], 'iterative.prompts_per_iteration=2048 must be divisible by dpo.batch_size=48'),
    (['--config.mesh.data=3'], 'The mesh has 3 devices (mesh.data=3'),
    (['--config.sampler.name=t_pilaf'], 'give 37364222087581422375778616177 responses per prompt, more than '
                                        'sampler.max_enumerated_responses=4096'),
    (['--config.model.vocab_size=32'], 'model.vocab_size=32 must equal task.vocab_size=64'),
    (['--config=configs/missing.py'], 'No such file or directory'),
    (['--config.seed=abc'], "flag --config.seed=abc: invalid literal for int()"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
  code, out = _main(*args, workdir=tmp_path / 'run')
  assert code == 2, out
  assert expected in out, out
  assert 'Traceback' not in out, out


def test_missing_workdir():
  proc = subprocess.run([sys.executable, '-m', 'pilaf_jax.main'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and '--workdir is required' in proc.stderr


def test_workdir_of_another_config_is_refused(tmp_path):
  config = default_config.get_config()
  config.seed = 1
  workdir_config.prepare_workdir(config, str(tmp_path))
  code, out = _main('--config.seed=2', '--config.sampler.name=vanilla', workdir=tmp_path)
  assert code == 2 and 'holds a run of another config' in out, out
  assert 'seed: 1 -> 2' in out and "sampler.name: 'pilaf' -> 'vanilla'" in out, out
  assert 'Traceback' not in out


def test_fields_added_since_a_run_match_at_their_default(tmp_path):
  import json
  config = default_config.get_config()
  workdir_config.prepare_workdir(config, str(tmp_path))
  path = tmp_path / 'config.json'
  saved = json.loads(path.read_text())
  del saved['fingerprint']['model.remat']  # As if written before the field existed.
  path.write_text(json.dumps(saved))
  workdir_config.check_workdir(config, str(tmp_path))  # Default value: accepted.
  config.model.remat = True
  with pytest.raises(workdir_config.ConfigError, match="model.remat: '<absent>' -> True"):
    workdir_config.check_workdir(config, str(tmp_path))
