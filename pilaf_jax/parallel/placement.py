"""Where each piece of a run lives on the mesh, and moving host data on and off it.

One Placement per run: parameter and train-state shardings from the partition rules, batch rows over
('data', 'fsdp'), scalars replicated. Host data that every process holds identically (prompts'
random keys, stored labels) becomes a global array with `to_global`; results come back with
`to_host`, a collective that every process calls.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pilaf_jax.learning.train_state import TrainState
from pilaf_jax.model.llama import LlamaConfig, init_params
from pilaf_jax.parallel.mesh import batch_sharding, num_batch_shards, replicated
from pilaf_jax.parallel.multihost import global_to_host
from pilaf_jax.parallel.partitioning import optimizer_state_shardings, param_shardings


@dataclasses.dataclass
class Placement:
  mesh: Mesh
  model_cfg: LlamaConfig

  def __post_init__(self):
    self.abstract_params = jax.eval_shape(functools.partial(init_params, self.model_cfg), jax.random.key(0))
    self.params = param_shardings(self.abstract_params, self.mesh)
    self.replicated = replicated(self.mesh)

  def train_state(self, tx) -> TrainState:
    """Shardings of a TrainState: optimiser moments follow their parameter."""
    opt = optimizer_state_shardings(jax.eval_shape(tx.init, self.abstract_params), self.params,
                                    self.abstract_params)
    return TrainState(step=self.replicated, params=self.params, opt_state=opt)

  def row_sharding(self, x) -> NamedSharding:
    """Rows over the batch axes when they divide evenly; replicated otherwise (and for scalars)."""
    if np.ndim(x) and np.shape(x)[0] % num_batch_shards(self.mesh) == 0:
      return batch_sharding(self.mesh, np.ndim(x))
    return self.replicated

  def constrain_rows(self, tree: Any) -> Any:
    """Inside jit: pins every leaf of a batch pytree to its row sharding."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.row_sharding(x)), tree)

  def constrain_replicated(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.replicated), tree)

  def to_global(self, tree: Any, shardings: Any = None) -> Any:
    """Host arrays (identical on every process) -> global arrays; rows sharded unless given."""
    def one(x, sharding=None):
      x = np.asarray(x)
      sharding = sharding or self.row_sharding(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    if shardings is None:
      return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings)

  def scalar(self, value: int) -> jax.Array:
    """A replicated int32 scalar (a step or chunk index fed to jitted code)."""
    return self.to_global(np.int32(value), self.replicated)


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly sharded) global arrays on every process; a collective."""
  return global_to_host(tree)


def broadcast_from_main(tree: Any) -> Any:
  """Process 0's numpy values on every process (identity with one process)."""
  if jax.process_count() == 1:
    return tree
  return multihost_utils.broadcast_one_to_all(tree)
