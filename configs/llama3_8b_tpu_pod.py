"""Paper scale on a Cloud TPU pod slice (v5p-64 or v4-64: 32 chips, 8 hosts): Llama-3.1-8B,
online DPO with PILAF sampling.

  WORKDIR=gs://BUCKET/run CONFIG=configs/llama3_8b_tpu_pod.py launch/tpu_pod.sh run
  python -m pilaf_jax.tools.memory_report --config=configs/llama3_8b_tpu_pod.py --devices=32

Every host runs the same command; jax.distributed finds the other hosts from the TPU metadata
(coordinator 'auto'). Memory figures are in docs/scale_out.md.
"""
from pilaf_jax import default_config
from pilaf_jax.model import presets


def get_config():
  c = default_config.get_config()

  # Needs the real-data task (HH-RLHF prompts, a tokenizer, a reward-model oracle), which does not
  # exist yet; the memory report does not depend on it. The synthetic-only task fields are unused.
  c.task.name = 'hh_rlhf'
  c.task.vocab_size = 128_256  # Llama 3 tokenizer.
  c.task.prompt_len = 512
  c.task.response_len = 512

  # Llama-3.1-8B. Activations and matmuls in bfloat16; parameters in float32 because AdamW updates
  # at DPO learning rates (~5e-7 relative to weights of ~1e-2) are far below bfloat16's resolution
  # (2^-8 relative) and would round to no change. Optimizer moments follow the params (float32).
  c.model.update(presets.LLAMA3_8B)
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = True  # Without it the DPO step's activations do not fit (docs/scale_out.md).

  # The reference is an SFT'd Llama-3.1-8B loaded from a checkpoint rather than trained here.
  c.sft.batch_size = 64
  c.sft.learning_rate = 1e-5
  c.sft.warmup_steps = 100

  # Every batch must split over the 32 data-parallel (fsdp) shards.
  c.dpo.batch_size = 64  # 128 sequences of 1024 tokens per step, 4 per chip.
  c.dpo.learning_rate = 5e-7
  c.dpo.warmup_steps = 100
  c.dpo.weight_decay = 0.0
  c.dpo.max_grad_norm = 1.0

  c.eval.num_prompts = 512
  c.eval.batch_size = 64

  # About 96 GiB of params + optimizer state per checkpoint: save by steps, not every two minutes.
  c.checkpoint.every_steps = 50
  c.checkpoint.every_seconds = 3600.0

  # Plain FSDP over every chip of the slice (32 on v5p-64 / v4-64): each chip holds 1/32 of the
  # params, grads and AdamW state. The 8B model does not need tensor parallelism at this size.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # One process per TPU host; the TPU runtime tells jax.distributed about the others.
  c.distributed.coordinator_address = 'auto'
  c.runtime.progress_bar = False
  return c
