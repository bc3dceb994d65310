"""Run under 8 forced CPU devices by test_sharded_equivalence.py: the same sampling and DPO steps
on one device and on several meshes; prints the largest differences as JSON."""
import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pilaf_jax import default_config  # noqa: E402
from pilaf_jax.experiment import Experiment  # noqa: E402
from pilaf_jax.model.llama import init_params  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def run(mesh, workdir):
  c = default_config.get_config()
  c.model.update(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
  c.task.response_len = 8
  c.dpo.batch_size = 16
  c.eval.update(num_prompts=64, batch_size=64)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  devices = jax.devices()[:int(np.prod(mesh))]
  exp = Experiment(c, workdir, devices)
  place = exp.models.placement
  init = jax.jit(lambda rng: init_params(exp.models.model.cfg, rng), out_shardings=place.params)
  ref, policy = init(jax.random.key(0)), init(jax.random.key(1))
  run_state = exp.models.init_run_state(ref).replace(train=exp.models.init_policy_state(policy))
  out = {}
  for sampler in ('pilaf', 'hybrid'):  # Every decode row group: policy-only, mixed, reference-only.
    pairs = exp.models.sampler(sampler)(run_state.train.params, ref, exp.models.prompts(0, 16), place.scalar(0))
    out[sampler] = jax.device_get((pairs.responses, pairs.policy_logprobs, pairs.ref_logprobs))
  batch, _ = exp.labelled_batch('online/000000', 0, 0, 'pilaf', run_state.train.params, ref, 16)
  train = run_state.train
  for _ in range(2):
    train, metrics = exp.models.train_step(train, batch)
  out['loss'] = float(metrics['dpo_loss'])
  out['params'] = jax.device_get(train.params)
  out['eval'] = exp.evaluate(train.params, ref)
  exp.close()
  return out


def main():
  results = {m: run(m, tempfile.mkdtemp()) for m in MESHES}
  base = results[MESHES[0]]
  report = {}
  for mesh in MESHES[1:]:
    r = results[mesh]
    diff = {}
    for sampler in ('pilaf', 'hybrid'):
      diff[f'{sampler}_tokens_equal'] = bool(np.array_equal(base[sampler][0], r[sampler][0]))
      diff[f'{sampler}_logprob_diff'] = float(max(np.abs(base[sampler][i] - r[sampler][i]).max() for i in (1, 2)))
    diff['loss_diff'] = abs(base['loss'] - r['loss'])
    diff['param_diff'] = float(max(np.abs(a - b).max() for a, b in
                                   zip(jax.tree.leaves(base['params']), jax.tree.leaves(r['params']))))
    diff['eval_reward_diff'] = abs(base['eval']['reward'] - r['eval']['reward'])
    diff['eval_kl_diff'] = abs(base['eval']['kl'] - r['eval']['kl'])
    report['x'.join(map(str, mesh))] = diff
  print(json.dumps(report))


if __name__ == '__main__':
  main()
