"""The rare-reward enumerable task (pilaf_jax/tasks/rare.py): good responses rare under the
reference, a warm start partway to the optimum, beta = 0.5. 3 content tokens and responses of <= 4
tokens (121 per prompt), so t_pilaf, t_pilaf_half and the exact theory lab can run.

  python -m pilaf_jax.main --config=configs/rare.py --workdir=runs/rare --config.sampler.name=pilaf \
      --config.task.rare.start_lambda=0.8 --config.task.rare.reward_scale=3
"""
from pilaf_jax import default_config
from pilaf_jax.tasks import rare


def get_config():
  c = default_config.get_config()
  c.beta = 0.5
  c.task.update(name='rare', vocab_size=6, prompt_len=4, response_len=4)
  c.task.rare = rare.default_fields()
  c.task.rare.update(good_prob=0.05, topic_spread=1.0, reward_scale=2.0, start_lambda=0.5)
  c.model.update(vocab_size=6, hidden_size=64, intermediate_size=128)
  c.sampler.name = 't_pilaf_half'
  c.sft.steps = 300
  c.dpo.update(batch_size=32, learning_rate=3e-3)  # Vanilla: J 1.05 -> 1.53 of J* 1.90 in 512 labels (win point).
  c.online.steps = 16  # 512 labels: the map's predictions are local (first order at the start).
  c.eval.update(every_steps=8, num_prompts=512, batch_size=512)
  c.checkpoint.every_steps = 8
  return c
