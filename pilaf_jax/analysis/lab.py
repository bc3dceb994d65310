r"""The exact theory lab along a training run: the project's one training loop (loops/loop.py), with
every sampler measured exactly at each evaluation point (analysis/theory.py) and priced in signal per
label (analysis/price.py).

  python -m pilaf_jax.analysis.lab --config=configs/enumerable.py --workdir=runs/theory \
      [--steps=200 --every=20 --num_prompts=32 --train_sampler=vanilla \
       --samplers=vanilla,pilaf,hybrid,t_pilaf,t_pilaf_half,best_of_n] [--config.<field>=<value> ...]

Per measured step and sampler: the cosine of its population DPO direction with grad J, the per-label
variance, n1 (labels for the J-component of the averaged gradient to reach signal/noise 1), the J
gain per label at the best step size and its ratio to vanilla's; per step: J, J*, log Z+ Z-,
sd_pi(r_theta), sd_pi(r* - r_theta), T-PILAF's weight (also per prompt). The workdir gets
theory.jsonl, a table (theory.md) and plots (theory_cosine.png, theory_J.png). With --novariance only
the cosines and norms are measured (no Gram matrices, no price).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax import experiment, paths, workdir_config
from pilaf_jax.analysis import price
from pilaf_jax.analysis.theory import LAB_SAMPLERS, ExactLab
from pilaf_jax.analysis.theory_outputs import write_outputs
from pilaf_jax.batches import PromptBatch
from pilaf_jax.loops.loop import run_loop
from pilaf_jax.loops.online import OnlineSchedule
from pilaf_jax.tasks.base import EVAL


def run_lab(config, workdir: str, *, steps: int, every: int, num_prompts: int, train_sampler: str,
            samplers: Sequence[str], variance: bool = True, log=print) -> list[dict]:
  """Online DPO with train_sampler (the training loop of loops/loop.py, evaluating every `every`
  steps), measuring and pricing every sampler exactly at each evaluation point."""
  config = config.copy_and_resolve_references()
  config.eval.every_steps = every
  workdir_config.prepare_workdir(config, workdir)
  exp = experiment.Experiment(config, workdir)
  path = os.path.join(workdir, 'theory.jsonl')
  rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []  # Kept on resume.
  models = exp.models
  try:
    prompts = jax.tree.map(np.asarray, models.task.prompts(EVAL, 0, num_prompts))
    lab = ExactLab.build(models.sampler_ctx, PromptBatch(jnp.asarray(prompts.tokens), jnp.asarray(prompts.mask),
                                                         prompts.ids),
                         lambda p, y, m: models.task.rewards(EVAL, p, y, m))
    log(f'Theory lab: {num_prompts} held-out prompts x {lab.tokens.shape[0]} responses; training with '
        f'{train_sampler} for {steps} steps, measuring {", ".join(samplers)} every {every} steps.')

    def measure(t: int, run, ref) -> None:  # At every evaluation point of the loop.
      start, params = time.time(), run.train.params
      measured = (price.lab_price(lab, params, ref, samplers) if variance else
                  lab.measure(params, ref, samplers, variance=False))
      row = {'step': t, 'labels_used': int(run.labels_used), **measured}
      rows[:] = [r for r in rows if r['step'] < t] + [row]  # A resumed lab measures again from t.
      paths.write_text_atomic(path, ''.join(json.dumps(r) + '\n' for r in rows))
      log(f'step {t:4d}: J {row["J"]:.3f} (J* {row["J_star"]:.3f})  cosine with grad J: ' + '  '.join(
          f'{s} {row["samplers"][s]["cosine"]:+.3f}' for s in samplers) + f'  ({time.time() - start:.1f} s)')
    run_loop(exp, OnlineSchedule(config, train_sampler, steps, prefix='theory'), log, measure=measure)
  finally:
    exp.close()
  write_outputs(rows, samplers, workdir, train_sampler)  # theory.md and the plots.
  return rows


def main() -> None:
  from absl import app, flags
  from ml_collections import config_flags
  from pilaf_jax import config_aliases
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config_flags.DEFINE_config_file('config', os.path.join(here, 'configs', 'enumerable.py'), 'Config file.')
  flags.DEFINE_string('workdir', None, 'Output directory (reference, labels, theory.jsonl, plots).')
  flags.DEFINE_integer('steps', None, 'Online DPO steps (default: the config\'s online.steps).')
  flags.DEFINE_integer('every', 10, 'Measure every this many steps.')
  flags.DEFINE_integer('num_prompts', 32, 'Held-out prompts the exact quantities average over.')
  flags.DEFINE_string('train_sampler', None, 'Sampler that drives training (default: sampler.name).')
  flags.DEFINE_string('samplers', ','.join(LAB_SAMPLERS), 'Samplers to measure.')
  flags.DEFINE_bool('variance', True, 'Also the per-label gradient variance (Gram matrices) and the price.')

  def run(_argv):
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if not f.workdir:
      print('error: --workdir is required.', file=sys.stderr)
      sys.exit(2)
    config = config_aliases.resolve(f.config)
    run_lab(config, f.workdir, steps=f.steps if f.steps is not None else config.online.steps,
            every=f.every, num_prompts=f.num_prompts, train_sampler=f.train_sampler or config.sampler.name,
            samplers=[s for s in f.samplers.split(',') if s], variance=f.variance)
    print(f'Wrote {os.path.join(f.workdir, "theory.md")}, theory.jsonl, theory_cosine.png, theory_J.png')
  sys.argv[:] = config_aliases.rewrite_overrides(sys.argv)  # config_flags reads sys.argv.
  app.run(run)


if __name__ == '__main__':
  main()
