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
