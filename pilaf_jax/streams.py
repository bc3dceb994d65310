"""The run's random streams: every key is fold_in(fold_in(key(config.seed), stream), index).

Fixed ids per stream and an index per step or chunk let any step be recomputed alone, which is what
makes resume exact. A module of its own (no imports from the package) so that SFT, the loop and the
labelling worker share the ids without importing one another.
"""
from __future__ import annotations

SFT_STREAM, INIT_STREAM, PROMPT_STREAM, SAMPLE_STREAM, ORACLE_STREAM, EVAL_STREAM, SHUFFLE_STREAM = range(7)


def stream_key(run_key, stream: int, index):
  """The key of `index` in `stream` of the run keyed by run_key (a jax PRNG key)."""
  import jax
  return jax.random.fold_in(jax.random.fold_in(run_key, stream), index)
