"""Tasks: where prompts come from, which tokens a response may use, and the hidden oracle reward."""
from pilaf_jax.tasks.synthetic import (BOS, EOS, PAD, SyntheticTaskConfig, SyntheticWorld, make_world,
                                       oracle_reward, sample_behaviour, sample_prompts)

TASKS = ('synthetic',)


def make_task(task_cfg) -> SyntheticWorld:
  """Builds the task named by task_cfg.name."""
  if task_cfg.name != 'synthetic':
    raise ValueError(f"task.name={task_cfg.name!r} is not available here; allowed: {list(TASKS)}. "
                     'Real-data tasks need their loader (see README, "Scaling up").')
  return make_world(SyntheticTaskConfig.from_config(task_cfg))
