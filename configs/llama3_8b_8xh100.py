"""Paper scale on one 8-GPU node (8 x H100 80 GB): Llama-3.1-8B, online DPO with PILAF sampling,
HH-RLHF prompts, a Llama-3.1-8B reward model as the oracle (the paper's setting).

  python -m pilaf_jax.main --config=configs/llama3_8b_8xh100.py --workdir=/path/to/run \
      --config.model.checkpoint=/models/llama-3.1-8b-sft \
      --config.oracle.checkpoint=/models/Skywork-Reward-Llama-3.1-8B \
      --config.task.chat.source_dir=/data/hh-rlhf
  python -m pilaf_jax.tools.memory_report --config=configs/llama3_8b_8xh100.py --devices=8

The paths below are placeholders: every file is read from local disk (nothing is downloaded).
model.checkpoint is a Hugging Face directory of the SFT policy (it is also the reference);
oracle.checkpoint a LlamaForSequenceClassification reward model; task.chat.source_dir holds Anthropic's
HH-RLHF files (<dir>/<subset>/{train,test}.jsonl.gz), built once into task.chat.data_dir with TFDS.

One process drives the node's 8 GPUs. For several nodes use launch/slurm_gpu.sbatch, which sets
the PILAF_* variables that override config.distributed; the mesh's fsdp=-1 then spans every GPU.
Memory figures are in docs/scale_out.md.
"""
from pilaf_jax import default_config
from pilaf_jax.model import presets


def get_config():
  c = default_config.get_config()

  c.task.name = 'chat'
  c.task.chat.dataset = 'hh_rlhf'
  c.task.chat.source_dir = '/data/hh-rlhf'  # Anthropic's jsonl.gz files, one folder per subset.
  c.task.chat.data_dir = '/data/tensorflow_datasets'
  c.task.chat.subset = 'all'  # 161k training conversations; evaluation on the test split.
  c.task.vocab_size = 128_256  # Llama 3 tokenizer.
  c.task.prompt_len = 512
  c.task.response_len = 512

  # Llama-3.1-8B (its config is read from the checkpoint at run time; the preset lets the memory
  # report and validation work without the files). Activations and matmuls in bfloat16; parameters
  # in float32 because AdamW updates at DPO learning rates (~5e-7 relative to weights of ~1e-2) are
  # far below bfloat16's resolution (2^-8 relative) and would round to no change. Optimizer moments
  # follow the params (float32).
  c.model.checkpoint = '/models/llama-3.1-8b-sft'
  c.model.update(presets.LLAMA3_1_8B)
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = True  # Without it the DPO step's activations do not fit (docs/scale_out.md).

  # The oracle: a reward model read through its own tokenizer and chat template, in bfloat16,
  # sharded like the policy. Bradley-Terry labels on its scores, as in the paper.
  c.oracle.reward = 'reward_model'
  c.oracle.checkpoint = '/models/Skywork-Reward-Llama-3.1-8B'
  c.oracle.dtype = 'bfloat16'
  c.oracle.max_len = 1024

  c.sft.batch_size = 64  # Unused (the reference is loaded); batch sizes must still split over the mesh.

  # Every batch must split over the 8 data-parallel (fsdp) shards.
  c.dpo.batch_size = 64  # 128 sequences of 1024 tokens per step, 16 per GPU.
  c.dpo.learning_rate = 5e-7
  c.dpo.warmup_steps = 100
  c.dpo.weight_decay = 0.0
  c.dpo.max_grad_norm = 1.0

  c.eval.num_prompts = 512
  c.eval.batch_size = 64

  # About 96 GiB of params + optimizer state per checkpoint: save by steps, not every two minutes.
  c.checkpoint.every_steps = 50
  c.checkpoint.every_seconds = 3600.0

  # Plain FSDP: params, grads and AdamW state split 8 ways, batch rows split 8 ways.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 1
  c.runtime.progress_bar = False
  return c
