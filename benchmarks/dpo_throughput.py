r"""DPO-step throughput (labelled pairs per second) on 1 and on 8 CPU devices, default model.

  python benchmarks/dpo_throughput.py [--batch=64] [--steps=20]

Each device count runs in its own process (XLA fixes the CPU device count at start-up); the 8-device
run uses a (data=8) mesh, and on a 2-core machine its 8 devices share the 2 cores, so the figure
shows the cost of the sharded program (collectives, partitioning), not a speed-up. Prints the median
step time, pairs/s and the 8-device / 1-device ratio, all measured in this one run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(devices: int, batch: int, steps: int, mesh: str) -> dict:
  sys.path.insert(0, ROOT)
  import tempfile

  import jax
  import numpy as np

  from pilaf_jax import default_config
  from pilaf_jax.experiment import Experiment
  from pilaf_jax.model.llama import init_params

  c = default_config.get_config()
  c.dpo.batch_size = batch
  c.mesh.update(dict(zip(('data', 'fsdp', 'tensor'), map(int, mesh.split(',')))))
  exp = Experiment(c, tempfile.mkdtemp())
  init = jax.jit(lambda rng: init_params(exp.models.model.cfg, rng), out_shardings=exp.models.placement.params)
  ref = init(jax.random.key(0))
  state = exp.models.init_policy_state(ref)
  batch_data, _ = exp.labelled_batch('bench', 0, 0, 'pilaf', state.params, ref, batch)
  state, metrics = exp.models.train_step(state, batch_data)  # Compile.
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = exp.models.train_step(state, batch_data)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  exp.close()
  median = float(np.median(times))
  return {'devices': jax.device_count(), 'mesh': mesh, 'step_s': median, 'pairs_per_s': batch / median}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--worker', type=int, default=0)
  parser.add_argument('--mesh', default='-1,1,1')
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.batch, args.steps, args.mesh)))
    return
  results = []
  for devices, mesh in ((1, '1,1,1'), (8, '8,1,1'), (8, '2,2,2')):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    out = subprocess.run([sys.executable, __file__, f'--worker={devices}', f'--batch={args.batch}',
                          f'--steps={args.steps}', f'--mesh={mesh}'], env=env, capture_output=True,
                         text=True, check=True)
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f'DPO step, default model, {args.batch} pairs per step, median of {args.steps} steps')
  print(f'{"devices":>8} {"mesh (data,fsdp,tensor)":>24} {"step ms":>9} {"pairs/s":>9} {"vs 1 device":>12}')
  for r in results:
    print(f'{r["devices"]:>8} {r["mesh"]:>24} {1000 * r["step_s"]:>9.1f} {r["pairs_per_s"]:>9.1f} '
          f'{r["pairs_per_s"] / results[0]["pairs_per_s"]:>12.2f}')


if __name__ == '__main__':
  main()
