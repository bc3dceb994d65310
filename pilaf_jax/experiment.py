"""Everything a loop needs, built once from the config: task, models, reference, sampler, oracle,
update step, evaluator, label store and checkpointer.

Randomness: every stream is a fold_in of the run key (config.seed) with a fixed stream id and the
step or chunk index, so any step can be recomputed alone: this is what makes resume exact.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pilaf_jax import checkpointing, config_validation
from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch
from pilaf_jax.config_validation import ConfigError
from pilaf_jax.evaluation import Evaluator
from pilaf_jax.labelling.label_store import LabelStore
from pilaf_jax.labelling.oracles import make_label_rule
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
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f).get('fingerprint', {})
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
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    json.dump({'config': config.to_dict(), 'fingerprint': config_validation.fingerprint(config)}, f,
              indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)
  with open(os.path.join(workdir, 'versions.json'), 'w') as f:
    json.dump(versions(), f, indent=2)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """check_workdir, then write_workdir (for callers that build no Experiment in between)."""
  os.makedirs(workdir, exist_ok=True)
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
    try:
      label_rule = make_label_rule(c.oracle.name)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    self.label_rule = jax.jit(lambda rewards, index: label_rule(rewards, self._key(ORACLE_STREAM, index)))

    self.tx = make_optimizer(c.dpo.learning_rate, c.dpo.warmup_steps, c.dpo.weight_decay,
                             c.dpo.max_grad_norm)
    self.state_sharding = placement.train_state(self.tx)
    allowed = None if self.allowed is None else jnp.asarray(self.allowed)
    self.train_step = _ShardedStep(
        functools.partial(dpo_step, model=self.model, tx=self.tx, beta=c.beta, allowed_tokens=allowed),
        placement, self.state_sharding)
    # Evaluation decodes with plain sampling (temperature 1, no filters): reward and KL of pi_theta itself.
    eval_ctx = dataclasses.replace(self.sampler_ctx, settings=dataclasses.replace(
        settings, temperature=1.0, top_k=0, top_p=1.0))
    self.evaluator = Evaluator(
        eval_ctx, self.task, lambda i: self.prompts(i, c.eval.batch_size, EVAL),
        jax.random.fold_in(self.run_key, EVAL_STREAM), c.eval.num_prompts // c.eval.batch_size, c.beta,
        placement)
    # Labels are written by process 0 alone; the others receive what it reads.
    self.store = (LabelStore(os.path.join(self.workdir, 'labels.sqlite'), config_validation.fingerprint(c))
                  if is_main_process() else None)
    ck = c.checkpoint
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(self.workdir, 'checkpoints'), max_to_keep=ck.max_to_keep,
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
    directory = c.sft.init_checkpoint or os.path.join(self.workdir, 'reference')
    directory = os.path.abspath(directory)
    target = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          self.placement.abstract_params, self.placement.params)
    if os.path.exists(os.path.join(directory, 'params')):
      try:
        params = ocp.StandardCheckpointer().restore(os.path.join(directory, 'params'), target)
        log(f'Reference policy loaded from {directory}.')
        return params
      except Exception as e:  # pylint: disable=broad-except
        if c.sft.init_checkpoint:
          raise ConfigError(f'sft.init_checkpoint={c.sft.init_checkpoint!r} could not be restored for '
                            f'this model ({type(e).__name__}: {str(e)[:300]}).') from None
        log(f'warning: the cached reference in {directory} is unreadable ({type(e).__name__}); '
            'training it again.')
    elif c.sft.init_checkpoint:
      raise ConfigError(f'sft.init_checkpoint={c.sft.init_checkpoint!r} holds no params/ directory.')
    params = train_reference(self.task, self.model, self.placement, c.sft,
                             lambda stream, i: self._key(stream, i), log)
    checkpointer = ocp.StandardCheckpointer()  # Every process calls save; orbax coordinates.
    checkpointer.save(os.path.join(directory, 'params'), params, force=True)
    checkpointer.wait_until_finished()
    return params

  def initial_policy_params(self, ref_params) -> dict:
    """Where the policy starts: the reference, unless model.checkpoint names another checkpoint."""
    c = self.config
    if (self.task.reference_source == REFERENCE_CHECKPOINT and c.model.reference_checkpoint
        and c.model.reference_checkpoint != c.model.checkpoint):
      return load_params(c.model.checkpoint, self.model.cfg, self.placement.params)
    return ref_params

  # --- labelled data ---
  def prompts(self, index: int, n: int, split: str = TRAIN) -> PromptBatch:
    """Prompt batch `index` of a split (a global array, rows sharded)."""
    return self.placement.to_global(self.task.prompts(split, index, n), self.prompt_sharding)

  def oracle_rewards(self, pairs: PairBatch) -> np.ndarray:
    """r*(x, y) of both responses of every pair, [B, 2], from the task's oracle (host arrays)."""
    responses, mask = np.asarray(pairs.responses), np.asarray(pairs.response_mask)
    return np.stack([self.task.rewards(TRAIN, pairs.prompts, responses[:, i], mask[:, i]) for i in (0, 1)], 1)

  def labelled_batch(self, batch_key: str, index: int, step: int, sampler_name: str, policy_params,
                     ref_params, n: int) -> tuple[PreferenceBatch, bool]:
    """The labelled batch `batch_key`: from the store when it was already paid for, else sampled,
    labelled and committed to the store before it is returned. Returns (batch, was_stored)."""
    sampler, index_array = self.sampler(sampler_name), self.placement.scalar(index)
    stored = self.store.get(batch_key) if self.store is not None else None
    if int(broadcast_from_main(np.int32(stored is not None))):
      if stored is None:  # Not process 0: receive process 0's copy, shaped like a fresh batch.
        abstract = jax.eval_shape(sampler, policy_params, ref_params, self.prompts(index, n), index_array)
        stored = (PreferenceBatch(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract),
                                  np.zeros((n,), bool)), None)
      return self.placement.to_global(broadcast_from_main(stored[0])), True
    # Finish sampling before logging the query: the log-to-commit window stays as short as possible.
    with self.phases.phase('sample'):
      pairs = jax.block_until_ready(sampler(policy_params, ref_params, self.prompts(index, n), index_array))
      host_pairs = to_host(pairs)  # A collective: every process takes part.
    self.phases.count('sample_tokens', int(host_pairs.cost.policy_decode_tokens) +
                      int(host_pairs.cost.ref_decode_tokens))
    with self.phases.phase('label'):
      if self.store is not None:
        self.store.log_query(batch_key, n)
      rewards = self.oracle_rewards(host_pairs)
      a_preferred = np.asarray(self.label_rule(rewards, index_array))
      labelled = PreferenceBatch(pairs, self.placement.to_global(a_preferred))
      if self.store is not None:
        self.store.put(batch_key, step, sampler_name, PreferenceBatch(host_pairs, a_preferred), rewards)
    self.phases.count('label_pairs', n)
    return labelled, False

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

  def close(self) -> None:
    self.checkpointer.close()
    if self.store is not None:
      self.store.close()
