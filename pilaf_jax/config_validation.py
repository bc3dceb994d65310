"""Checks a resolved config before any work starts, with messages that say what to change."""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from pilaf_jax import config_aliases
from pilaf_jax.errors import ConfigError, one_line, require  # noqa: F401  (one_line: for callers)

LOOPS = ('online', 'iterative')
ROPE_SCALINGS = ('', 'llama3')
ORACLE_REWARDS = ('task', 'reward_model', 'judge', 'text_rule', 'human')
LABELLING_WORKERS = ('inline', 'external')
# Fields that change how a run is executed or shown, not what it computes: they may differ when a
# run is resumed. Everything else must match the workdir's saved config.
EXECUTION_FIELDS = ('runtime', 'checkpoint', 'mesh', 'distributed')
# Single fields of that kind in sections that otherwise determine the run: where the label store lives
# differs between machines (a gs:// workdir resumed on another VM); who answers function-oracle queries
# and how often the queue is polled do not change any label.
EXECUTION_FIELD_NAMES = ('labelling.store_path', 'labelling.worker', 'labelling.poll_seconds')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field and what is allowed."""
  from pilaf_jax.labelling.oracles import LABEL_RULES  # Registries fill on import.
  from pilaf_jax.sampling.samplers import SAMPLERS
  from pilaf_jax.tasks import TASK_CHECKS, TASKS

  c = config_aliases.resolve(config)
  require(c.loop in LOOPS, f'loop={c.loop!r} is unknown; allowed: {list(LOOPS)}.')
  require(c.beta > 0, f'beta={c.beta} must be > 0 (the paper uses 0.1).')
  require(c.task.name in TASKS, f'task.name={c.task.name!r} is unknown; allowed: {sorted(TASKS)}.')
  require(c.sampler.name in SAMPLERS,
          f'sampler.name={c.sampler.name!r} is unknown; allowed: {sorted(SAMPLERS)}.')
  first = c.iterative.first_iteration_sampler
  require(first == '' or first in SAMPLERS, f'iterative.first_iteration_sampler={first!r} is unknown; '
          f"allowed: '' (use sampler.name) or one of {sorted(SAMPLERS)}.")
  require(c.oracle.label_rule in LABEL_RULES,
          f'oracle.label_rule={c.oracle.label_rule!r} is unknown; allowed: {sorted(LABEL_RULES)}.')
  require(c.sampler.best_of_n >= 2, f'sampler.best_of_n={c.sampler.best_of_n} must be >= 2.')
  require(0.0 <= c.sampler.vanilla_fraction <= 1.0,
          f'sampler.vanilla_fraction={c.sampler.vanilla_fraction} must lie in [0, 1].')
  require(c.sampler.temperature > 0, f'sampler.temperature={c.sampler.temperature} must be > 0.')
  require(c.sampler.top_k >= 0, f'sampler.top_k={c.sampler.top_k} must be >= 0 (0 = off).')
  require(0.0 < c.sampler.top_p <= 1.0, f'sampler.top_p={c.sampler.top_p} must lie in (0, 1].')
  require(c.task.prompt_len >= 2, f'task.prompt_len={c.task.prompt_len} must be >= 2 (BOS + a token).')
  require(c.task.response_len >= 1, f'task.response_len={c.task.response_len} must be >= 1.')
  require(c.model.rope_scaling in ROPE_SCALINGS,
          f'model.rope_scaling={c.model.rope_scaling!r} is unknown; allowed: {list(ROPE_SCALINGS)}.')
  require(c.oracle.reward in ORACLE_REWARDS,
          f'oracle.reward={c.oracle.reward!r} is unknown; allowed: {list(ORACLE_REWARDS)}.')
  TASK_CHECKS[c.task.name](c)  # The task's own section (tasks/synthetic.py, tasks/chat_config.py).
  for name in ('dpo.batch_size', 'sft.batch_size', 'sft.steps', 'eval.batch_size', 'eval.num_prompts',
               'eval.every_steps', 'online.steps', 'iterative.iterations',
               'iterative.prompts_per_iteration', 'iterative.epochs', 'checkpoint.every_steps',
               'checkpoint.max_to_keep'):
    section, field = name.split('.')
    value = c[section][field]
    require(isinstance(value, int) and value >= 1, f'{name}={value!r} must be an integer >= 1.')
  require(c.eval.num_prompts % c.eval.batch_size == 0,
          f'eval.num_prompts={c.eval.num_prompts} must be divisible by eval.batch_size='
          f'{c.eval.batch_size}.')
  require(c.iterative.prompts_per_iteration % c.dpo.batch_size == 0,
          f'iterative.prompts_per_iteration={c.iterative.prompts_per_iteration} must be divisible by '
          f'dpo.batch_size={c.dpo.batch_size}.')
  require(c.dpo.learning_rate > 0, f'dpo.learning_rate={c.dpo.learning_rate} must be > 0.')
  _validate_labelling(c)
  store = c.labelling.store_path
  require(isinstance(store, str) and '://' not in store,
          f'labelling.store_path={store!r} must be a local file path (SQLite needs a POSIX file; a copy '
          "goes to the workdir at every checkpoint), or '' for the default.")
  require(not store or not store.endswith(('/', '\\')),
          f'labelling.store_path={store!r} names a directory; name the file, e.g. {store}labels.sqlite.')


def _validate_labelling(c: ml_collections.ConfigDict) -> None:
  lab = c.labelling
  require(isinstance(lab.max_staleness, int) and lab.max_staleness >= 0,
          f'labelling.max_staleness={lab.max_staleness!r} must be an integer >= 0 (0 = synchronous).')
  require(lab.max_staleness == 0 or c.loop == 'online',
          f'labelling.max_staleness={lab.max_staleness} applies to the online loop; iterative DPO labels a '
          'whole iteration before training on it (use 0).')
  require(isinstance(lab.answers_per_query, int) and lab.answers_per_query >= 1,
          f'labelling.answers_per_query={lab.answers_per_query!r} must be an integer >= 1.')
  require(lab.answers_per_query == 1 or c.oracle.reward == 'human',
          f'labelling.answers_per_query={lab.answers_per_query}: a function oracle '
          f'(oracle.reward={c.oracle.reward!r}) answers each query once; k > 1 needs '
          "oracle.reward='human'.")
  require(isinstance(lab.allow_ties, bool), f'labelling.allow_ties={lab.allow_ties!r} must be True or False.')
  require(lab.worker in LABELLING_WORKERS,
          f'labelling.worker={lab.worker!r} is unknown; allowed: {list(LABELLING_WORKERS)}.')
  require(isinstance(lab.poll_seconds, (int, float)) and lab.poll_seconds > 0,
          f'labelling.poll_seconds={lab.poll_seconds!r} must be > 0.')


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that determine what a run computes, flattened to 'a.b' keys. Renamed fields keep
  their former names here (config_aliases.STABLE_NAMES): workdirs and label stores written before
  a rename still match."""
  flat: dict[str, Any] = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(name + '.', value)
      else:
        flat[config_aliases.STABLE_NAMES.get(name, name)] = value

  walk('', config_aliases.resolve(config).to_dict())
  return {k: v for k, v in flat.items()
          if k.split('.')[0] not in EXECUTION_FIELDS and k not in EXECUTION_FIELD_NAMES}


# Lengths a finished (or interrupted) run may be extended by: resuming with a larger value continues
# it; a smaller one is refused (the run is already past it).
GROWABLE_FIELDS = ('online.steps', 'iterative.iterations')


def differing_fields(saved: dict, current: dict) -> list[str]:
  """'field: saved -> current' for every field that differs (JSON round-trip normalises types),
  except a GROWABLE_FIELDS value that grew."""
  saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))

  def grew(k):
    a, b = saved.get(k), current.get(k)
    return k in GROWABLE_FIELDS and isinstance(a, int) and isinstance(b, int) and b >= a
  return [f'{config_aliases.RENAMED.get(k, k)}: {saved.get(k, "<absent>")!r} -> '
          f'{current.get(k, "<absent>")!r}'
          + (' (may only grow)' if k in GROWABLE_FIELDS else '')
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k) and not grew(k)]


def missing_checkpoints(config: ml_collections.ConfigDict) -> list[str]:
  """'field=path' of every configured checkpoint that is not on this machine."""
  import os
  from pilaf_jax.model.checkpoints import CheckpointError, resolve_path
  missing = []
  for field in ('model.checkpoint', 'model.reference_checkpoint', 'oracle.checkpoint'):
    section, name = field.split('.')
    spec = config[section][name]
    if spec:
      try:
        exists = os.path.exists(resolve_path(spec))
      except CheckpointError:  # A package: path whose package is not installed.
        exists = False
      if not exists:
        missing.append(f'{field}={spec}')
  return missing


def resolve_checkpoints(config: ml_collections.ConfigDict, planning: bool = False) -> ml_collections.ConfigDict:
  """A copy of config whose model architecture is model.checkpoint's (read from its metadata), so
  that the saved config, the fingerprint and the mesh plan describe the model that actually runs.
  A config without a checkpoint is returned unchanged. Raises ConfigError for an unusable one.

  planning: checkpoints that are not on this machine are skipped (a dry run plans with the
  config's own architecture fields, e.g. a preset, before the weights are copied anywhere)."""
  if not config.model.checkpoint:
    return config
  from pilaf_jax.model.checkpoints import CheckpointError, architecture, read_checkpoint_config
  absent = {entry.split('=')[0] for entry in missing_checkpoints(config)} if planning else set()
  if 'model.checkpoint' in absent:
    return config
  found = {}
  for field in ('model.checkpoint', 'model.reference_checkpoint', 'oracle.checkpoint'):
    section, name = field.split('.')
    if config[section][name] and field not in absent:
      try:
        found[field], _ = read_checkpoint_config(config[section][name])
      except CheckpointError as e:
        raise ConfigError(f'{field}: {e}') from None
  cfg = found['model.checkpoint']
  if 'model.reference_checkpoint' in found:
    policy, reference = architecture(cfg), architecture(found['model.reference_checkpoint'])
    diff = [f'{k}={reference[k]!r} where the policy has {policy[k]!r}' for k in policy if reference[k] != policy[k]]
    if diff:
      raise ConfigError(f'model.reference_checkpoint={config.model.reference_checkpoint!r} is not the '
                        f'policy\'s architecture: {"; ".join(diff)}. PILAF mixes the two models token by '
                        'token: they must be the same model (same vocabulary).')
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    for name, value in architecture(cfg).items():
      resolved.model[name] = value
    resolved.task.vocab_size = cfg.vocab_size
  return resolved
