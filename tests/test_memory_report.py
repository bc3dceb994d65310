"""The memory planner against hand-counted Llama-3.1-8B numbers, and the 8B configs themselves."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from pilaf_jax import default_config
from pilaf_jax.tools import memory_report

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {'llama3_8b_8xh100': 8, 'llama3_8b_tpu_pod': 32}

# Llama-3.1-8B, counted by hand from the architecture (not from the code under test).
V, D, F, L, H, HKV, HD = 128_256, 4096, 14_336, 32, 32, 8, 128
MATRIX_PARAMS = 2 * V * D + L * (2 * D * H * HD + 2 * D * HKV * HD + 3 * D * F)
NORM_PARAMS = (2 * L + 1) * D  # Replicated on every device.
NUM_PARAMS = MATRIX_PARAMS + NORM_PARAMS


def load_config(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_tool(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'pilaf_jax.tools.memory_report', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def test_analytic_count_is_llama_3_1_8b():
  assert NUM_PARAMS == 8_030_261_248


def test_cli_matches_analytic_counts_8xh100():
  proc = run_tool('--config=configs/llama3_8b_8xh100.py', '--devices=8', '--format=json')
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout)
  rows = {r['name']: r for r in report['rows']}
  assert report['mesh'] == dict(data=1, fsdp=8, tensor=1)
  assert report['num_params'] == NUM_PARAMS
  shards = 8
  params_per_device = 4 * (MATRIX_PARAMS // shards + NORM_PARAMS)  # float32.
  assert rows['policy params']['total_bytes'] == 4 * NUM_PARAMS
  assert rows['policy params']['per_device_bytes'] == params_per_device
  assert rows['reference params']['per_device_bytes'] == params_per_device
  assert rows['gradients']['per_device_bytes'] == params_per_device
  # mu and nu like the params, plus two int32 step counts (adam's and the schedule's).
  assert rows['AdamW state (mu, nu)']['per_device_bytes'] == 2 * params_per_device + 2 * 4
  # Two models, k and v per layer: 128 rows / 8 shards x 1024 slots x 8 kv heads x 128 x bf16,
  # plus per model a bool validity mask and an int32 write index.
  kv = rows['KV caches (2 models x 128 rows x 1024 slots)']['per_device_bytes']
  assert kv == 2 * (2 * L * (128 // shards) * 1024 * HKV * HD * 2 + (128 // shards) * 1024 + 4)
  assert report['state_per_device_bytes'] == sum(r['per_device_bytes'] for r in report['rows'] if r['exact'])
  no_remat, remat = (rows['DPO activations, no remat']['per_device_bytes'],
                     rows['DPO activations, per-layer remat']['per_device_bytes'])
  assert remat < no_remat
  # Rematerialisation must keep at least every layer's bf16 input for the 16 sequences.
  assert remat > 16 * 1024 * L * D * 2


def test_table_tpu_pod():
  report = memory_report.build_report(load_config('llama3_8b_tpu_pod'), 32)
  table = memory_report.format_table(report, 'configs/llama3_8b_tpu_pod.py')
  assert 'configs/llama3_8b_tpu_pod.py: 32 devices, mesh data=1 x fsdp=32 x tensor=1' in table
  assert 'model: 8,030,261,248 params' in table
  policy = next(line for line in table.splitlines() if line.startswith('policy params'))
  total_gib, per_device_gib = map(float, policy.split()[-2:])
  assert total_gib == round(4 * NUM_PARAMS / 2**30, 2)
  assert per_device_gib == round(4 * (MATRIX_PARAMS // 32 + NORM_PARAMS) / 2**30, 2)


def test_cli_rejects_indivisible_mesh():
  # 4096 does not split 6 ways: the rule and the parameter are named, and the exit status is 1.
  proc = run_tool('--config=configs/llama3_8b_8xh100.py', '--devices=6')
  assert proc.returncode == 1
  assert "embed_tokens/embedding: dim 1 of size 4096 is not divisible by 6 (mesh fsdp=6)" in proc.stderr


def test_report_rejects_indivisible_batch_and_mesh():
  config = load_config('llama3_8b_8xh100')
  with config.unlocked():
    config.dpo.batch_size = 24
  with pytest.raises(ValueError, match='dpo.batch_size=24 is not divisible by the 16 data-parallel shards'):
    memory_report.build_report(config, 16)
  with pytest.raises(ValueError, match='A mesh needs at least one device; got 0.'):
    memory_report.build_report(load_config('llama3_8b_8xh100'), 0)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_build_report_in_process(name):
  config = load_config(name)
  report = memory_report.build_report(config, CONFIGS[name])
  assert report.num_params == NUM_PARAMS
  shards = CONFIGS[name]
  assert report.row('policy params').per_device_bytes == 4 * (MATRIX_PARAMS // shards + NORM_PARAMS)
  table = memory_report.format_table(report)
  assert 'total per device, per-layer remat' in table


def _keys(cfg, prefix=''):
  out = set()
  for k, v in cfg.items():
    out.add(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out |= _keys(v, prefix + k + '.')
  return out


@pytest.mark.parametrize('name', list(CONFIGS))
def test_configs_only_override_existing_fields(name):
  config, base = load_config(name), default_config.get_config()
  assert _keys(config) == _keys(base)
  for key in _keys(base):
    a, b = config, base
    for part in key.split('.'):
      a, b = a[part], b[part]
    if not isinstance(b, ml_collections.ConfigDict):
      assert type(a) is type(b), (key, a, b)  # Same types: command-line overrides still parse.


@pytest.mark.parametrize('name', list(CONFIGS))
def test_8b_batches_divide_the_mesh(name):
  config = load_config(name)
  assert config.model.vocab_size == config.task.vocab_size == V
  for field in ('dpo', 'sft', 'eval'):
    assert config[field].batch_size % CONFIGS[name] == 0


@pytest.mark.parametrize('name', list(CONFIGS) + ['smollm2_demo'])
def test_real_model_configs_pass_validation(name):
  """The paper-scale configs name HH-RLHF, a checkpoint and a reward model by path; validation
  checks them without the files (which exist only on the cluster)."""
  from pilaf_jax import config_validation
  config = load_config(name)
  config_validation.validate(config)
  assert config.task.name == 'chat' and config.model.checkpoint and config.oracle.checkpoint
  if name != 'smollm2_demo':
    assert config.task.chat.dataset == 'hh_rlhf' and config.oracle.reward == 'reward_model'
    assert config.model.rope_scaling == 'llama3'  # Llama 3.1.


def test_oracle_reward_model_is_planned():
  """A Llama-3.1-8B classifier in bfloat16: the LM's params less lm_head, plus a [D, 1] score head."""
  report = memory_report.build_report(load_config('llama3_8b_8xh100'), 8)
  row = report.row('oracle params (reward_model, bfloat16)')
  assert row.total_bytes == 2 * (NUM_PARAMS - V * D + D)
  assert row.per_device_bytes == 2 * ((MATRIX_PARAMS - V * D) // 8 + NORM_PARAMS + D // 8)
