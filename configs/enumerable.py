"""A task small enough to enumerate every response (3 content tokens, responses of <= 4 tokens:
121 responses per prompt), so that the exact sequence-level T-PILAF sampler can run, and sampler
studies can be compared against exact distributions."""
from pilaf_jax import default_config


def get_config():
  c = default_config.get_config()
  c.task.update(vocab_size=6, prompt_len=6, response_len=4)
  c.task.synthetic.update(num_topics=3, num_styles=3)
  c.model.update(vocab_size=6, hidden_size=64, intermediate_size=128)
  c.sampler.name = 't_pilaf'
  c.sft.steps = 300
  c.online.steps = 100
  c.eval.update(every_steps=25, num_prompts=512, batch_size=512)
  return c
