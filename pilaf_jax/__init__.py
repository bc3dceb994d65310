"""pilaf_jax: PILAF preference sampling and DPO in JAX/Flax.

The stable library surface (pilaf_jax/api.py), for your own training loop:

  sample_pairs, make_pair_sampler, available_samplers   preference pairs from any registered sampler
  dpo_loss, dpo_batch_loss                              the DPO loss (log-probs / labelled pairs)
  response_logprobs, bradley_terry_labels               teacher-forced log-probs; sampled labels
  PromptBatch, PairBatch, PreferenceBatch, SamplingCost the batches they exchange
  Llama, LlamaConfig, init_params                       the model
  synthetic_problem, SyntheticProblem                   a ready-made task to try them on

These names are loaded on first use, so `import pilaf_jax` stays cheap (no jax import).
"""

# The one place the version lives (setup.py reads it from here). Semantic versioning: see CHANGELOG.md.
__version__ = '0.2.0'

_API = {
    'sample_pairs': 'pilaf_jax.api', 'make_pair_sampler': 'pilaf_jax.api',
    'available_samplers': 'pilaf_jax.api', 'dpo_loss': 'pilaf_jax.api', 'dpo_batch_loss': 'pilaf_jax.api',
    'response_logprobs': 'pilaf_jax.api', 'bradley_terry_labels': 'pilaf_jax.api',
    'synthetic_problem': 'pilaf_jax.api', 'SyntheticProblem': 'pilaf_jax.api',
    'PromptBatch': 'pilaf_jax.batches', 'PairBatch': 'pilaf_jax.batches',
    'PreferenceBatch': 'pilaf_jax.batches', 'SamplingCost': 'pilaf_jax.batches',
    'Llama': 'pilaf_jax.model.llama', 'LlamaConfig': 'pilaf_jax.model.llama',
    'init_params': 'pilaf_jax.model.llama',
}

__all__ = ['__version__', *_API]


def __getattr__(name: str):
  if name in _API:
    import importlib
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # Later lookups skip this function.
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
