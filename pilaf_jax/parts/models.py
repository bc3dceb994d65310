"""The run's models: architecture, mesh and placement, task, jitted samplers, the sharded DPO step,
the evaluator, and the params they start from."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch
from pilaf_jax.errors import ConfigError
from pilaf_jax.evaluation import Evaluator
from pilaf_jax.learning import reference
from pilaf_jax.learning.dpo import dpo_step
from pilaf_jax.learning.train_state import RunState, TrainState, init_train_state, make_optimizer
from pilaf_jax.model.llama import Llama, LlamaConfig
from pilaf_jax.parallel.mesh import batch_sharding, check_batch_divisible, make_mesh
from pilaf_jax.parallel.placement import Placement
from pilaf_jax.sampling.decode import DecodeSettings
from pilaf_jax.sampling.samplers import SamplerContext, build_sampler
from pilaf_jax.streams import EVAL_STREAM, SAMPLE_STREAM, stream_key
from pilaf_jax.tasks import EVAL, TRAIN, make_task


def model_config(cfg) -> LlamaConfig:
  """The architecture fields of config.model (model.checkpoint and friends are not architecture)."""
  try:
    return LlamaConfig.from_config(cfg)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None


class ShardedStep:
  """jax.jit of step(state, batch) with explicit shardings: the state's from the partition rules,
  the batch's rows over the batch axes. Built on first call, once per batch structure."""

  def __init__(self, step, placement: Placement, state_sharding):
    self._step, self._placement, self._state_sharding = step, placement, state_sharding
    self._jitted = {}

  def __call__(self, state, batch):
    structure = jax.tree.structure(batch)
    if structure not in self._jitted:
      rows = jax.tree.map(self._placement.row_sharding, batch)
      self._jitted[structure] = jax.jit(
          self._step, in_shardings=(self._state_sharding, rows),
          out_shardings=(self._state_sharding, self._placement.replicated), donate_argnums=0)
    return self._jitted[structure](state, batch)


class Models:
  """Policy and reference (one architecture, one vocabulary) on the mesh, with what runs them."""

  def __init__(self, config, workdir: str, devices=None):
    c = self.config = config
    self.workdir, self.run_key = workdir, jax.random.key(c.seed)
    self.model = Llama(model_config(c.model))
    try:
      self.mesh = make_mesh(c.mesh, devices)
      for field in ('dpo.batch_size', 'sft.batch_size', 'eval.batch_size'):
        check_batch_divisible(c[field.split('.')[0]][field.split('.')[1]], self.mesh, field)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    self.placement = placement = Placement(self.mesh, self.model.cfg)
    self.task = make_task(c, self.run_key, placement, workdir)
    self.prompt_sharding = PromptBatch(*(batch_sharding(self.mesh, ndim) for ndim in (2, 2, 1)))
    settings = DecodeSettings.from_sampler_config(c.sampler, max_new_tokens=self.task.response_len,
                                                  eos_ids=self.task.eos_ids, pad_id=self.task.pad_id)
    self.sampler_ctx = SamplerContext(
        policy=self.model, ref=self.model, settings=settings, beta=c.beta,
        allowed_tokens=self.task.allowed_tokens, vanilla_fraction=c.sampler.vanilla_fraction,
        best_of_n=c.sampler.best_of_n, max_enumerated_responses=c.sampler.max_enumerated_responses)
    self._samplers: dict[str, Callable] = {}
    self.tx = make_optimizer(c.dpo.learning_rate, c.dpo.warmup_steps, c.dpo.weight_decay,
                             c.dpo.max_grad_norm)
    self.state_sharding = placement.train_state(self.tx)
    allowed = None if self.task.allowed_tokens is None else jnp.asarray(self.task.allowed_tokens)
    self.train_step = ShardedStep(
        functools.partial(dpo_step, model=self.model, tx=self.tx, beta=c.beta, allowed_tokens=allowed,
                          constrain_rows=placement.constrain_rows), placement, self.state_sharding)
    # Evaluation decodes with plain sampling (temperature 1, no filters): reward and KL of pi_theta itself.
    eval_ctx = dataclasses.replace(self.sampler_ctx, settings=dataclasses.replace(
        settings, temperature=1.0, top_k=0, top_p=1.0))
    self.evaluator = Evaluator(
        eval_ctx, self.task, lambda i: self.prompts(i, c.eval.batch_size, EVAL),
        jax.random.fold_in(self.run_key, EVAL_STREAM), c.eval.num_prompts // c.eval.batch_size, c.beta,
        placement, show_responses=c.eval.get('show_responses', 0))

  def key(self, stream: int, index) -> jax.Array:
    """The run's key of `index` in `stream` (streams.py)."""
    return stream_key(self.run_key, stream, index)

  def sampler(self, name: str) -> Callable:
    """The jitted sampler: fn(policy_params, ref_params, prompts, index) -> PairBatch."""
    if name not in self._samplers:
      try:
        fn = build_sampler(name, self.sampler_ctx)
      except ValueError as e:
        raise ConfigError(str(e)) from None
      ctx, placement = self.sampler_ctx, self.placement

      def sample(policy_params, ref_params, prompts, index):
        return placement.constrain_rows(fn(ctx, policy_params, ref_params, prompts, self.key(SAMPLE_STREAM, index)))
      self._samplers[name] = jax.jit(sample, in_shardings=(
          placement.params, placement.params, self.prompt_sharding, placement.replicated))
    return self._samplers[name]

  def prompts(self, index: int, n: int, split: str = TRAIN) -> PromptBatch:
    """Prompt batch `index` of a split (a global array, rows sharded)."""
    return self.placement.to_global(self.task.prompts(split, index, n), self.prompt_sharding)

  def sample(self, sampler_name: str, policy_params, ref_params, index: int, n: int) -> PairBatch:
    """Pairs for prompt batch `index` (sampler key `index`), waited for."""
    prompts, index_array = self.prompts(index, n), self.placement.scalar(index)
    return jax.block_until_ready(self.sampler(sampler_name)(policy_params, ref_params, prompts, index_array))

  def oracle_rewards(self, pairs: PairBatch) -> np.ndarray:
    """r*(x, y) of both responses of every pair, [B, 2], from the task's oracle (host arrays)."""
    responses, mask = np.asarray(pairs.responses), np.asarray(pairs.response_mask)
    return np.stack([self.task.rewards(TRAIN, pairs.prompts, responses[:, i], mask[:, i]) for i in (0, 1)], 1)

  def train(self, state: TrainState, batch: PreferenceBatch) -> tuple[TrainState, dict]:
    """One DPO step, waited for (see parts/timing.py)."""
    return jax.block_until_ready(self.train_step(state, batch))

  def reference_params(self, log: Callable[[str], None] = print) -> dict:
    return reference.reference_params(self.config, self.task, self.model, self.placement, self.workdir,
                                      self.key, log)

  def initial_policy_params(self, ref_params) -> dict:
    return reference.initial_policy_params(self.config, self.task, self.model, self.placement, ref_params)

  def init_policy_state(self, policy_params) -> TrainState:
    """A fresh train state (copies of the params, zero optimiser moments)."""
    return jax.jit(lambda p: init_train_state(p, self.tx), in_shardings=(self.placement.params,),
                   out_shardings=self.state_sharding)(policy_params)

  def init_run_state(self, ref_params) -> RunState:
    """The loop's state before any update, every leaf a global array (checkpointable on any host)."""
    run = RunState.create(self.init_policy_state(self.initial_policy_params(ref_params)))
    return run.replace(labels_used=self.placement.to_global(jax.device_get(run.labels_used), None))
