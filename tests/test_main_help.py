"""main --help lists every config with its first docstring line; --dry_run prints the resolved
config, the mesh and the memory plan, and runs nothing."""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_help_lists_every_config():
  proc = subprocess.run([sys.executable, '-m', 'pilaf_jax.main', '--help'], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode in (0, 1), proc.stderr  # absl's --help exits with 1.
  for name in sorted(os.listdir(REPO / 'configs')):
    if name.endswith('.py'):
      first_line = (REPO / 'configs' / name).read_text().split('"""')[1].splitlines()[0]
      assert f'configs/{name}' in proc.stdout and first_line in proc.stdout, name
  assert 'dry_run' in proc.stdout


def test_dry_run_prints_config_mesh_and_memory(capsys, tmp_path):
  from pilaf_jax import default_config
  from pilaf_jax.main import dry_run
  config = default_config.get_config()
  config.sampler.name = 'hybrid'
  assert dry_run(config) == 0
  out = capsys.readouterr().out
  assert '"name": "hybrid"' in out and 'mesh: data=1 x fsdp=1 x tensor=1' in out
  assert 'total per device, per-layer remat' in out
  assert not any(tmp_path.iterdir())  # Nothing written anywhere it could be.
  config.dpo.batch_size = 0
  assert dry_run(config) == 2
  assert 'dpo.batch_size=0' in capsys.readouterr().err


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'pilaf_jax.main', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_help_exits_zero_and_points_to_the_fields():
  for flag in ('--help', '-h', '--helpfull'):
    proc = _main(flag)
    assert proc.returncode == 0, (flag, proc.stderr)
    assert '--help_config lists every config field' in proc.stdout and '--workdir' in proc.stdout
  # Config descriptions are whole first sentences, not first lines cut mid-sentence.
  assert ('configs/enumerable.py            A task small enough to enumerate every response (3 content '
          'tokens, responses of <= 4 tokens: 121 responses per prompt), so that') in _main('--help').stdout


def test_help_config_lists_every_field_with_default_and_meaning():
  from pilaf_jax import default_config
  proc = _main('--help_config', '--config=configs/no_such_file.py')  # Before any config loads.
  assert proc.returncode == 0, proc.stderr
  lines = {line.split(' = ')[0].strip(): line for line in proc.stdout.splitlines() if ' = ' in line}

  def leaves(tree, prefix=''):
    for key, value in tree.items():
      yield from leaves(value, f'{prefix}{key}.') if isinstance(value, dict) else [(prefix + key, value)]
  fields = dict(leaves(default_config.get_config().to_dict()))
  assert len(fields) > 90 and set(fields) <= set(lines)
  for name, default in fields.items():
    entry, _, meaning = lines[name].strip().partition(f'{name} = {default!r}')
    assert entry == '' and meaning.strip(), f'{name}: no default or no meaning: {lines[name]!r}'
    meaning = meaning.strip()
    assert meaning.count('(') == meaning.count(')'), f'{name}: cut inside parentheses: {meaning!r}'
  assert 'Most tokens a response may have, EOS included.' in lines['task.response_len']
  assert lines['oracle.reward'].rstrip().endswith('reward = logit(Yes) - logit(No)).')


def test_stray_positional_argument_is_one_line_exit_2(tmp_path):
  proc = _main('runs/x', f'--workdir={tmp_path}')
  assert proc.returncode == 2 and proc.stdout == ''
  assert proc.stderr.strip().splitlines() == [
      "error: bad command line: unexpected argument 'runs/x'; flags are written --name=value "
      '(e.g. --workdir=runs/x, --config.seed=3; see --help).']
  assert not any(tmp_path.iterdir())


def test_first_sentence():
  from pilaf_jax.config_help import first_sentence
  assert first_sentence('Iterative DPO (Xiong et al. 2024) on a task: sampler.name. To branch, run.') == (
      'Iterative DPO (Xiong et al. 2024) on a task: sampler.name.')
  assert first_sentence('Branch from it (e.g. the end of\n   iteration 1). More.') == (
      'Branch from it (e.g. the end of iteration 1).')
  assert first_sentence('no period at all') == 'no period at all'
