"""Checks a resolved config before any work starts, with messages that say what to change."""
from __future__ import annotations

import json
from typing import Any

import ml_collections

LOOPS = ('online', 'iterative')
ROPE_SCALINGS = ('', 'llama3')
ORACLE_REWARDS = ('task', 'reward_model', 'judge', 'human')
LABELLING_WORKERS = ('inline', 'external')
CHAT_DATASETS = ('hh_rlhf', 'jsonl')
# Fields that change how a run is executed or shown, not what it computes: they may differ when a
# run is resumed. Everything else must match the workdir's saved config.
EXECUTION_FIELDS = ('runtime', 'checkpoint', 'mesh', 'distributed')
# Single fields of that kind in sections that otherwise determine the run: where the label store lives
# differs between machines (a gs:// workdir resumed on another VM); who answers function-oracle queries
# and how often the queue is polled do not change any label.
EXECUTION_FIELD_NAMES = ('labelling.store_path', 'labelling.worker', 'labelling.poll_seconds')


class ConfigError(ValueError):
  """A user mistake in the config or command line; main prints it without a traceback."""


def one_line(error: BaseException) -> str:
  """A library's (possibly multi-line) error message as one line."""
  return ' '.join(str(error).split())


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field and what is allowed."""
  from pilaf_jax.labelling.oracles import ORACLES  # Registries fill on import.
  from pilaf_jax.sampling.samplers import SAMPLERS
  from pilaf_jax.tasks import TASKS

  c = config
  _require(c.loop in LOOPS, f'loop={c.loop!r} is unknown; allowed: {list(LOOPS)}.')
  _require(c.beta > 0, f'beta={c.beta} must be > 0 (the paper uses 0.1).')
  _require(c.task.name in TASKS, f'task.name={c.task.name!r} is unknown; allowed: {sorted(TASKS)}.')
  _require(c.sampler.name in SAMPLERS,
           f'sampler.name={c.sampler.name!r} is unknown; allowed: {sorted(SAMPLERS)}.')
  first = c.iterative.first_iteration_sampler
  _require(first == '' or first in SAMPLERS, f'iterative.first_iteration_sampler={first!r} is unknown; '
           f"allowed: '' (use sampler.name) or one of {sorted(SAMPLERS)}.")
  _require(c.oracle.name in ORACLES, f'oracle.name={c.oracle.name!r} is unknown; allowed: {sorted(ORACLES)}.')
  _require(c.sampler.best_of_n >= 2, f'sampler.best_of_n={c.sampler.best_of_n} must be >= 2.')
  _require(0.0 <= c.sampler.vanilla_fraction <= 1.0,
           f'sampler.vanilla_fraction={c.sampler.vanilla_fraction} must lie in [0, 1].')
  _require(c.sampler.temperature > 0, f'sampler.temperature={c.sampler.temperature} must be > 0.')
  _require(c.sampler.top_k >= 0, f'sampler.top_k={c.sampler.top_k} must be >= 0 (0 = off).')
  _require(0.0 < c.sampler.top_p <= 1.0, f'sampler.top_p={c.sampler.top_p} must lie in (0, 1].')
  _require(c.task.prompt_len >= 2, f'task.prompt_len={c.task.prompt_len} must be >= 2 (BOS + a token).')
  _require(c.task.response_len >= 1, f'task.response_len={c.task.response_len} must be >= 1.')
  _require(c.model.rope_scaling in ROPE_SCALINGS,
           f'model.rope_scaling={c.model.rope_scaling!r} is unknown; allowed: {list(ROPE_SCALINGS)}.')
  _require(c.oracle.reward in ORACLE_REWARDS,
           f'oracle.reward={c.oracle.reward!r} is unknown; allowed: {list(ORACLE_REWARDS)}.')
  if c.task.name in ('synthetic', 'rare'):  # Tasks that train their own reference.
    _require(c.task.vocab_size >= 4, f'task.vocab_size={c.task.vocab_size} must be >= 4 '
             '(PAD, BOS, EOS and at least one content token).')
    _require(c.model.vocab_size == c.task.vocab_size,
             f'model.vocab_size={c.model.vocab_size} must equal task.vocab_size={c.task.vocab_size}.')
    _require(c.oracle.reward in ('task', 'human'), f"oracle.reward={c.oracle.reward!r}: the synthetic "
             "task's oracle is its hidden reward; use oracle.reward='task', or 'human' for people "
             '(reward models and judges read text).')
    _require(not c.model.checkpoint, f'model.checkpoint={c.model.checkpoint!r}: the synthetic task '
             "trains its own reference; pretrained checkpoints need task.name='chat'.")
  else:  # chat
    _require(bool(c.model.checkpoint), "task.name='chat' needs model.checkpoint: a Hugging Face "
             'checkpoint directory, a .gguf file or package:<package>/<file>.')
    _require(c.task.dataset in CHAT_DATASETS,
             f'task.dataset={c.task.dataset!r} is unknown; allowed: {list(CHAT_DATASETS)}.')
    _require(bool(c.task.source_dir), f'task.source_dir is empty: name the directory that holds the '
             f'{c.task.dataset or "prompt"} files.')
    _require(c.task.overlong_prompts in ('truncate', 'error'),
             f"task.overlong_prompts={c.task.overlong_prompts!r}; allowed: 'truncate', 'error'.")
    _require(c.oracle.reward != 'human', "oracle.reward='human' is not available for task.name='chat' yet: "
             "its evaluation scores responses with the oracle, so it needs 'reward_model' or 'judge'.")
    _require(c.oracle.reward in ('reward_model', 'judge'),
             f"oracle.reward={c.oracle.reward!r}: a chat task needs 'reward_model' or 'judge' "
             '(with oracle.checkpoint).')
    _require(bool(c.oracle.checkpoint), f'oracle.reward={c.oracle.reward!r} needs oracle.checkpoint.')
    _require(c.oracle.max_len >= 2, f'oracle.max_len={c.oracle.max_len} must be >= 2.')
    _require(c.oracle.overlong in ('truncate', 'error'),
             f"oracle.overlong={c.oracle.overlong!r}; allowed: 'truncate', 'error'.")
  for name in ('dpo.batch_size', 'sft.batch_size', 'sft.steps', 'eval.batch_size', 'eval.num_prompts',
               'eval.every_steps', 'online.steps', 'iterative.iterations',
               'iterative.prompts_per_iteration', 'iterative.epochs', 'checkpoint.every_steps',
               'checkpoint.max_to_keep'):
    section, field = name.split('.')
    value = c[section][field]
    _require(isinstance(value, int) and value >= 1, f'{name}={value!r} must be an integer >= 1.')
  _require(c.eval.num_prompts % c.eval.batch_size == 0,
           f'eval.num_prompts={c.eval.num_prompts} must be divisible by eval.batch_size='
           f'{c.eval.batch_size}.')
  _require(c.iterative.prompts_per_iteration % c.dpo.batch_size == 0,
           f'iterative.prompts_per_iteration={c.iterative.prompts_per_iteration} must be divisible by '
           f'dpo.batch_size={c.dpo.batch_size}.')
  _require(c.dpo.learning_rate > 0, f'dpo.learning_rate={c.dpo.learning_rate} must be > 0.')
  _validate_labelling(c)
  store = c.labelling.store_path
  _require(isinstance(store, str) and '://' not in store,
           f'labelling.store_path={store!r} must be a local file path (SQLite needs a POSIX file; a copy '
           "goes to the workdir at every checkpoint), or '' for the default.")
  _require(not store or not store.endswith(('/', '\\')),
           f'labelling.store_path={store!r} names a directory; name the file, e.g. {store}labels.sqlite.')


def _validate_labelling(c: ml_collections.ConfigDict) -> None:
  lab = c.labelling
  _require(isinstance(lab.max_staleness, int) and lab.max_staleness >= 0,
           f'labelling.max_staleness={lab.max_staleness!r} must be an integer >= 0 (0 = synchronous).')
  _require(lab.max_staleness == 0 or c.loop == 'online',
           f'labelling.max_staleness={lab.max_staleness} applies to the online loop; iterative DPO labels a '
           'whole iteration before training on it (use 0).')
  _require(isinstance(lab.answers_per_query, int) and lab.answers_per_query >= 1,
           f'labelling.answers_per_query={lab.answers_per_query!r} must be an integer >= 1.')
  _require(lab.answers_per_query == 1 or c.oracle.reward == 'human',
           f'labelling.answers_per_query={lab.answers_per_query}: a function oracle '
           f'(oracle.reward={c.oracle.reward!r}) answers each query once; k > 1 needs '
           "oracle.reward='human'.")
  _require(isinstance(lab.allow_ties, bool), f'labelling.allow_ties={lab.allow_ties!r} must be True or False.')
  _require(lab.worker in LABELLING_WORKERS,
           f'labelling.worker={lab.worker!r} is unknown; allowed: {list(LABELLING_WORKERS)}.')
  _require(isinstance(lab.poll_seconds, (int, float)) and lab.poll_seconds > 0,
           f'labelling.poll_seconds={lab.poll_seconds!r} must be > 0.')


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that determine what a run computes, flattened to 'a.b' keys."""
  flat: dict[str, Any] = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(name + '.', value)
      else:
        flat[name] = value

  walk('', config.to_dict())
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
  return [f'{k}: {saved.get(k, "<absent>")!r} -> {current.get(k, "<absent>")!r}'
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
