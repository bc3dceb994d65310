"""Former config field names (config_aliases.py): accepted for one release with one deprecation line,
and workdirs and label stores written before the rename still match the config that resumes them."""
import json
import os

import pytest

from pilaf_jax import config_aliases, config_validation, default_config, workdir_config
from pilaf_jax.labelling.label_store import LabelStore

HERE = os.path.dirname(os.path.abspath(__file__))
OLD_WORKDIR_CONFIG = os.path.join(HERE, 'data', 'config_v0.2.0_tiny.json')  # Written by pilaf_jax 0.2.0.


def _tiny():
  import importlib.util
  spec = importlib.util.spec_from_file_location('tiny', os.path.join(HERE, '..', 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_a_former_name_on_the_command_line_is_renamed_with_one_line():
  said = []
  argv = config_aliases.rewrite_overrides(
      ['main', '--config.task.world_seed=7', '--config.oracle.name=deterministic', '--config.seed=3'], said.append)
  assert argv == ['main', '--config.task.synthetic.world_seed=7', '--config.oracle.label_rule=deterministic',
                  '--config.seed=3']
  assert said == ['warning: config field task.world_seed is deprecated (accepted until 0.4.0); use '
                  'task.synthetic.world_seed.',
                  'warning: config field oracle.name is deprecated (accepted until 0.4.0); use oracle.label_rule.']


def test_a_former_name_in_a_config_file_moves_to_its_field():
  c = default_config.get_config()
  c.task.world_seed = 7  # What a config file written for 0.2.0 does.
  c.task.update(dataset='jsonl')
  c.lock()
  said = []
  assert config_aliases.resolve(c, said.append) is c
  assert c.task.synthetic.world_seed == 7 and c.task.chat.dataset == 'jsonl'
  assert 'world_seed' not in c.task and 'dataset' not in c.task
  assert len(said) == 2 and 'use task.synthetic.world_seed' in said[0] and 'use task.chat.dataset' in said[1]
  config_aliases.resolve(c, said.append)
  assert len(said) == 2  # Once resolved, nothing more to say.


def test_a_workdir_of_0_2_0_matches_the_same_config_and_names_a_difference_by_its_new_name(tmp_path):
  with open(OLD_WORKDIR_CONFIG) as f:
    saved = json.load(f)
  assert 'task.world_seed' in saved['fingerprint'] and 'oracle.name' in saved['fingerprint']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = _tiny()
  workdir_config.check_workdir(config, str(tmp_path))  # Resumable: nothing differs.
  now, defaults = config_validation.fingerprint(config), config_validation.fingerprint(default_config.get_config())
  assert {k: now[k] for k in saved['fingerprint']} == saved['fingerprint']  # Same names, same values;
  assert all(now[k] == defaults[k] for k in set(now) - set(saved['fingerprint']))  # added fields at defaults.
  config.task.synthetic.world_seed = 99
  with pytest.raises(config_validation.ConfigError, match=r'task\.synthetic\.world_seed: 1234 -> 99'):
    workdir_config.check_workdir(config, str(tmp_path))


def test_a_label_store_of_0_2_0_opens_under_the_same_config(tmp_path):
  with open(OLD_WORKDIR_CONFIG) as f:
    old = json.load(f)['fingerprint']
  path = str(tmp_path / 'labels.sqlite')
  LabelStore(path, old).close()
  defaults = config_validation.fingerprint(default_config.get_config())
  LabelStore(path, config_validation.fingerprint(_tiny()), defaults=defaults).close()
