"""Re-evaluates a finished run of configs/smollm2_demo.py at its first and last evaluation, with the
current evaluator (per-prompt values), and checks the figures against the run's metrics.jsonl.

  PYTHONPATH=$PWD python docs/studies/smollm2_demo/reevaluate.py <run workdir> <seed> <sampler> [init_checkpoint]

Evaluation is deterministic given the config and seed (same prompts, same sampling noise), so the
recomputed reward and KL must equal the recorded rows exactly; their per-prompt values then give the
gain's paired standard error without retraining. Writes <workdir>/reevaluated.jsonl (two rows).
"""
import json
import os
import sys
import time

from pilaf_jax import config_validation, experiment, paths, workdir_config
from pilaf_jax.evaluation.gains import gain


def main(workdir: str, seed: int, sampler: str, init_checkpoint: str = '') -> int:
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', '..', 'configs'))
  import smollm2_demo
  c = smollm2_demo.get_config()
  c.seed, c.sampler.name, c.runtime.progress_bar = seed, sampler, False
  if init_checkpoint:
    c.sft.init_checkpoint = init_checkpoint
  config_validation.validate(c)
  c = config_validation.resolve_checkpoints(c)
  workdir_config.check_workdir(c, workdir)  # The same config as the run's.
  started = time.time()
  exp = experiment.Experiment(c, workdir)
  ref = exp.models.reference_params(print)
  run = exp.models.init_run_state(ref)
  first = {'step': 0, **exp.evaluate(run.train.params, ref)}
  step, run, _ = exp.checkpointer.restore_latest(run, print)
  last = {'step': step, **exp.evaluate(run.train.params, ref)}
  exp.close()
  recorded = {r['step']: r for r in paths.read_metrics(workdir)}
  for row in (first, last):
    old = recorded[row['step']]
    same = all(row[k] == old[k] for k in ('reward', 'reward_se', 'kl', 'kl_se'))
    print(f'step {row["step"]}: reward {row["reward"]:.6f} (recorded {old["reward"]:.6f}), KL {row["kl"]:.6f} '
          f'(recorded {old["kl"]:.6f}): {"identical" if same else "DIFFERENT"}')
  print(gain(first, last, 'reward').format())
  print(gain(first, last, 'kl').format())
  print(f'{time.time() - started:.0f} s')
  with open(os.path.join(workdir, 'reevaluated.jsonl'), 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in (first, last)))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:]))
