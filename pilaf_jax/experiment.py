"""Everything a loop needs, built once from the config: task, models, reference, sampler, oracle,
update step, evaluator, label store and checkpointer.

Randomness: every stream is a fold_in of the run key (config.seed) with a fixed stream id and the
step or chunk index, so any step can be recomputed alone: this is what makes resume exact.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import platform
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pilaf_jax import checkpointing, config_validation, paths
from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch
from pilaf_jax.config_validation import ConfigError
from pilaf_jax.evaluation import Evaluator
from pilaf_jax.labelling.label_store import LabelStore, empty_preference_batch
from pilaf_jax.labelling.queue import LabelQueue, QueueSettingsMismatch, describe_waiting
from pilaf_jax.labelling.worker import FunctionOracle
from pilaf_jax.labelling.store_sync import StoreCopy
from pilaf_jax.learning.dpo import dpo_step
from pilaf_jax.learning.sft import train_reference
from pilaf_jax.learning.train_state import RunState, TrainState, init_train_state, make_optimizer
from pilaf_jax.loops.timing import PhaseTimer
from pilaf_jax.model.checkpoints import load_params
from pilaf_jax.model.llama import Llama, LlamaConfig
from pilaf_jax.parallel.mesh import batch_sharding, check_batch_divisible, make_mesh
from pilaf_jax.parallel.multihost import is_main_process
from pilaf_jax.parallel.placement import Placement, broadcast_from_main, to_host
from pilaf_jax.sampling.decode import DecodeSettings
from pilaf_jax.sampling.samplers import SamplerContext, check_sampler
from pilaf_jax.tasks import REFERENCE_CHECKPOINT, TRAIN, EVAL, make_task

# Stream ids for jax.random.fold_in(run_key, id).
SFT_STREAM, INIT_STREAM, PROMPT_STREAM, SAMPLE_STREAM, ORACLE_STREAM, EVAL_STREAM, SHUFFLE_STREAM = range(7)
PROGRESS_SECONDS = 5.0  # A loop waiting for labels says so at most this often.


def versions() -> dict:
  import flax
  import optax
  return {'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jax.lib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__, 'orbax-checkpoint': ocp.__version__,
          'numpy': np.__version__, 'ml_collections': ml_collections.__version__ if hasattr(
              ml_collections, '__version__') else 'unknown',
          'backend': jax.default_backend(), 'devices': jax.device_count(),
          'processes': jax.process_count()}


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another config, naming the differing fields.

  A field the saved config lacks (added to the code since) matches when it has its default value.
  """
  path = paths.join(workdir, 'config.json')
  if not paths.exists(path):
    return
  saved = json.loads(paths.read_text(path)).get('fingerprint', {})
  from pilaf_jax import default_config
  defaults = config_validation.fingerprint(default_config.get_config())
  current = {k: v for k, v in config_validation.fingerprint(config).items()
             if k in saved or defaults.get(k, object()) != v}
  diff = config_validation.differing_fields(saved, current)
  if diff:
    raise ConfigError(f'The workdir {workdir} holds a run of another config. Use a fresh --workdir, or '
                      'run with the saved config (' + path + '). Differing fields:\n  ' + '\n  '.join(diff))


def write_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """config.json (resolved config and fingerprint) and versions.json, from process 0."""
  if jax.process_index() != 0:
    return
  paths.write_text_atomic(paths.join(workdir, 'config.json'), json.dumps(
      {'config': config.to_dict(), 'fingerprint': config_validation.fingerprint(config)},
      indent=2, sort_keys=True))
  paths.write_text_atomic(paths.join(workdir, 'versions.json'), json.dumps(versions(), indent=2))


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """check_workdir, then write_workdir (for callers that build no Experiment in between)."""
  paths.makedirs(workdir)
  check_workdir(config, workdir)
  write_workdir(config, workdir)


def model_config(cfg) -> LlamaConfig:
  """The architecture fields of config.model (model.checkpoint and friends are not architecture)."""
  try:
    return LlamaConfig.from_config(cfg)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


class _ShardedStep:
  """jax.jit of step(state, batch) with explicit shardings: the state's from the partition rules,
  the batch's rows over the batch axes. Built on first call, once per batch structure."""

  def __init__(self, step, placement: Placement, state_sharding):
    self._step, self._placement, self._state_sharding = step, placement, state_sharding
    self._jitted = {}

  def __call__(self, state, batch):
    structure = jax.tree.structure(batch)
    if structure not in self._jitted:
      batch_sharding = jax.tree.map(self._placement.row_sharding, batch)
      self._jitted[structure] = jax.jit(
          self._step, in_shardings=(self._state_sharding, batch_sharding),
          out_shardings=(self._state_sharding, self._placement.replicated), donate_argnums=0)
    return self._jitted[structure](state, batch)


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  workdir: str
  devices: Optional[list] = None  # Default: every device of every process.

  def __post_init__(self):
    c = self.config
    self.run_key = jax.random.key(c.seed)
    self.phases = PhaseTimer()
    self.model = Llama(model_config(c.model))
    self.ref_model = self.model  # The reference shares the policy's architecture (and vocabulary).
    try:
      self.mesh = make_mesh(c.mesh, self.devices)
      for field in ('dpo.batch_size', 'sft.batch_size', 'eval.batch_size'):
        section, name = field.split('.')
        check_batch_divisible(c[section][name], self.mesh, field)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    self.placement = placement = Placement(self.mesh, self.model.cfg)
    self.task = make_task(c, self.run_key, placement, self.workdir)
    self.allowed = self.task.allowed_tokens
    self.prompt_sharding = PromptBatch(*(batch_sharding(self.mesh, ndim) for ndim in (2, 2, 1)))
    settings = DecodeSettings(max_new_tokens=self.task.response_len, eos_ids=self.task.eos_ids,
                              pad_id=self.task.pad_id, temperature=c.sampler.temperature,
                              top_k=c.sampler.top_k, top_p=c.sampler.top_p)
    self.sampler_ctx = SamplerContext(
        policy=self.model, ref=self.ref_model, settings=settings, beta=c.beta, allowed_tokens=self.allowed,
        vanilla_fraction=c.sampler.vanilla_fraction, best_of_n=c.sampler.best_of_n,
        max_enumerated_responses=c.sampler.max_enumerated_responses)
    self._samplers: dict[str, Callable] = {}
    self.sampler(c.sampler.name)  # Validate before any work starts.
    if c.loop == 'iterative' and c.iterative.first_iteration_sampler:
      self.sampler(c.iterative.first_iteration_sampler)
    try:  # The labelling rule over the oracle's rewards (None when people label).
      self.function_oracle = FunctionOracle.from_config(c)
    except ValueError as e:
      raise ConfigError(str(e)) from None

    self.tx = make_optimizer(c.dpo.learning_rate, c.dpo.warmup_steps, c.dpo.weight_decay,
                             c.dpo.max_grad_norm)
    self.state_sharding = placement.train_state(self.tx)
    allowed = None if self.allowed is None else jnp.asarray(self.allowed)
    self.train_step = _ShardedStep(
        functools.partial(dpo_step, model=self.model, tx=self.tx, beta=c.beta, allowed_tokens=allowed,
                          constrain_rows=placement.constrain_rows),
        placement, self.state_sharding)
    # Evaluation decodes with plain sampling (temperature 1, no filters): reward and KL of pi_theta itself.
    eval_ctx = dataclasses.replace(self.sampler_ctx, settings=dataclasses.replace(
        settings, temperature=1.0, top_k=0, top_p=1.0))
    self.evaluator = Evaluator(
        eval_ctx, self.task, lambda i: self.prompts(i, c.eval.batch_size, EVAL),
        jax.random.fold_in(self.run_key, EVAL_STREAM), c.eval.num_prompts // c.eval.batch_size, c.beta,
        placement)
    # Labels are written by process 0 alone; the others receive what it reads. SQLite needs a local
    # file: the store lives at labelling.store_path (default: in a local workdir, or on this machine's
    # disk for a gs:// workdir) and is copied to <workdir>/labels.sqlite at every checkpoint.
    self.store, self.store_copy, self.store_path = None, None, None
    self.queue, self._fresh, self._asking_step = None, {}, 0  # See enqueue_batch / resolved_batch.
    if is_main_process():
      self.store_path = paths.label_store_path(self.workdir, c.labelling.store_path)
      self.store_copy = StoreCopy(self.store_path, self.workdir)
      self.store_copy.restore(print)  # A VM that resumes another VM's run starts from the copy.
      from pilaf_jax import default_config
      self.store = LabelStore(self.store_path, config_validation.fingerprint(c),
                              defaults=config_validation.fingerprint(default_config.get_config()))
      try:  # The labelling queue lives in the store's file.
        self.queue = LabelQueue(self.store_path, answers_per_query=c.labelling.answers_per_query,
                                allow_ties=c.labelling.allow_ties)
      except QueueSettingsMismatch as e:
        raise ConfigError(str(e)) from None
    # TensorBoard events of a remote workdir are staged locally and mirrored at each checkpoint.
    self._tensorboard_dirs = paths.tensorboard_dirs(self.workdir)
    self._tensorboard_uploaded: dict = {}
    ck = c.checkpoint
    self.checkpointer = checkpointing.Checkpointer(
        paths.join(self.workdir, 'checkpoints'), max_to_keep=ck.max_to_keep,
        every_steps=ck.every_steps, every_seconds=ck.every_seconds, async_save=ck.async_save)

  def evaluate(self, policy_params, ref_params) -> dict:
    with self.phases.phase('evaluate'):
      return self.evaluator(policy_params, ref_params)

  def _key(self, stream: int, index) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(self.run_key, stream), index)

  def sampler(self, name: str) -> Callable:
    """The jitted sampler: fn(policy_params, ref_params, prompts, index) -> PairBatch."""
    if name not in self._samplers:
      try:
        fn = check_sampler(name, self.sampler_ctx)
      except ValueError as e:
        raise ConfigError(str(e)) from None
      ctx, placement = self.sampler_ctx, self.placement

      def sample(policy_params, ref_params, prompts, index):
        pairs = fn(ctx, policy_params, ref_params, prompts, self._key(SAMPLE_STREAM, index))
        return placement.constrain_rows(pairs)
      self._samplers[name] = jax.jit(sample, in_shardings=(
          placement.params, placement.params, self.prompt_sharding, placement.replicated))
    return self._samplers[name]

  # --- the reference policy ---
  def reference_params(self, log: Callable[[str], None] = print) -> dict:
    """The reference: loaded from a pretrained checkpoint (model.reference_checkpoint, else
    model.checkpoint), or, for tasks that fine-tune it here, from sft.init_checkpoint or the
    workdir's cache, else trained."""
    c = self.config
    if self.task.reference_source == REFERENCE_CHECKPOINT:
      field = 'model.reference_checkpoint' if c.model.reference_checkpoint else 'model.checkpoint'
      spec = c.model[field.split('.')[1]]
      start = time.time()
      params = load_params(spec, self.model.cfg, self.placement.params, field)
      log(f'Reference policy loaded from {spec} in {time.time() - start:.1f} s.')
      return params
    directory = paths.as_path(c.sft.init_checkpoint or paths.join(self.workdir, 'reference'))
    target = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          self.placement.abstract_params, self.placement.params)
    cached = directory / 'params'
    if paths.exists(cached):
      params = self._restore_reference(cached, target, log)
      if params is not None:
        log(f'Reference policy loaded from {directory}.')
        return params
    elif c.sft.init_checkpoint:
      raise ConfigError(f'sft.init_checkpoint={c.sft.init_checkpoint!r} holds no params/ directory.')
    params = train_reference(self.task, self.model, self.placement, c.sft,
                             lambda stream, i: self._key(stream, i), log)
    checkpointer = ocp.StandardCheckpointer()  # Every process calls save; orbax coordinates.
    checkpointer.save(directory / 'params', params, force=True)
    checkpointer.wait_until_finished()
    return params

  def _restore_reference(self, cached, target, log) -> Optional[dict]:
    """The reference at `cached` (retrying transient errors); None when the workdir's own cache is
    unreadable: it is then set aside (renamed, not deleted) and the caller trains it again. Raises
    RestoreError / ConfigError otherwise. Every process takes the same path."""
    given = self.config.sft.init_checkpoint
    outcome, params, error = 0, None, None  # 0 restored, 1 unreadable, 2 fatal.
    try:
      params = checkpointing.with_retries(lambda: ocp.StandardCheckpointer().restore(cached, target),
                                          f'restoring the reference {cached}', log=log)
    except checkpointing.RestoreError as e:
      outcome, error = 2, e
    except Exception as e:  # pylint: disable=broad-except
      if checkpointing.is_structure_mismatch(e):
        outcome, error = 2, checkpointing.mismatch_error(
            str(cached), e, lambda: ocp.StandardCheckpointer().metadata(cached).item_metadata.tree, target)
      elif given:
        outcome, error = 2, ConfigError(f'sft.init_checkpoint={given!r} could not be restored for this '
                                        f'model ({type(e).__name__}: {str(e)[:300]}).')
      else:
        outcome, error = 1, e
    worst = checkpointing.worst_outcome(outcome)
    if worst == 0:
      return params
    if worst == 2:
      if error is None or outcome != 2:
        error = checkpointing.RestoreError(f'restoring the reference {cached} failed on another process '
                                           '(see its log); nothing was changed.')
      raise error
    reason = type(error).__name__ if error is not None else 'on another process'
    log(f'warning: the cached reference in {cached} is unreadable ({reason}); setting it aside and '
        'training it again.')
    if jax.process_index() == 0:
      checkpointing.set_aside(str(cached), log)
    checkpointing.worst_outcome(0)  # Every process waits until it is set aside.
    return None

  def initial_policy_params(self, ref_params) -> dict:
    """Where the policy starts: the reference, unless model.checkpoint names another checkpoint."""
    c = self.config
    if (self.task.reference_source == REFERENCE_CHECKPOINT and c.model.reference_checkpoint
        and c.model.reference_checkpoint != c.model.checkpoint):
      return load_params(c.model.checkpoint, self.model.cfg, self.placement.params)
    if hasattr(self.task, 'initial_policy'):  # A task may start the policy away from the reference.
      return self.task.initial_policy(self.model, ref_params, self.placement)
    return ref_params

  # --- labelled data ---
  def prompts(self, index: int, n: int, split: str = TRAIN) -> PromptBatch:
    """Prompt batch `index` of a split (a global array, rows sharded)."""
    return self.placement.to_global(self.task.prompts(split, index, n), self.prompt_sharding)

  def oracle_rewards(self, pairs: PairBatch) -> np.ndarray:
    """r*(x, y) of both responses of every pair, [B, 2], from the task's oracle (host arrays)."""
    responses, mask = np.asarray(pairs.responses), np.asarray(pairs.response_mask)
    return np.stack([self.task.rewards(TRAIN, pairs.prompts, responses[:, i], mask[:, i]) for i in (0, 1)], 1)

  def _queries(self, pairs: PairBatch, rewards: Optional[np.ndarray]) -> list[dict]:
    """A sampled batch's queries for the labelling queue: texts, sources, the oracle's rewards."""
    ids, source = np.asarray(pairs.prompts.ids), np.asarray(pairs.source)
    responses, mask = np.asarray(pairs.responses), np.asarray(pairs.response_mask)
    many = getattr(self.task, 'describe_many', None)  # Optional: one call for the whole batch.
    texts = many(TRAIN, ids) if many else [self.task.describe(TRAIN, int(i)) for i in ids]
    return [dict(row=i, prompt_id=int(ids[i]), prompt_text=texts[i],
                 response_a_text=self.task.render_response(responses[i, 0], mask[i, 0]),
                 response_b_text=self.task.render_response(responses[i, 1], mask[i, 1]),
                 source_a=int(source[i, 0]), source_b=int(source[i, 1]),
                 oracle_reward_a=None if rewards is None else float(rewards[i, 0]),
                 oracle_reward_b=None if rewards is None else float(rewards[i, 1]))
            for i in range(len(ids))]

  def enqueue_batch(self, batch_key: str, index: int, step: int, sampler_name: str, policy_params,
                    ref_params, n: int) -> bool:
    """Samples batch `batch_key` (prompts and sampler key `index`) and enqueues its queries, unless the
    store holds it already: labelled, or pending from before a restart (then nothing is sampled
    again and its queries keep their answers). The pairs and their queries are committed in one
    transaction before any oracle sees them. Returns True when it sampled."""
    self._asking_step = step
    known = self.store is not None and self.store.status(batch_key) != 'absent'
    if int(broadcast_from_main(np.int32(known))):
      return False
    sampler, index_array = self.sampler(sampler_name), self.placement.scalar(index)
    with self.phases.phase('sample'):
      pairs = jax.block_until_ready(sampler(policy_params, ref_params, self.prompts(index, n), index_array))
      host_pairs = to_host(pairs)  # A collective: every process takes part.
    self.phases.count('sample_tokens', int(host_pairs.cost.policy_decode_tokens) +
                      int(host_pairs.cost.ref_decode_tokens))
    with self.phases.phase('label'):
      rewards = self.oracle_rewards(host_pairs)  # On every process: a text oracle is a sharded model.
      if self.store is not None:
        self.store.put_pending(self.queue, batch_key, step, sampler_name, host_pairs, rewards,
                               self._queries(host_pairs, rewards), oracle_index=index)
    self._fresh[batch_key] = pairs
    return True

  def resolved_batch(self, batch_key: str, n: int, *, should_stop: Optional[Callable[[], bool]] = None,
                     log: Callable[[str], None] = print) -> Optional[tuple[PreferenceBatch, bool]]:
    """The labelled batch `batch_key` (enqueued before), once every query of it is resolved; it is
    committed to the store before it is returned. Returns (batch, was_stored: labelled before this
    call), or None when should_stop() (SIGTERM) turned true while waiting.

    Function-oracle queries are answered here when labelling.worker='inline'; otherwise this polls
    the queue (every labelling.poll_seconds) for the worker's or people's answers, printing progress
    at most every PROGRESS_SECONDS. Other processes of a multi-host run wait in the broadcast.
    """
    code, labels = 0, None  # 0: stopped; 1: labelled before this call; 2: resolved now.
    if self.store is not None:
      if self.store.status(batch_key) == 'labelled':
        code = 1
      else:
        with self.phases.phase('label'):
          labels = self._wait_for_labels(batch_key, should_stop, log)
          if labels is not None:
            self.store.commit_resolved(batch_key, labels)
            code = 2
    code = int(broadcast_from_main(np.int32(code)))
    if code == 0:
      return None
    fresh = self._fresh.pop(batch_key, None)
    if code == 2:
      self.phases.count('label_pairs', n)
    if code == 2 and fresh is not None:  # Sampled by this process: only the labels travel.
      labels = broadcast_from_main(np.zeros((n,), bool) if labels is None else labels)
      return PreferenceBatch(fresh, self.placement.to_global(np.asarray(labels, bool))), False
    # Labelled before, or sampled before a restart: process 0 reads it back, every process receives it.
    stored = (self.store.get(batch_key)[0] if self.store is not None else
              empty_preference_batch(n, self.task.prompt_len, self.task.response_len))
    return self.placement.to_global(broadcast_from_main(stored)), code == 1

  def _wait_for_labels(self, batch_key: str, should_stop, log) -> Optional[np.ndarray]:
    """Process 0: the batch's labels once resolved (answering inline when that is the set-up)."""
    lab = self.config.labelling
    inline = self.function_oracle is not None and lab.worker == 'inline'
    start = time.monotonic()
    next_report, recorded = start + PROGRESS_SECONDS, False
    while True:
      if inline:
        self.function_oracle.answer_batch(self.queue, batch_key)
      labels = self.queue.resolved_labels(batch_key)
      if labels is not None:
        return labels
      if not recorded:  # The web server shows where the loop waits.
        self.queue.set_loop_step(self._asking_step)
        recorded = True
      if should_stop is not None and should_stop():
        return None
      now = time.monotonic()
      if now >= next_report:
        done, total = self.queue.batch_progress(batch_key)
        queue = self.queue.progress()
        who = ('people answer through the labelling web server' if self.function_oracle is None else
               f'is `python -m pilaf_jax.labelling.worker --workdir={self.workdir}` running?')
        line = (f'Waiting for labels of {batch_key}: {done}/{total} resolved after {now - start:.0f} s; '
                f'queue: {queue["pending"]} open, {queue["answered"]} resolved ({who}).')
        if self.function_oracle is None:  # Say which queries, and who may still answer them.
          line += ' Open: ' + describe_waiting(self.queue.waiting(batch_key, limit=total)) + '.'
        log(line)
        next_report = now + PROGRESS_SECONDS
      time.sleep(lab.poll_seconds)

  def labelled_batch(self, batch_key: str, index: int, step: int, sampler_name: str, policy_params,
                     ref_params, n: int) -> tuple[PreferenceBatch, bool]:
    """The labelled batch `batch_key`: enqueue_batch, then resolved_batch (waiting as long as it
    takes). Returns (batch, was_stored)."""
    self.enqueue_batch(batch_key, index, step, sampler_name, policy_params, ref_params, n)
    return self.resolved_batch(batch_key, n)

  def train(self, state: TrainState, batch: PreferenceBatch) -> tuple[TrainState, dict]:
    """One DPO step, timed (and waited for: see loops/timing.py)."""
    with self.phases.phase('train'):
      state, metrics = jax.block_until_ready(self.train_step(state, batch))
    b, _, r = batch.pairs.responses.shape
    self.phases.count('train_tokens', 2 * b * (batch.pairs.prompts.tokens.shape[1] + r))
    return state, metrics

  def init_policy_state(self, policy_params) -> TrainState:
    """A fresh train state (copies of the params, zero optimiser moments)."""
    return jax.jit(lambda p: init_train_state(p, self.tx), in_shardings=(self.placement.params,),
                   out_shardings=self.state_sharding)(policy_params)

  def init_run_state(self, ref_params) -> RunState:
    """The loop's state before any update, every leaf a global array (checkpointable on any host)."""
    run = RunState.create(self.init_policy_state(self.initial_policy_params(ref_params)))
    return run.replace(labels_used=self.placement.to_global(jax.device_get(run.labels_used), None))

  def save_checkpoint(self, step: int, run, meta: dict) -> None:
    """Starts the checkpoint of `step` (asynchronously when enabled), after bringing the workdir's
    copy of the label store up to date: a checkpoint that exists in the workdir then always has every
    batch it used in that copy (the store only grows), even when this machine is lost. TensorBoard
    events of a remote workdir are mirrored too."""
    if self.store_copy is not None:
      self.store_copy.upload()
    self.checkpointer.save(step, run, meta)
    self._mirror_tensorboard()

  def _mirror_tensorboard(self) -> None:
    local, remote = self._tensorboard_dirs
    if remote is not None and jax.process_index() == 0:
      paths.mirror_dir(local, remote, self._tensorboard_uploaded)

  def close(self) -> None:
    self.checkpointer.close()
    if self.store_copy is not None:
      self.store_copy.upload()  # The finished (or interrupted) run's labels, in the workdir.
      self.store_copy.close()
    if self.queue is not None:
      self.queue.close()
    if self.store is not None:
      self.store.close()
