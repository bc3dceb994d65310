"""Iterative DPO (Xiong et al. 2024) on the synthetic task: iteration 1 samples with vanilla, later
iterations with sampler.name. To branch every method from one iteration-1 checkpoint, as the paper
does, run with --config.iterative.iterations=1 once, then pass its checkpoints directory as
--config.iterative.init_checkpoint=<workdir>/checkpoints to each method's run."""
from pilaf_jax import default_config


def get_config():
  c = default_config.get_config()
  c.loop = 'iterative'
  c.iterative.update(iterations=3, prompts_per_iteration=2048, epochs=2)
  c.eval.every_steps = 32
  return c
