r"""The lab's prediction for a run's starting point: the exact price of every sampler on the network
itself (after SFT and the task's warm start), before any training.

  python -m pilaf_jax.analysis.predict --config=configs/rare.py --workdir=<dir> \
      [--num_prompts=24] [--config.<field>=<value> ...]

Writes <workdir>/prediction.json: J, J*, KL, the policy state (log Z+ Z-, sd_pi(r_theta),
sd_pi(r* - r_theta), T-PILAF's per-prompt weights) and per sampler the cosine with grad J, a, s^2,
n1, the J gain per label at the best step size and its ratio to vanilla's (analysis/price.py).
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.analysis import price, theory
from pilaf_jax.batches import PromptBatch


def predict(config, workdir: str, num_prompts: int, samplers=theory.LAB_SAMPLERS, log=print) -> dict:
  from pilaf_jax import experiment, workdir_config
  from pilaf_jax.tasks.base import EVAL
  os.makedirs(workdir, exist_ok=True)
  workdir_config.prepare_workdir(config, workdir)
  exp = experiment.Experiment(config, workdir)
  models = exp.models
  try:
    ref = models.reference_params(log)
    start = models.initial_policy_params(ref)
    prompts = jax.tree.map(np.asarray, models.task.prompts(EVAL, 0, num_prompts))
    lab = theory.ExactLab.build(models.sampler_ctx, PromptBatch(jnp.asarray(prompts.tokens),
                                                                jnp.asarray(prompts.mask), prompts.ids),
                                lambda p, y, m: models.task.rewards(EVAL, p, y, m))
    out = price.lab_price(lab, start, ref, samplers)
  finally:
    exp.close()
  out = jax.tree.map(lambda x: float(x) if isinstance(x, (np.floating, float)) else x, out)
  with open(os.path.join(workdir, 'prediction.json'), 'w') as f:
    json.dump(out, f, indent=1)
  log(f'J {out["J"]:.3f} (J* {out["J_star"]:.3f}), KL {out["kl"]:.2f}, log Z+Z- {out["log_zz"]:.2f}, '
      f'sd r_theta {out["sd_r_theta"]:.2f}, sd residual {out["sd_residual"]:.2f}')
  for name, row in out['samplers'].items():
    log(f'  {name:13s} cos {row["cosine"]:+.3f}  n1 {row["labels_for_snr1_along_J"]:.3g}  '
        f'J gain/label {row.get("J_gain_per_label", float("nan")):.3g}  x vanilla '
        f'{row.get("relative_gain", float("nan")):.2f}')
  return out


def main() -> None:
  from absl import app, flags
  from ml_collections import config_flags
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config_flags.DEFINE_config_file('config', os.path.join(here, 'configs', 'rare.py'), 'Config file.')
  flags.DEFINE_string('workdir', None, 'Output directory (reference, prediction.json).')
  flags.DEFINE_integer('num_prompts', 24, 'Held-out prompts the exact quantities average over.')

  def run(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    if not flags.FLAGS.workdir:
      print('error: --workdir is required.', file=sys.stderr)
      sys.exit(2)
    predict(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.num_prompts)
  app.run(run)


if __name__ == '__main__':
  main()
