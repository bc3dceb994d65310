"""A workdir's config.json (the resolved config and its fingerprint) and versions.json, and the
check, before anything is written there, that a workdir holds no run of another config."""
from __future__ import annotations

import json
import platform

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pilaf_jax import config_validation, default_config, paths
from pilaf_jax.errors import ConfigError


def versions() -> dict:
  import flax
  import optax
  return {'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jax.lib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__, 'orbax-checkpoint': ocp.__version__,
          'numpy': np.__version__, 'ml_collections': getattr(ml_collections, '__version__', 'unknown'),
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
