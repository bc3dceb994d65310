r"""What one checkpoint save adds to a DPO step, on the default model (CPU).

  python benchmarks/checkpoint_cost.py [--steps=20] [--rounds=3] [--config=configs/<x>.py]

Times the loop's own pieces: Experiment.models.train_step on one labelled batch (from
Experiment.labelled_batch, default sampler and batch size), with no checkpoint, and with a checkpoint
of the whole run state (Experiment.models.init_run_state: params, AdamW moments, counters) saved after every
step through Experiment's Checkpointer settings (max_to_keep, so old checkpoints are deleted as in a
run), asynchronously and synchronously. Each step waits for its result (jax.block_until_ready), as
the online loop does when the next step samples from the new params; the pending async save is
awaited at the end and counted. The three modes run round-robin, --rounds times, each round --steps
steps in a fresh checkpoint directory; the median per-step time of each mode is reported.

Parameters are a random init (the cost does not depend on training); the label store and the
checkpoints go to a temp dir (--dir to choose one, e.g. on the disk a run would use).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from pilaf_jax import checkpointing, default_config  # noqa: E402
from pilaf_jax.experiment import Experiment  # noqa: E402
from pilaf_jax.model.llama import init_params  # noqa: E402


def load_config(path):
  if not path:
    return default_config.get_config()
  spec = importlib.util.spec_from_file_location('_checkpoint_cost_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def dir_bytes(path: str) -> int:
  return sum(p.stat().st_size for p in pathlib.Path(path).rglob('*') if p.is_file())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='', help='config file (default: the embedded default)')
  parser.add_argument('--steps', type=int, default=20, help='DPO steps per round and mode')
  parser.add_argument('--rounds', type=int, default=3, help='round-robin repetitions of the three modes')
  parser.add_argument('--dir', default='', help='where the label store and checkpoints go (default: temp)')
  args = parser.parse_args()

  c = load_config(args.config)
  root = args.dir or tempfile.mkdtemp(prefix='checkpoint_cost_')
  os.makedirs(root, exist_ok=True)
  exp = Experiment(c, os.path.join(root, 'workdir'))
  init = jax.jit(lambda rng: init_params(exp.models.model.cfg, rng), out_shardings=exp.models.placement.params)
  ref = init(jax.random.key(0))
  run = exp.models.init_run_state(ref)
  batch, _ = exp.labelled_batch('checkpoint_cost', 0, 0, c.sampler.name, run.train.params, ref,
                                c.dpo.batch_size)
  n_params = sum(x.size for x in jax.tree.leaves(ref))

  def step(run):
    train, _ = exp.models.train_step(run.train, batch)
    run = run.replace(train=train, labels_used=run.labels_used + c.dpo.batch_size)
    return jax.block_until_ready(run)

  ck = c.checkpoint
  state = {'run': step(run), 'step': 0}  # Compiles the step.

  def time_mode(mode: str, round_index: int) -> float:
    """Seconds per step over args.steps steps; mode: 'none', 'async' or 'sync'."""
    directory = os.path.join(root, f'checkpoints_{mode}_{round_index}')
    saver = None if mode == 'none' else checkpointing.Checkpointer(
        directory, max_to_keep=ck.max_to_keep, every_steps=1, every_seconds=1e9,
        async_save=(mode == 'async'))
    run, t = state['run'], state['step']
    start = time.perf_counter()
    for _ in range(args.steps):
      run, t = step(run), t + 1
      if saver is not None:
        saver.save(t, run, {'loop': 'online', 'step': t})
    if saver is not None:
      saver.wait()
    seconds = (time.perf_counter() - start) / args.steps
    if saver is not None:
      state['bytes'] = dir_bytes(os.path.join(directory, str(t)))
      saver.close()
      shutil.rmtree(directory, ignore_errors=True)
    state['run'], state['step'] = run, t
    return seconds

  modes = ('none', 'async', 'sync')
  for mode in modes[1:]:  # Warm up orbax (thread pools, first-save metadata) outside the timings.
    steps, args.steps = args.steps, 2
    time_mode(mode, -1)
    args.steps = steps
  times = {m: [] for m in modes}
  for r in range(args.rounds):
    for mode in modes:
      times[mode].append(time_mode(mode, r))
  exp.close()
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)

  base = statistics.median(times['none'])
  print(f'Checkpoint cost, {"default" if not args.config else args.config} model ({n_params / 1e6:.2f} M '
        f'params), DPO batch {c.dpo.batch_size}; checkpoint {state["bytes"] / 1e6:.1f} MB on disk '
        f'(params + AdamW moments + counters), max_to_keep={ck.max_to_keep}; backend {jax.default_backend()}, '
        f'{jax.device_count()} device(s)')
  print(f'median over {args.rounds} rounds of {args.steps} steps each (rounds: '
        + '; '.join(f'{m} ' + ', '.join(f'{1e3 * x:.1f}' for x in times[m]) for m in modes) + ' ms/step)')
  print(f'{"mode":<26} {"ms/step":>9} {"ms/save":>9} {"vs no save":>11}')
  for mode, label in zip(modes, ('no checkpoint', 'async save every step', 'sync save every step')):
    t = statistics.median(times[mode])
    extra = '' if mode == 'none' else f'{1e3 * (t - base):.1f}'
    print(f'{label:<26} {1e3 * t:>9.1f} {extra:>9} {t / base:>10.2f}x')
  every = ck.every_steps
  for mode in ('async', 'sync'):
    save = statistics.median(times[mode]) - base
    print(f'{mode} save every {every} steps (the config): {100 * save / every / base:+.1f}% per step')


if __name__ == '__main__':
  main()
