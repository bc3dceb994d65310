"""The embedded default experiment: online DPO with PILAF on the synthetic preference task (CPU, minutes).

Every config file in configs/ starts from this one and overrides fields; every field can also be
overridden on the command line, e.g. `--config.sampler.name=vanilla --config.seed=3`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.loop = 'online'  # 'online' (sample, label, update every step) or 'iterative'.
  c.beta = 0.1  # One beta for DPO, for the PILAF sampler and for J = reward - beta * KL.

  # The task: prompts, token conventions, where the reference comes from, the oracle's reward.
  # 'synthetic' is a hidden world (the fields up to reward_scale); 'chat' is real text (the fields
  # after it, with model.checkpoint and oracle.reward; see configs/smollm2_demo.py).
  c.task = ml_collections.ConfigDict(dict(
      name='synthetic',  # synthetic | chat
      world_seed=1234,  # The world (topics, styles, utilities) is fixed by this, not by c.seed.
      vocab_size=64,  # PAD=0, BOS=1, EOS=2, content tokens 3..vocab_size-1.
      prompt_len=8,
      response_len=16,
      num_topics=8,
      num_styles=4,
      copy_prob=0.2,  # Behaviour: probability of copying a prompt token.
      reward_scale=4.0,
      # chat: prompts from a dataset, rendered with the tokenizer's chat template.
      dataset='',  # hh_rlhf (TFDS, built from the jsonl.gz files) | jsonl (one conversation per line)
      source_dir='',  # hh_rlhf: <dir>/<subset>/{train,test}.jsonl.gz; jsonl: <dir>/{train,test}.jsonl[.gz]
      data_dir='',  # hh_rlhf: where the TFDS build is written and read ('' = <source_dir>/tfds).
      subset='all',  # hh_rlhf: harmless-base | helpful-base | helpful-online | helpful-rejection-sampled | all | flat
      tokenizer='',  # A tokenizer directory or .gguf file; '' = model.checkpoint's.
      chat_template='',  # Overrides the tokenizer's chat template (a Jinja string).
      overlong_prompts='truncate',  # truncate (keep the end of the conversation) | error
  ))

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=0, rope_theta=10_000.0, rms_norm_eps=1e-5, tie_embeddings=False,
      attention_bias=False, rope_scaling='', rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_position=8192,
      remat=False, dtype='float32', param_dtype='float32',
      remat_policy='',  # With remat: '' recomputes everything, 'save_dots' keeps the projections' outputs.
      scan_layers=False,  # flax.linen.scan over the decoder layers: compile time independent of depth.
      # A pretrained checkpoint (HF directory, .gguf file, or package:<pkg>/<file>). When set, the
      # architecture fields above are read from it; the policy starts from it, and so does the
      # reference unless reference_checkpoint names another one of the same architecture.
      checkpoint='', reference_checkpoint=''))

  # Supervised fine-tuning of the reference on behaviour responses (cached in the workdir).
  c.sft = ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, learning_rate=3e-3, warmup_steps=30, weight_decay=0.0,
      init_checkpoint='',  # A finished SFT directory to reuse instead of training (same task/model).
  ))

  c.sampler = ml_collections.ConfigDict(dict(
      name='pilaf',  # vanilla | pilaf | best_of_n | hybrid | t_pilaf
      vanilla_fraction=0.5,  # pilaf: share of prompts that get a vanilla pair (stratified, exact).
      best_of_n=8,
      temperature=1.0, top_k=0, top_p=1.0,  # Applied after mixing. Exact sampling: 1.0, 0, 1.0.
      max_enumerated_responses=4096,  # t_pilaf only: largest response set it will enumerate.
  ))

  c.oracle = ml_collections.ConfigDict(dict(
      name='bradley_terry',  # bradley_terry (sampled labels) | deterministic (higher reward wins)
      # Where r*(x, y) comes from: 'task' (the synthetic world's hidden reward), 'reward_model' (a
      # sequence-classification checkpoint) or 'judge' (a chat model asked whether a response is good:
      # reward = logit(Yes) - logit(No)). The last two read text, with their own tokenizer. 'human':
      # no function oracle, people answer the labelling queue (synthetic task: its hidden reward is
      # still stored beside each pair, for agreement reports, and never used as a label).
      reward='task',
      checkpoint='',  # reward_model / judge: HF directory, .gguf file or package:<pkg>/<file>.
      tokenizer='',  # '' = the oracle checkpoint's own.
      max_len=512,  # Tokens of (conversation + response) the oracle reads; longer ones keep the end.
      reward_scale=1.0,  # r* = reward_scale * score (Bradley-Terry labels depend on the scale).
      dtype='float32',  # The oracle model's params and activations (bfloat16 for large reward models).
  ))

  c.labelling = ml_collections.ConfigDict(dict(
      # The SQLite label store: a local file ('' = <workdir>/labels.sqlite for a local workdir; for a
      # gs:// workdir, $PILAF_LOCAL_DIR or ~/.cache/pilaf_jax, under workdirs/<the workdir's name>/).
      # Where it lives is not part of what the run computes: it may change between resumes.
      store_path='',
      # The labelling queue (pilaf_jax/labelling/queue.py): sampled pairs wait there as queries until
      # an oracle answers them. Online DPO may train at step t on a batch sampled at step >= t -
      # max_staleness, keeping up to max_staleness batches enqueued ahead (0: synchronous).
      max_staleness=0,
      answers_per_query=1,  # k: answers (other than 'skip') that resolve a query, by majority.
      allow_ties=False,  # Whether people may answer 'tie' (a drawn vote is settled by a fair coin).
      # Who answers function-oracle queries: 'inline' (the loop itself) or 'external' (a separate
      # `python -m pilaf_jax.labelling.worker --workdir=<workdir>`). How the run executes, not what
      # it computes: it may change between resumes, as may poll_seconds.
      worker='inline',
      poll_seconds=0.2,  # How often a waiting loop (or worker) looks at the queue.
  ))

  c.dpo = ml_collections.ConfigDict(dict(
      batch_size=64,  # Prompts (= labelled pairs) per update.
      learning_rate=3e-4, warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0,
  ))

  c.online = ml_collections.ConfigDict(dict(steps=200))

  c.iterative = ml_collections.ConfigDict(dict(
      iterations=3, prompts_per_iteration=2048, epochs=2,
      first_iteration_sampler='vanilla',  # As in the paper; '' uses c.sampler.name throughout.
      init_checkpoint='',  # Branch from this checkpoint directory (e.g. the end of iteration 1).
  ))

  c.eval = ml_collections.ConfigDict(dict(every_steps=50, num_prompts=1024, batch_size=512))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=50, every_seconds=120.0, max_to_keep=2, async_save=True))

  # Device mesh: sizes per named axis, -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Multi-host: empty = single process, 'auto' = let jax.distributed read the cluster environment.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=1, process_id=0, local_device_ids=''))

  # How the run looks; not part of what it computes (may change between resumes).
  c.runtime = ml_collections.ConfigDict(dict(progress_bar=True, log_every_steps=10))
  return c
