"""Meshes, partition rules, sharded execution, multi-process helpers and the launch scripts.

Checks that need several devices run in subprocesses (this file run as a script), which get their
own CPU device count from XLA_FLAGS; the pytest process keeps whatever jax it already has.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pilaf_jax import default_config
from pilaf_jax.model.llama import LlamaConfig
from pilaf_jax.parallel import mesh as mesh_lib
from pilaf_jax.parallel import multihost
from pilaf_jax.parallel import partitioning as pt

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_cfg(**overrides) -> LlamaConfig:
  return LlamaConfig.from_config({**default_config.get_config().model, **overrides})


def subprocess_env(devices: int = 1) -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def sizes(data, fsdp, tensor) -> dict:
  return dict(data=data, fsdp=fsdp, tensor=tensor)


# Mesh resolution (pure arithmetic).


@pytest.mark.parametrize('cfg, n, expected', [
    (sizes(-1, 1, 1), 8, (8, 1, 1)),
    (sizes(2, -1, 2), 8, (2, 2, 2)),
    (sizes(1, 4, -1), 8, (1, 4, 2)),
    (sizes(1, 1, 1), 1, (1, 1, 1)),
    (sizes(-1, 8, 1), 32, (4, 8, 1)),
])
def test_resolve_mesh_shape(cfg, n, expected):
  assert mesh_lib.resolve_mesh_shape(cfg, n) == expected


@pytest.mark.parametrize('cfg, n, pattern', [
    (sizes(3, 1, 1), 8, r'The mesh has 3 devices \(mesh.data=3, mesh.fsdp=1, mesh.tensor=1\) but 8 '),
    (sizes(-1, -1, 1), 8, r'At most one mesh axis may be -1.*mesh.data=-1, mesh.fsdp=-1'),
    (sizes(-1, 3, 1), 8, r'mesh.fsdp=3 x mesh.tensor=1 = 3 does not divide the 8 devices, so mesh.data=-1'),
    (sizes(0, 1, 1), 8, r'mesh.data=0 must be a positive integer'),
    (sizes(1, -2, 1), 8, r'mesh.fsdp=-2 must be a positive integer'),
    (dict(data=1, fsdp=1), 1, r'exactly the fields'),
])
def test_resolve_mesh_shape_errors(cfg, n, pattern):
  with pytest.raises(ValueError, match=pattern):
    mesh_lib.resolve_mesh_shape(cfg, n)


def test_resolve_mesh_shape_accepts_config_dict():
  assert mesh_lib.resolve_mesh_shape(default_config.get_config().mesh, 4) == (4, 1, 1)


def test_check_batch_divisible():
  mesh_lib.check_batch_divisible(16, sizes(4, 2, 2), 'dpo.batch_size')
  with pytest.raises(ValueError) as e:
    mesh_lib.check_batch_divisible(12, sizes(4, 2, 1), 'dpo.batch_size')
  assert str(e.value) == ('dpo.batch_size=12 is not divisible by the 8 data-parallel shards '
                          '(mesh data=4 x fsdp=2).')


def test_batch_spec():
  assert mesh_lib.batch_spec(3) == P(('data', 'fsdp'), None, None)
  assert mesh_lib.batch_spec(0) == P()


# Partition rules.

EXPECTED_SPECS = {
    'embed_tokens/embedding': P('tensor', 'fsdp'),
    'layers_0/self_attn/q_proj/kernel': P('fsdp', 'tensor'),
    'layers_0/self_attn/k_proj/kernel': P('fsdp', 'tensor'),
    'layers_0/self_attn/v_proj/kernel': P('fsdp', 'tensor'),
    'layers_0/self_attn/o_proj/kernel': P('tensor', 'fsdp'),
    'layers_0/mlp/gate_proj/kernel': P('fsdp', 'tensor'),
    'layers_0/mlp/up_proj/kernel': P('fsdp', 'tensor'),
    'layers_0/mlp/down_proj/kernel': P('tensor', 'fsdp'),
    'layers_0/input_layernorm/scale': P(),
    'layers_0/post_attention_layernorm/scale': P(),
    'norm/scale': P(),
    'lm_head/kernel': P(None, ('tensor', 'fsdp')),  # Vocabulary-split head.
}


def flat_specs(specs) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  return {pt.path_str(path): spec for path, spec in leaves}


@pytest.mark.parametrize('mesh', MESHES)
def test_rules_cover_tiny_model(mesh):
  params = pt.abstract_params(tiny_cfg())
  specs = flat_specs(pt.param_partition_specs(params, mesh=sizes(*mesh)))
  assert specs == {**EXPECTED_SPECS, **{k.replace('layers_0', 'layers_1'): v
                                        for k, v in EXPECTED_SPECS.items()}}


def test_rules_cover_biases_and_tied_embeddings():
  params = pt.abstract_params(tiny_cfg(attention_bias=True, tie_embeddings=True))
  specs = flat_specs(pt.param_partition_specs(params, mesh=sizes(2, 2, 2)))
  assert specs['layers_0/self_attn/q_proj/bias'] == P()
  assert 'lm_head/kernel' not in specs


@pytest.mark.parametrize('config_name, devices', [('llama3_8b_8xh100', 8), ('llama3_8b_tpu_pod', 32)])
def test_rules_cover_8b_configs(config_name, devices):
  config = load_config(config_name)
  params = pt.abstract_params(LlamaConfig.from_config(config.model))
  mesh = dict(zip(mesh_lib.MESH_AXES, mesh_lib.resolve_mesh_shape(config.mesh, devices)))
  specs = flat_specs(pt.param_partition_specs(params, mesh=mesh))
  if config.model.scan_layers:  # One stacked leaf per layer weight; its [num_layers] axis unsplit.
    assert len(specs) == 9 + 3
    for path, spec in specs.items():
      expected = EXPECTED_SPECS[path.replace('layers/', 'layers_0/')]
      assert spec == (P(None, *expected) if path.startswith('layers/') else expected), path
  else:
    assert len(specs) == 32 * 9 + 3
    for path, spec in specs.items():
      expected = EXPECTED_SPECS[re.sub(r'layers_\d+', 'layers_0', path)]
      assert spec == expected, path
  # Also with tensor parallelism: 8 kv heads x 128 and every other dim divide by 8.
  pt.param_partition_specs(params, mesh=sizes(1, devices // 8, 8))


def test_unmatched_param_is_named():
  params = pt.abstract_params(tiny_cfg())
  params = {**params, 'value_head': {'kernel': jax.ShapeDtypeStruct((128, 1), jnp.float32)}}
  with pytest.raises(ValueError, match=r'value_head/kernel: no partition rule matches \(shape \(128, 1\)\)'):
    pt.param_partition_specs(params)


def test_indivisible_dim_is_named():
  params = pt.abstract_params(tiny_cfg())
  with pytest.raises(ValueError) as e:
    pt.param_partition_specs(params, mesh=sizes(1, 3, 1))
  message = str(e.value)
  assert ("layers_1/mlp/down_proj/kernel: dim 1 of size 128 is not divisible by 3 (mesh fsdp=3) "
          "(rule '/mlp/down_proj/kernel$' -> P('tensor', 'fsdp'))") in message
  assert 'embed_tokens/embedding: dim 1 of size 128' in message
  # kv heads: 2 x 32 = 64 columns do not split 128 ways; an axis of size 1 always divides.
  with pytest.raises(ValueError, match=r'k_proj/kernel: dim 1 of size 64 is not divisible by 128 \(mesh tensor=128\)'):
    pt.param_partition_specs(params, mesh=sizes(1, 1, 128))
  with pytest.raises(ValueError, match=r"mesh has no axis \['model'\]"):
    pt.param_partition_specs(params, rules=((r'.*', P('model')),), mesh=sizes(1, 1, 1))


def _optimizers():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
  return {
      'adamw+clip': optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1)),
      'adam+scale_by_schedule': optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(schedule),
                                            optax.scale(-1.0)),
      'inject_hyperparams': optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
  }


@pytest.mark.parametrize('name', list(_optimizers()))
def test_optimizer_state_specs(name):
  params = pt.abstract_params(tiny_cfg())
  specs = pt.param_partition_specs(params, mesh=sizes(2, 2, 2))
  state = jax.eval_shape(_optimizers()[name].init, params)
  for with_params in (params, None):
    state_specs = pt.optimizer_state_specs(state, specs, with_params)
    moments = scalars = 0
    for path, spec in flat_specs(state_specs).items():
      names = path.split('/')
      param_path = '/'.join(names[names.index('mu') + 1 if 'mu' in names else names.index('nu') + 1:]) \
          if ('mu' in names or 'nu' in names) else None
      if param_path:
        assert spec == EXPECTED_SPECS[re.sub(r'layers_\d+', 'layers_0', param_path)], path
        moments += 1
      else:
        assert spec == P(), path
        scalars += 1
    assert moments == 2 * len(jax.tree.leaves(params)) and scalars >= 1


def test_optimizer_state_specs_shape_mismatch_falls_back():
  params = {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32)}
  specs = {'w': P('fsdp', None)}
  state = {'v_row': {'w': jax.ShapeDtypeStruct((8,), jnp.float32)},
           'mu': {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32)}}
  assert pt.optimizer_state_specs(state, specs, params) == {'v_row': {'w': P()}, 'mu': {'w': specs['w']}}
  state['v_row']['w'] = jax.ShapeDtypeStruct((), jnp.float32)  # Path-only: too few dims.
  assert pt.optimizer_state_specs(state, specs)['v_row']['w'] == P()


def test_per_device_bytes():
  tree = {'a': jax.ShapeDtypeStruct((8, 6), jnp.float32), 'b': jax.ShapeDtypeStruct((5,), jnp.bfloat16)}
  specs = {'a': P(('data', 'fsdp'), 'tensor'), 'b': P('fsdp')}
  mesh = sizes(2, 2, 3)
  assert pt.per_device_bytes(tree, specs, mesh) == 2 * 2 * 4 + 3 * 2  # 5 rows over 2: largest shard 3.
  assert pt.total_bytes(tree) == 8 * 6 * 4 + 5 * 2


def test_kv_cache_specs():
  cfg = tiny_cfg()  # 2 kv heads.
  cache = pt.abstract_kv_cache(cfg, batch=8, slots=24)
  specs = pt.kv_cache_specs(cache, sizes(2, 2, 2))
  assert specs.k[0] == P(('data', 'fsdp'), 'tensor', None, None) and specs.v[1] == specs.k[0]  # [B, Hkv, S, D]
  assert specs.valid == P(('data', 'fsdp'), None) and specs.index == P()
  specs = pt.kv_cache_specs(pt.abstract_kv_cache(cfg, batch=6, slots=24), sizes(2, 4, 4))
  assert specs.k[0] == P('data', None, None, None)  # 6 rows: not over 8, over data=2; 2 heads not over 4.


# Multi-process settings (pure).


def test_distributed_settings_and_env_overrides():
  cfg = default_config.get_config().distributed
  s = multihost.resolve_settings(cfg, environ={})
  assert not s.enabled and s.num_processes == 1 and s.local_device_ids is None
  env = dict(PILAF_COORDINATOR='10.0.0.1:1234', PILAF_NUM_PROCESSES='4', PILAF_PROCESS_ID='3',
             PILAF_LOCAL_DEVICE_IDS='0,1')
  s = multihost.resolve_settings(cfg, environ=env)
  assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == \
      ('10.0.0.1:1234', 4, 3, (0, 1))
  assert multihost.resolve_settings(dict(cfg, coordinator_address='auto'), environ={}).enabled
  with pytest.raises(ValueError, match=r'distributed.process_id=4 must be in \[0, 4\)'):
    multihost.resolve_settings(cfg, environ=dict(env, PILAF_PROCESS_ID='4'))
  with pytest.raises(ValueError, match='distributed.num_processes=2 needs distributed.coordinator_address'):
    multihost.resolve_settings(dict(cfg, num_processes=2), environ={})
  with pytest.raises(ValueError, match="PILAF_NUM_PROCESSES='two'"):
    multihost.resolve_settings(cfg, environ=dict(PILAF_NUM_PROCESSES='two'))
  # Single process: initialize_distributed does nothing.
  assert not multihost.initialize_distributed(cfg, environ={}).enabled


# Sharded execution on 8 CPU devices (subprocess).


def devices8_checks() -> dict:
  """Runs in a process with 8 CPU devices; returns what the tests assert on."""
  from pilaf_jax.model.llama import KVCache, Llama
  assert jax.device_count() == 8, jax.devices()
  out = {}
  cfg = tiny_cfg()
  model = Llama(cfg)
  mesh222 = mesh_lib.make_mesh(sizes(2, 2, 2))
  # Sharded init: lowered only, as compiling random init takes seconds on CPU.
  init_out = pt.sharded_init(cfg, mesh222).lower(jax.random.key(0)).out_info
  out['init_sharded_specs'] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(init_out)})
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), pt.abstract_params(cfg))
  b, t = 8, 12
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)), jnp.int32)
  valid = jnp.asarray(np.arange(t)[None, :] >= rng.integers(0, 4, (b, 1)))  # Left padding.
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  forward = lambda p, x, pos, v: model.apply({'params': p}, x, pos, v)[0]
  one = jax.devices()[0]
  expected = np.asarray(jax.jit(forward)(*jax.device_put((params, tokens, positions, valid), one)))

  for shape in MESHES:
    key = 'x'.join(map(str, shape))
    mesh = mesh_lib.make_mesh(sizes(*shape))
    out[f'mesh_{key}'] = [dict(mesh.shape), [a.name for a in mesh.axis_types]]
    shardings = pt.param_shardings(params, mesh)
    sharded = pt.shard_params(params, shardings)
    data = jax.device_put((tokens, positions, valid), mesh_lib.batch_sharding(mesh, 2))
    logits = jax.jit(forward)(sharded, *data)
    kernel = sharded['layers_0']['mlp']['up_proj']['kernel']
    out[f'forward_{key}'] = dict(
        max_abs_diff=float(np.max(np.abs(np.asarray(logits) - expected))),
        up_proj_shard=list(kernel.addressable_shards[0].data.shape))

  # On one mesh (compiling is the slow part): a jitted AdamW update keeps params and moments on
  # their shardings, and a sharded KV cache goes through prefill.
  mesh = mesh222
  shardings = pt.param_shardings(params, mesh)
  sharded = pt.shard_params(params, shardings)
  data = jax.device_put((tokens, positions, valid), mesh_lib.batch_sharding(mesh, 2))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(1e-4, 1e-3, 5)))
  opt_shardings = pt.optimizer_state_shardings(jax.eval_shape(tx.init, params), shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(sharded)

  def step(p, s, grads):  # Stand-in gradients: the update's layout is what is checked.
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  grads = jax.tree.map(lambda p: 0.1 * p, sharded)
  new_params, new_state = jax.jit(step, out_shardings=(shardings, opt_shardings))(sharded, opt_state, grads)
  adam = new_state[1][0]
  out['adam'] = dict(
      mu_spec=str(adam.mu['layers_0']['self_attn']['o_proj']['kernel'].sharding.spec),
      count_spec=str(adam.count.sharding.spec),
      changed=bool(jnp.any(new_params['lm_head']['kernel'] != sharded['lm_head']['kernel'])))

  cache_sh = pt.kv_cache_sharding(pt.abstract_kv_cache(cfg, b, t + 4), mesh)
  cache = jax.jit(lambda: KVCache.zeros(cfg, b, t + 4), out_shardings=cache_sh)()
  prefill = jax.jit(lambda p, c, x, pos, v: model.apply({'params': p}, x, pos, v, c),
                    out_shardings=(None, cache_sh))
  cached_logits, new_cache = prefill(sharded, cache, *data)
  out['cache'] = dict(
      k_spec=str(new_cache.k[0].sharding.spec),
      # Padding queries attend to nothing; only real tokens' logits are comparable.
      max_abs_diff=float(np.max(np.abs(np.asarray(cached_logits) - expected)[np.asarray(valid)])))

  # Single-process host <-> global helpers.
  rows = multihost.process_rows(16, mesh)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = multihost.host_local_to_global({'x': x[rows]}, mesh)['x']
  out['host_global'] = dict(rows=[rows.start, rows.stop], spec=str(g.sharding.spec),
                            roundtrip=bool(np.array_equal(multihost.global_to_host(g), x)))
  try:
    mesh_lib.make_mesh(sizes(3, 1, 1))
  except ValueError as e:
    out['make_mesh_error'] = str(e)
  return out


@pytest.fixture(scope='module')
def devices8():
  proc = subprocess.run([sys.executable, __file__, 'devices8'], env=subprocess_env(8), cwd=REPO,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('shape', MESHES)
def test_make_mesh_auto_axes(devices8, shape):
  key = 'x'.join(map(str, shape))
  axes, types = devices8[f'mesh_{key}']
  assert axes == dict(zip(mesh_lib.MESH_AXES, shape))
  assert types == ['Auto'] * 3
  assert 'The mesh has 3 devices' in devices8['make_mesh_error']


@pytest.mark.parametrize('shape', MESHES)
def test_sharded_forward_matches_unsharded(devices8, shape):
  result = devices8['forward_' + 'x'.join(map(str, shape))]
  assert result['max_abs_diff'] < 1e-5, result
  data, fsdp, tensor = shape
  assert result['up_proj_shard'] == [128 // fsdp, 384 // tensor]


def test_sharded_adam_step_keeps_layout(devices8):
  assert devices8['adam'] == dict(mu_spec=str(P('tensor', 'fsdp')), count_spec=str(P()), changed=True)


def test_sharded_kv_cache_prefill(devices8):
  assert devices8['cache']['k_spec'] == str(P(('data', 'fsdp'), 'tensor', None, None))
  assert devices8['cache']['max_abs_diff'] < 1e-5


def test_init_sharded_and_host_helpers(devices8):
  assert devices8['init_sharded_specs'] == sorted(map(str, {P(), P('tensor', 'fsdp'), P('fsdp', 'tensor'),
                                                                     P(None, ('tensor', 'fsdp'))}))
  assert devices8['host_global'] == dict(rows=[0, 16], spec=str(P(('data', 'fsdp'), None)), roundtrip=True)


# Two processes on localhost (through the local launcher).


def multihost_worker() -> None:
  """One of two processes: builds a global batch from per-process rows and reduces it."""
  from jax.sharding import NamedSharding
  settings = multihost.initialize_distributed(default_config.get_config().distributed)
  pid = jax.process_index()
  assert settings.enabled and jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  mesh = mesh_lib.make_mesh(sizes(-1, 2, 1))  # data=2 (one per process), fsdp=2 (within it).
  full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  rows = multihost.process_rows(8, mesh)
  assert rows == slice(4 * pid, 4 * pid + 4), rows
  batch = multihost.host_local_to_global({'x': full[rows]}, mesh)
  x = batch['x']
  assert x.shape == (8, 3) and not x.is_fully_addressable
  psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v.sum(0), ('data', 'fsdp')), mesh=mesh,
                               in_specs=P(('data', 'fsdp')), out_specs=P()))(x)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  np.testing.assert_allclose(multihost.global_to_host(psum), full.sum(0))
  np.testing.assert_allclose(multihost.global_to_host(total), full.sum())
  np.testing.assert_array_equal(multihost.global_to_host(x), full)  # All-gathered.
  multihost.sync('done')
  print(f'MULTIHOST_OK process={pid} main={multihost.is_main_process()} psum={psum.tolist()}', flush=True)


def launcher(*args, timeout=120):
  return subprocess.run([sys.executable, str(REPO / 'launch' / 'local_multiprocess.py'), *args],
                        env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_two_processes_on_localhost():
  proc = launcher('--num_processes=2', '--devices_per_process=2', '--timeout=100',
                  f'--script={__file__}', '--', 'multihost_worker')
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert '[p0] MULTIHOST_OK process=0 main=True psum=[84.0, 92.0, 100.0]' in proc.stdout
  assert '[p1] MULTIHOST_OK process=1 main=False psum=[84.0, 92.0, 100.0]' in proc.stdout


def test_launcher_propagates_failure(tmp_path):
  script = tmp_path / 'fail.py'
  script.write_text(textwrap.dedent("""\
      import os, sys, time
      print('hello from', os.environ['PILAF_PROCESS_ID'], os.environ['PILAF_NUM_PROCESSES'],
            os.environ['PILAF_COORDINATOR'].startswith('localhost:'), os.environ['XLA_FLAGS'])
      if os.environ['PILAF_PROCESS_ID'] == '1':
        sys.exit(3)
      time.sleep(60)  # Must be stopped by the launcher.
  """))
  proc = launcher('-n', '2', '--devices_per_process=3', f'--script={script}', timeout=30)
  assert proc.returncode == 3, proc.stdout
  assert '[p1] hello from 1 2 True --xla_force_host_platform_device_count=3' in proc.stdout
  assert 'stopping the others' in proc.stdout


# Cluster launch scripts (dry runs and stubs).


def test_tpu_pod_dry_run():
  env = dict(os.environ, DRY_RUN='1', WORKDIR='gs://bucket/run', TPU_NAME='t1', ZONE='z1',
             EXTRA_ARGS='--config.seed=3')
  proc = subprocess.run(['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'all'], env=env,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == '+ gcloud compute tpus tpu-vm create t1 --zone=z1 --accelerator-type=v5p-64 --version=v2-alpha-tpuv5'
  run = next(line for line in lines if 'pilaf_jax.main' in line)
  assert '--worker=all' in run and 'pip install' in run and " -e '\\''.[gcs]'\\''" in run  # gcsfs: gs:// workdirs
  assert 'python -m pilaf_jax.main --config=configs/llama3_8b_tpu_pod.py --workdir=gs://bucket/run --config.seed=3' in run
  assert lines[-1] == '+ gcloud compute tpus tpu-vm delete t1 --zone=z1 --quiet'
  missing = subprocess.run(['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'run'],
                           env=dict(os.environ, DRY_RUN='1', WORKDIR=''), capture_output=True, text=True)
  assert missing.returncode == 2 and 'set WORKDIR' in missing.stderr


def test_tpu_pod_all_deletes_the_slice_on_failure_and_creates_nothing_without_workdir(tmp_path):
  stub = tmp_path / 'bin'
  stub.mkdir()
  (stub / 'gcloud').write_text('#!/bin/bash\necho "called: $*"\n[[ "$*" == *" scp "* ]] && exit 5\nexit 0\n')
  (stub / 'gcloud').chmod(0o755)
  env = dict(os.environ, PATH=f'{stub}:{os.environ["PATH"]}', TPU_NAME='t1', ZONE='z1', WORKDIR='gs://b/r')
  script = str(REPO / 'launch' / 'tpu_pod.sh')
  failed = subprocess.run(['bash', script, 'all'], env=env, capture_output=True, text=True, timeout=30)
  called = [line for line in failed.stdout.splitlines() if line.startswith('called: ')]
  assert failed.returncode == 5, failed.stderr
  assert called[0].startswith('called: compute tpus tpu-vm create t1')
  assert called[-1] == 'called: compute tpus tpu-vm delete t1 --zone=z1 --quiet'
  assert 'deleting the slice t1' in failed.stderr
  for bad, message in ((dict(WORKDIR=''), 'set WORKDIR'), (dict(CONFIG='configs/absent.py'), 'CONFIG=configs/absent.py')):
    proc = subprocess.run(['bash', script, 'all'], env=dict(env, **bad), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr
    assert 'called:' not in proc.stdout  # Nothing created.


def test_slurm_script_sets_process_env(tmp_path):
  stub = tmp_path / 'bin'
  stub.mkdir()
  (stub / 'scontrol').write_text('#!/bin/bash\nprintf "node-a\\nnode-b\\n"\n')
  # srun: run the command once per task, as SLURM would on each node.
  (stub / 'srun').write_text(textwrap.dedent("""\
      #!/bin/bash
      shift  # --kill-on-bad-exit=1
      for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" || exit $?; done
  """))
  (stub / 'fakepython').write_text(
      '#!/bin/bash\necho "$PILAF_COORDINATOR $PILAF_NUM_PROCESSES $PILAF_PROCESS_ID '
      '[${PILAF_LOCAL_DEVICE_IDS:-}] $*"\n')
  for f in stub.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f'{stub}:{os.environ["PATH"]}', SLURM_JOB_ID='7',
             SLURM_JOB_NODELIST='node-[a-b]', SLURM_NTASKS='2', PYTHON='fakepython',
             WORKDIR='/shared/run', PER_GPU='1')
  proc = subprocess.run(['bash', str(REPO / 'launch' / 'slurm_gpu.sbatch')], env=env,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  for i in range(2):
    assert (f'node-a:12007 2 {i} [{i}] -m pilaf_jax.main --config=configs/llama3_8b_8xh100.py '
            '--workdir=/shared/run') in proc.stdout


if __name__ == '__main__':
  if sys.argv[1] == 'devices8':
    print(json.dumps(devices8_checks()))
  elif sys.argv[1] == 'multihost_worker':
    multihost_worker()
  else:
    raise SystemExit(f'unknown check {sys.argv[1]}')


@pytest.mark.parametrize('policy', ['save_dots', ''])
def test_save_dots_pins_layer_activations_to_the_rows(policy):
  """Under save_dots the scanned layers' inputs and projection outputs go through constrain_rows
  (what that policy keeps must stay split over the rows on a mesh); values are unchanged."""
  import dataclasses
  from pilaf_jax.model.llama import Llama, init_params, stack_layer_params
  from pilaf_jax.model.scoring import response_logprobs
  cfg = dataclasses.replace(tiny_cfg(vocab_size=100), remat=True, remat_policy=policy, scan_layers=True)
  params = stack_layer_params(init_params(dataclasses.replace(cfg, scan_layers=False), jax.random.key(0)))
  prompts = jnp.array([[0, 3, 4], [5, 6, 7]], jnp.int32)
  responses = jnp.array([[8, 9], [10, 11]], jnp.int32)
  ones = lambda x: jnp.ones_like(x, bool)
  shapes = []

  def pin(x):
    shapes.append(jax.tree.map(lambda a: a.shape, x))
    return x
  model = Llama(cfg)
  plain = response_logprobs(model, params, prompts, ones(prompts), responses, ones(responses))
  pinned = response_logprobs(model, params, prompts, ones(prompts), responses, ones(responses), constrain_rows=pin)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(pinned))
  import collections
  widths = collections.Counter(s[2] for s in shapes if isinstance(s, tuple) and len(s) == 3
                               and s[:2] == (2, 5) and s[2] != cfg.vocab_size)
  assert [s for s in shapes if s == (2, 5, cfg.vocab_size)] == [(2, 5, cfg.vocab_size)]  # The logits, once.
  if policy == 'save_dots':
    # The scanned layer body (traced once or more): its input and its 7 projections, [rows, tokens, .].
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    body = collections.Counter([d, cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd, d,
                                cfg.intermediate_size, cfg.intermediate_size, d])
    traces = widths[cfg.intermediate_size] // 2
    assert traces >= 1 and widths == collections.Counter({k: traces * v for k, v in body.items()}), shapes
  else:  # Full remat: only the logits are pinned, as before.
    assert not widths, shapes
