"""Tasks: where prompts come from, which tokens a response may use, where the reference comes from,
and the oracle's reward. `Task` (base.py) is the interface; the registry maps task.name to a builder.

  synthetic  the embedded hidden world (no downloads, CPU, minutes); the reference is SFT'd here.
  rare       enumerable; the best responses rare under the reference; a warm start (tasks/rare.py).
  chat       real text: a chat model from a checkpoint, prompts from a dataset (HH-RLHF through
             tensorflow-datasets, or a JSONL file), a reward model or an LLM judge as the oracle.
"""
from __future__ import annotations

from typing import Callable

import jax

from pilaf_jax import config_aliases
from pilaf_jax.registry import lookup
from pilaf_jax.tasks import rare
from pilaf_jax.tasks.base import (EVAL, REFERENCE_CHECKPOINT, REFERENCE_SFT, SPLITS, TRAIN, Task)
from pilaf_jax.tasks.chat_config import check_config as chat_check_config
from pilaf_jax.tasks.synthetic import (BOS, EOS, PAD, SyntheticTask, SyntheticTaskConfig, SyntheticWorld,
                                       make_world, oracle_reward, sample_behaviour, sample_prompts)
from pilaf_jax.tasks.synthetic import check_config as synthetic_check_config


def _synthetic(config, run_key: jax.Array, placement, workdir: str) -> Task:
  del placement, workdir  # Its reward is a small jitted function; it needs no mesh and no files.
  return SyntheticTask(SyntheticTaskConfig.from_config(config.task), run_key)


def _chat(config, run_key: jax.Array, placement, workdir: str) -> Task:
  from pilaf_jax.tasks.chat import build_chat_task  # Imports transformers and tfds: only when asked.
  return build_chat_task(config, run_key, placement, workdir)


TASKS: dict[str, Callable[..., Task]] = {'synthetic': _synthetic, 'chat': _chat, 'rare': rare.build}
# Each task checks its own section (task.<name>) and what it implies for the rest of the config.
TASK_CHECKS: dict[str, Callable] = {'synthetic': synthetic_check_config, 'chat': chat_check_config,
                                    'rare': rare.check_config}


def make_task(config, run_key: jax.Array, placement=None, workdir: str = '') -> Task:
  """Builds the task named by config.task.name (the whole config: a task may need the model's).

  placement: the run's mesh placement (for oracles that run a model); workdir: where a task may
  keep what it prepares once (a dataset build).
  """
  config = config_aliases.resolve(config)  # Former field names (a config built in Python).
  return lookup(TASKS, config.task.name, 'task.name')(config, run_key, placement, workdir)
