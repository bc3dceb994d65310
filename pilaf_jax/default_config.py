"""The embedded default experiment: online DPO with PILAF on the synthetic preference task (CPU, minutes).

Every config file in configs/ starts from this one and overrides fields; every field can also be
overridden on the command line, e.g. `--config.sampler.name=vanilla --config.seed=3`. Each field's
comment is its documentation: `python -m pilaf_jax.main --help_config` prints the first sentence.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # The run's randomness: model init, SFT data, training prompts, sampling, labels.
  c.loop = 'online'  # 'online' (sample, label, update every step) or 'iterative'.
  c.beta = 0.1  # One beta for DPO, for the PILAF sampler and for J = reward - beta * KL.

  # The task: prompts, token conventions, where the reference comes from, the oracle's reward. The
  # fields of the task named by task.name are in its own subsection; each task checks its own.
  c.task = ml_collections.ConfigDict(dict(
      name='synthetic',  # synthetic (a hidden world; task.synthetic) | chat (real text; task.chat)
      vocab_size=64,  # Token ids of the task; synthetic: PAD=0, BOS=1, EOS=2, content 3..vocab_size-1.
      prompt_len=8,  # Prompt tokens, left-padded (chat: the rendered conversation's budget).
      response_len=16,  # Most tokens a response may have, EOS included.
      synthetic=ml_collections.ConfigDict(dict(
          world_seed=1234,  # The world (topics, styles, utilities) is fixed by this, not by c.seed.
          num_topics=8,  # Hidden topics a synthetic prompt is drawn from.
          num_styles=4,  # Hidden behaviour styles of varying quality that the SFT reference imitates.
          copy_prob=0.2,  # Behaviour: probability of copying a prompt token.
          reward_scale=4.0,  # r* = reward_scale * mean hidden utility of the response's content tokens.
      )),
      # Prompts from a dataset, rendered with the tokenizer's chat template (with model.checkpoint and
      # oracle.reward; see configs/smollm2_demo.py).
      chat=ml_collections.ConfigDict(dict(
          dataset='',  # hh_rlhf (TFDS, built from the jsonl.gz files) | jsonl (one conversation per line)
          source_dir='',  # hh_rlhf: <dir>/<subset>/{train,test}.jsonl.gz; jsonl: <dir>/{train,test}.jsonl[.gz]
          data_dir='',  # hh_rlhf: where the TFDS build is written and read ('' = <source_dir>/tfds).
          subset='all',  # hh_rlhf: harmless-base | helpful-base | helpful-online | helpful-rejection-sampled | all | flat
          tokenizer='',  # A tokenizer directory or .gguf file; '' = model.checkpoint's.
          chat_template='',  # Overrides the tokenizer's chat template (a Jinja string).
          overlong_prompts='truncate',  # truncate (keep the end of the conversation) | error
      )),
  ))

  # The policy's architecture (read from model.checkpoint when one is set) and how it runs.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=64,  # Token ids the model embeds and predicts (task.vocab_size for synthetic).
      hidden_size=128,  # Width of the residual stream.
      intermediate_size=384,  # Width of the SwiGLU MLP.
      num_layers=2,  # Decoder layers.
      num_heads=4,  # Query heads.
      num_kv_heads=2,  # Key/value heads (grouped-query attention when fewer than num_heads).
      head_dim=0,  # Size of one head; 0 = hidden_size / num_heads.
      rope_theta=10_000.0,  # Rotary base frequency.
      rms_norm_eps=1e-5,  # RMSNorm epsilon.
      tie_embeddings=False,  # The output head reuses the token embedding.
      attention_bias=False,  # Biases on the q/k/v projections (Qwen2).
      rope_scaling='',  # '' (plain rotary) or 'llama3' (Llama 3.1's long-context scaling, below).
      rope_scaling_factor=8.0,  # llama3 rope scaling: how much longer wavelengths are stretched.
      rope_low_freq_factor=1.0,  # llama3 rope scaling: wavelengths above original / this are scaled.
      rope_high_freq_factor=4.0,  # llama3 rope scaling: wavelengths below original / this are kept.
      rope_original_max_position=8192,  # llama3 rope scaling: the pre-training context length.
      remat=False,  # Recompute each layer's activations in the backward pass (less memory, more time).
      dtype='float32',  # What the model computes in (activations); bfloat16 halves activation memory.
      param_dtype='float32',  # The parameters' dtype.
      remat_policy='',  # With remat: '' recomputes everything, 'save_dots' keeps the projections' outputs.
      scan_layers=False,  # flax.linen.scan over the decoder layers: compile time independent of depth.
      # A pretrained checkpoint (HF directory, .gguf file, or package:<pkg>/<file>). When set, the
      # architecture fields above are read from it; the policy starts from it, and so does the
      # reference unless reference_checkpoint names another one of the same architecture.
      checkpoint='',
      reference_checkpoint='',  # The reference's checkpoint when it is not model.checkpoint ('' = the same).
  ))

  # Supervised fine-tuning of the reference on behaviour responses (cached in the workdir).
  c.sft = ml_collections.ConfigDict(dict(
      steps=300,  # AdamW steps of SFT.
      batch_size=64,  # Behaviour demonstrations per SFT step.
      learning_rate=3e-3,  # Peak SFT learning rate (linear warmup, then constant).
      warmup_steps=30,  # Steps of linear learning-rate warmup.
      weight_decay=0.0,  # AdamW weight decay during SFT.
      init_checkpoint='',  # A finished SFT directory to reuse instead of training (same task/model).
  ))

  c.sampler = ml_collections.ConfigDict(dict(
      name='pilaf',  # vanilla | pilaf | best_of_n | hybrid | t_pilaf
      vanilla_fraction=0.5,  # pilaf: share of prompts that get a vanilla pair (stratified, exact).
      best_of_n=8,  # best_of_n: policy samples per prompt, of which the best and worst form the pair.
      # Applied after mixing. Exact sampling: 1.0, 0, 1.0.
      temperature=1.0,  # Divides the (mixed) logits before sampling; > 0 for training pairs.
      top_k=0,  # Sample among the k most likely tokens only (0 = off).
      top_p=1.0,  # Nucleus sampling: the smallest set of tokens holding this much mass (1.0 = off).
      max_enumerated_responses=4096,  # t_pilaf only: largest response set it will enumerate.
      # Decode a scanned model (model.scan_layers) with its layers unrolled, over per-layer weights.
      # Faster on CPU, where a layer scan copies each layer's weights before use at every token;
      # the decode programs compile num_layers layer bodies instead of one. Same tokens.
      unroll_layers=False,
  ))

  c.oracle = ml_collections.ConfigDict(dict(
      label_rule='bradley_terry',  # Rewards -> label: bradley_terry (sampled) | deterministic (higher wins)
      # Where r*(x, y) comes from: 'task' (the synthetic world's hidden reward), 'reward_model' (a
      # sequence-classification checkpoint) or 'judge' (a chat model asked whether a response is good:
      # reward = logit(Yes) - logit(No)). The last two read text, with their own tokenizer. 'text_rule':
      # a rule on the decoded response (oracle.text_rule; pilaf_jax/labelling/text_rules.py). 'human':
      # no function oracle, people answer the labelling queue (synthetic task: its hidden reward is
      # still stored beside each pair, for agreement reports, and never used as a label).
      reward='task',
      checkpoint='',  # reward_model / judge: HF directory, .gguf file or package:<pkg>/<file>.
      text_rule='short_first_sentence',  # text_rule: the rule (short_first_sentence: fewer words before the first full stop, floor 3).
      tokenizer='',  # '' = the oracle checkpoint's own.
      max_len=512,  # Tokens of (conversation + response) the oracle reads; longer ones keep the end.
      overlong='truncate',  # Longer inputs: 'truncate' (keep the end; counted and logged) | 'error'.
      reward_scale=1.0,  # r* = reward_scale * score (Bradley-Terry labels depend on the scale).
      dtype='float32',  # The oracle model's params and activations (bfloat16 for large reward models).
  ))

  # Labels: where they are stored, and the queue that pairs wait in until an oracle answers them.
  c.labelling = ml_collections.ConfigDict(dict(
      # The SQLite label store: a local file ('' = <workdir>/labels.sqlite for a local workdir; for a
      # gs:// workdir, $PILAF_LOCAL_DIR or ~/.cache/pilaf_jax, under workdirs/<the workdir's name>/).
      # Where it lives is not part of what the run computes: it may change between resumes.
      store_path='',
      # Batches online DPO may enqueue ahead of training: it trains at step t on a batch sampled at
      # step >= t - max_staleness (0: synchronous). Sampled pairs wait in the labelling queue
      # (pilaf_jax/labelling/queue.py) as queries until an oracle answers them.
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
      learning_rate=3e-4,  # Peak DPO learning rate (AdamW; linear warmup, then constant).
      warmup_steps=10,  # Steps of linear learning-rate warmup.
      weight_decay=0.0,  # AdamW weight decay.
      max_grad_norm=1.0,  # Gradients are clipped to this global norm.
  ))

  c.online = ml_collections.ConfigDict(dict(
      steps=200,  # Online DPO updates (each samples, labels and trains on dpo.batch_size pairs).
  ))

  c.iterative = ml_collections.ConfigDict(dict(
      iterations=3,  # Rounds of (sample and label a dataset with the current policy, then train on it).
      prompts_per_iteration=2048,  # Pairs sampled and labelled per iteration.
      epochs=2,  # Passes over each iteration's dataset.
      first_iteration_sampler='vanilla',  # As in the paper; '' uses c.sampler.name throughout.
      init_checkpoint='',  # Branch from this checkpoint directory (e.g. the end of iteration 1).
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=50,  # Evaluate on held-out prompts every this many updates (and at the end).
      num_prompts=1024,  # Held-out prompts per evaluation (the standard errors are over these).
      batch_size=512,  # Prompts decoded at once during evaluation.
      show_responses=0,  # Held-out responses kept in each evaluation row and printed, first and last, at the end.
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=50,  # Save every this many updates...
      every_seconds=120.0,  # ... or once this many seconds have passed since the last save.
      max_to_keep=2,  # Checkpoints kept in <workdir>/checkpoints (older ones are deleted).
      async_save=True,  # Write checkpoints in the background while training goes on.
  ))

  # Device mesh: sizes per named axis, -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # Data parallelism: rows of every batch split over this many devices (-1 = the rest).
      fsdp=1,  # Fully sharded data parallelism: parameters and optimiser state sharded too.
      tensor=1,  # Tensor parallelism: heads and MLP columns split over this many devices.
  ))

  # Multi-host: empty = single process, 'auto' = let jax.distributed read the cluster environment.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='',  # '' (single process), 'auto' (from the cluster) or host:port of process 0.
      num_processes=1,  # Processes in the job (one per host).
      process_id=0,  # This process's index, 0..num_processes-1.
      local_device_ids='',  # Comma-separated local device ids this process uses ('' = all).
  ))

  # How the run looks; not part of what it computes (may change between resumes).
  c.runtime = ml_collections.ConfigDict(dict(
      progress_bar=True,  # A tqdm bar over the run's updates.
      log_every_steps=10,  # Print a progress line every this many updates.
  ))
  return c
