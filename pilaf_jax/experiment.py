"""Everything a loop needs, wired from the config, top to bottom: the models (parts/models.py), the
labelling pipeline (parts/labelling_pipeline.py) and the run's files (parts/run_files.py); and the
operations of one step that cross them. Randomness: streams.py.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import ml_collections

from pilaf_jax.batches import PreferenceBatch
from pilaf_jax.learning.train_state import TrainState
from pilaf_jax.parts.timing import PhaseTimer
from pilaf_jax.parts.labelling_pipeline import LabellingPipeline
from pilaf_jax.parts.models import Models, model_config  # noqa: F401  (model_config: tools/aot.py)
from pilaf_jax.parts.run_files import RunFiles


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  workdir: str
  devices: Optional[list] = None  # Default: every device of every process.

  def __post_init__(self):
    c = self.config
    self.phases = PhaseTimer()
    self.models = Models(c, self.workdir, self.devices)
    for name in (c.sampler.name, c.loop == 'iterative' and c.iterative.first_iteration_sampler):
      if name:
        self.models.sampler(name)  # Validate before any work starts.
    self.labels = LabellingPipeline(c, self.workdir, self.models.task, self.models.placement, self.phases)
    self.files = RunFiles(c, self.workdir)
    self.checkpointer, self.store = self.files.checkpointer, self.labels.store

  def evaluate(self, policy_params, ref_params) -> dict:
    with self.phases.phase('evaluate'):
      return self.models.evaluator(policy_params, ref_params)

  def enqueue_batch(self, batch_key: str, index: int, step: int, sampler_name: str, policy_params,
                    ref_params, n: int) -> bool:
    """Samples batch `batch_key` (prompts and sampler key `index`) into the labelling queue, unless
    the store holds it already (LabellingPipeline.enqueue). Returns True when it sampled."""
    sample = lambda: self.models.sample(sampler_name, policy_params, ref_params, index, n)
    return self.labels.enqueue(batch_key, index, step, sampler_name, sample, self.models.oracle_rewards)

  def resolved_batch(self, batch_key: str, n: int, *, should_stop: Optional[Callable[[], bool]] = None,
                     log: Callable[[str], None] = print) -> Optional[tuple[PreferenceBatch, bool]]:
    """(batch, labelled before), once every query of it is resolved; None on should_stop()."""
    return self.labels.resolved(batch_key, n, should_stop=should_stop, log=log)

  def labelled_batch(self, batch_key: str, index: int, step: int, sampler_name: str, policy_params,
                     ref_params, n: int) -> tuple[PreferenceBatch, bool]:
    """enqueue_batch, then resolved_batch (waiting as long as it takes)."""
    self.enqueue_batch(batch_key, index, step, sampler_name, policy_params, ref_params, n)
    return self.resolved_batch(batch_key, n)

  def train(self, state: TrainState, batch: PreferenceBatch) -> tuple[TrainState, dict]:
    """One DPO step, timed."""
    with self.phases.phase('train'):
      state, metrics = self.models.train(state, batch)
    b, _, r = batch.pairs.responses.shape
    self.phases.count('train_tokens', 2 * b * (batch.pairs.prompts.tokens.shape[1] + r))
    return state, metrics

  def save_checkpoint(self, step: int, run, meta: dict) -> None:
    """The checkpoint of `step`, after bringing the workdir's copy of the label store up to date: a
    checkpoint in the workdir then always has every batch it used in that copy (the store only
    grows), even when this machine is lost."""
    with self.phases.phase('checkpoint'):
      self.labels.sync()
      self.files.save(step, run, meta)

  def close(self) -> None:
    self.files.close()
    self.labels.close()
