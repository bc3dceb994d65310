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
from pilaf_jax.batches import PreferenceBatch, PromptBatch
from pilaf_jax.config_validation import ConfigError
from pilaf_jax.evaluation import Evaluator
from pilaf_jax.labelling.label_store import LabelStore
from pilaf_jax.labelling.oracles import make_oracle
from pilaf_jax.learning.dpo import dpo_step
from pilaf_jax.learning.sft import sft_step
from pilaf_jax.learning.train_state import TrainState, init_train_state, make_optimizer
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params
from pilaf_jax.sampling.decode import DecodeSettings
from pilaf_jax.sampling.samplers import SamplerContext, make_sampler
from pilaf_jax.tasks import EOS, PAD, make_task, oracle_reward, sample_behaviour, sample_prompts

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


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another config; writes config.json and versions.json."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  current = config_validation.fingerprint(config)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f).get('fingerprint', {})
    diff = config_validation.differing_fields(saved, current)
    if diff:
      raise ConfigError(f'The workdir {workdir} holds a run of another config. Use a fresh --workdir, or '
                        'run with the saved config (' + path + '). Differing fields:\n  ' + '\n  '.join(diff))
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump({'config': config.to_dict(), 'fingerprint': current}, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)
    with open(os.path.join(workdir, 'versions.json'), 'w') as f:
      json.dump(versions(), f, indent=2)


def model_config(cfg) -> LlamaConfig:
  try:
    return LlamaConfig.from_config(cfg)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  workdir: str

  def __post_init__(self):
    c = self.config
    self.run_key = jax.random.key(c.seed)
    self.world = make_task(c.task)
    self.allowed = np.asarray(self.world.allowed_response_tokens)
    self.model = Llama(model_config(c.model))
    self.ref_model = self.model  # The reference is the SFT model: same architecture.
    self.reward_fn = functools.partial(oracle_reward, self.world)
    settings = DecodeSettings(max_new_tokens=c.task.response_len, eos_id=EOS, pad_id=PAD,
                              temperature=c.sampler.temperature, top_k=c.sampler.top_k,
                              top_p=c.sampler.top_p)
    self.sampler_ctx = SamplerContext(
        policy=self.model, ref=self.ref_model, settings=settings, beta=c.beta, allowed_tokens=self.allowed,
        vanilla_fraction=c.sampler.vanilla_fraction, best_of_n=c.sampler.best_of_n,
        max_enumerated_responses=c.sampler.max_enumerated_responses)
    self._samplers: dict[str, Callable] = {}
    self.sampler(c.sampler.name)  # Validate before any work starts.
    self.oracle = make_oracle(c.oracle.name, self.reward_fn)
    self.tx = make_optimizer(c.dpo.learning_rate, c.dpo.warmup_steps, c.dpo.weight_decay,
                             c.dpo.max_grad_norm)
    self.train_step = jax.jit(functools.partial(dpo_step, model=self.model, tx=self.tx, beta=c.beta,
                                                allowed_tokens=jnp.asarray(self.allowed)),
                              donate_argnums=0)
    eval_prompts, _ = sample_prompts(self.world, self._key(EVAL_STREAM, 0), c.eval.num_prompts)
    # Evaluation decodes with plain sampling (temperature 1, no filters): reward and KL of pi_theta itself.
    eval_ctx = dataclasses.replace(self.sampler_ctx, settings=dataclasses.replace(
        settings, temperature=1.0, top_k=0, top_p=1.0))
    self.evaluate = Evaluator(eval_ctx, eval_prompts, self.reward_fn, self._key(EVAL_STREAM, 1),
                              c.eval.batch_size, c.beta)
    self.store = LabelStore(os.path.join(self.workdir, 'labels.sqlite'),
                            config_validation.fingerprint(c))
    ck = c.checkpoint
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(self.workdir, 'checkpoints'), max_to_keep=ck.max_to_keep,
        every_steps=ck.every_steps, every_seconds=ck.every_seconds, async_save=ck.async_save)

  def _key(self, stream: int, index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(self.run_key, stream), index)

  def sampler(self, name: str) -> Callable:
    if name not in self._samplers:
      try:
        self._samplers[name] = make_sampler(name, self.sampler_ctx)
      except ValueError as e:
        raise ConfigError(str(e)) from None
    return self._samplers[name]

  # --- the reference policy ---
  def reference_params(self, log: Callable[[str], None] = print) -> dict:
    """The SFT reference: loaded from sft.init_checkpoint or the workdir's cache, else trained."""
    c = self.config
    directory = c.sft.init_checkpoint or os.path.join(self.workdir, 'reference')
    directory = os.path.abspath(directory)
    target = jax.eval_shape(functools.partial(init_params, self.model.cfg), self._key(INIT_STREAM, 0))
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
    params = self.train_reference(log)
    checkpointer = ocp.StandardCheckpointer()  # Every process calls save; orbax coordinates.
    checkpointer.save(os.path.join(directory, 'params'), params, force=True)
    checkpointer.wait_until_finished()
    return params

  def train_reference(self, log: Callable[[str], None] = print) -> dict:
    c = self.config.sft
    tx = make_optimizer(c.learning_rate, c.warmup_steps, c.weight_decay)
    state = init_train_state(init_params(self.model.cfg, self._key(INIT_STREAM, 0)), tx)
    step = jax.jit(functools.partial(sft_step, model=self.model, tx=tx,
                                     allowed_tokens=jnp.asarray(self.allowed)), donate_argnums=0)

    @jax.jit
    def behaviour_batch(rng):
      k_prompt, k_resp = jax.random.split(rng)
      prompts, topics = sample_prompts(self.world, k_prompt, c.batch_size)
      return (prompts,) + sample_behaviour(self.world, k_resp, prompts, topics)

    start, losses = time.time(), []
    for i in range(c.steps):
      state, metrics = step(state, *behaviour_batch(self._key(SFT_STREAM, i)))
      losses.append(metrics['sft_loss'])
    losses = jax.device_get(losses)
    log(f'Reference policy: SFT on behaviour responses, {c.steps} steps in {time.time() - start:.1f} s, '
        f'loss {float(np.mean(losses[:10])):.3f} -> {float(np.mean(losses[-10:])):.3f}.')
    return state.params

  # --- labelled data ---
  def prompts(self, index: int, n: int) -> PromptBatch:
    return sample_prompts(self.world, self._key(PROMPT_STREAM, index), n)[0]

  def labelled_batch(self, batch_key: str, index: int, step: int, sampler_name: str, policy_params,
                     ref_params, n: int) -> tuple[PreferenceBatch, bool]:
    """The labelled batch `batch_key`: from the store when it was already paid for, else sampled,
    labelled and committed to the store before it is returned. Returns (batch, was_stored)."""
    stored = self.store.get(batch_key)
    if stored is not None:
      return jax.tree.map(jnp.asarray, stored[0]), True
    pairs = self.sampler(sampler_name)(policy_params, ref_params, self.prompts(index, n),
                                       self._key(SAMPLE_STREAM, index))
    self.store.log_query(batch_key, n)
    a_preferred, rewards = self.oracle(pairs, self._key(ORACLE_STREAM, index))
    labelled = PreferenceBatch(pairs, a_preferred)
    self.store.put(batch_key, step, sampler_name, labelled, jax.device_get(rewards))
    return labelled, False

  def init_policy_state(self, ref_params) -> TrainState:
    """The policy starts as a copy of the reference."""
    return init_train_state(jax.tree.map(jnp.copy, ref_params), self.tx)

  def close(self) -> None:
    self.checkpointer.close()
    self.store.close()
