"""Former config field names, accepted for one release (until 0.4.0) with one deprecation line each.

The task section became one subsection per task (task.synthetic.*, task.chat.*) and oracle.name,
the labelling rule, became oracle.label_rule (oracle.reward stays: where the reward comes from).
A former name works in a config file (`c.task.world_seed = 7`) and on the command line
(`--config.task.world_seed=7`). Fingerprints keep the former names of these fields, so workdirs
and label stores written before the rename resume unchanged.
"""
from __future__ import annotations

import sys
from typing import Callable

RENAMED = {  # Former name -> current name.
    **{f'task.{f}': f'task.synthetic.{f}' for f in ('world_seed', 'num_topics', 'num_styles', 'copy_prob',
                                                     'reward_scale')},
    **{f'task.{f}': f'task.chat.{f}' for f in ('dataset', 'source_dir', 'data_dir', 'subset', 'tokenizer',
                                                'chat_template', 'overlong_prompts')},
    'oracle.name': 'oracle.label_rule',
}
STABLE_NAMES = {new: old for old, new in RENAMED.items()}  # Fingerprint key of a current name.


def _warn(old: str, log: Callable[[str], None]) -> None:
  log(f'warning: config field {old} is deprecated (accepted until 0.4.0); use {RENAMED[old]}.')


def _stderr(message: str) -> None:
  print(message, file=sys.stderr)


def rewrite_overrides(argv: list[str], log: Callable[[str], None] = _stderr) -> list[str]:
  """argv with each `--config.<former name>=value` renamed (saying so), before flags are parsed."""
  out = []
  for arg in argv:
    flag, eq, value = arg.partition('=')
    old = flag[len('--config.'):] if flag.startswith('--config.') else ''
    if old in RENAMED and eq:
      _warn(old, log)
      arg = f'--config.{RENAMED[old]}={value}'
    out.append(arg)
  return out


def resolve(config, log: Callable[[str], None] = _stderr):
  """Moves values set under a former name (by a config file, or in the config.json of an older
  workdir) to the current field, saying so; the former keys are removed. In place (returns config);
  a config without them is left as it is."""
  import ml_collections
  for old, new in RENAMED.items():
    section, name = old.split('.')
    if section in config and name in config[section]:
      _warn(old, log)
      with config.unlocked():
        value = config[section][name]
        del config[section][name]
        parent, leaf = new.rsplit('.', 1)
        target = config
        for part in parent.split('.'):
          if part not in target:
            target[part] = ml_collections.ConfigDict()
          target = target[part]
        target[leaf] = value
  return config
