"""The chat task's part of config validation (task.chat and what it implies), kept apart from
tasks/chat.py so that checking a config does not import the tokenizer libraries."""
from __future__ import annotations

from pilaf_jax.errors import require

CHAT_DATASETS = ('hh_rlhf', 'jsonl')


def check_config(c) -> None:
  t = c.task.chat
  require(bool(c.model.checkpoint), "task.name='chat' needs model.checkpoint: a Hugging Face "
          'checkpoint directory, a .gguf file or package:<package>/<file>.')
  require(t.dataset in CHAT_DATASETS, f'task.chat.dataset={t.dataset!r} is unknown; allowed: {list(CHAT_DATASETS)}.')
  require(bool(t.source_dir), f'task.chat.source_dir is empty: name the directory that holds the '
          f'{t.dataset or "prompt"} files.')
  require(t.overlong_prompts in ('truncate', 'error'),
          f"task.chat.overlong_prompts={t.overlong_prompts!r}; allowed: 'truncate', 'error'.")
  require(c.oracle.reward != 'human', "oracle.reward='human' is not available for task.name='chat' yet: "
          "its evaluation scores responses with the oracle, so it needs 'reward_model', 'judge' or 'text_rule'.")
  require(c.oracle.reward in ('reward_model', 'judge', 'text_rule'),
          f"oracle.reward={c.oracle.reward!r}: a chat task needs 'reward_model' or 'judge' (with oracle.checkpoint), "
          "or 'text_rule' (with oracle.text_rule).")
  if c.oracle.reward == 'text_rule':
    from pilaf_jax.labelling.text_rules import TEXT_RULES  # Plain Python: no model libraries.
    require(c.oracle.text_rule in TEXT_RULES,
            f'oracle.text_rule={c.oracle.text_rule!r} is unknown; allowed: {sorted(TEXT_RULES)}.')
    return
  require(bool(c.oracle.checkpoint), f'oracle.reward={c.oracle.reward!r} needs oracle.checkpoint.')
  require(c.oracle.max_len >= 2, f'oracle.max_len={c.oracle.max_len} must be >= 2.')
  require(c.oracle.overlong in ('truncate', 'error'), f"oracle.overlong={c.oracle.overlong!r}; allowed: 'truncate', 'error'.")
