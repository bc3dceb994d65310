"""Real text: a chat model from a checkpoint, prompts from a dataset, a reward model or judge as oracle.

Prompts are conversations (lists of chat messages) read by index from a PromptSource: HH-RLHF
through its TFDS builder, or a JSONL file. They are rendered with the tokenizer's chat template,
left-padded and truncated to task.prompt_len keeping the end of the conversation. The training
stream walks the train split in a fresh permutation per epoch (seeded by config.seed); the held-out
split is read in order. The oracle reads text: each response is detokenised and handed, with the
conversation, to the oracle model, which renders it with its own tokenizer and template.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from pilaf_jax.batches import PromptBatch
from pilaf_jax.errors import ConfigError, one_line
from pilaf_jax.data.prompts import PromptSource
from pilaf_jax.data.tokenization import ChatTokenizer
from pilaf_jax.tasks.base import EVAL, REFERENCE_CHECKPOINT, SPLITS, TRAIN


class ChatTask:
  """The Task protocol over a tokenizer, two prompt splits and a text oracle."""

  reference_source = REFERENCE_CHECKPOINT

  def __init__(self, tokenizer: ChatTokenizer, sources: dict[str, PromptSource], oracle, *,
               prompt_len: int, response_len: int, model_vocab_size: int, seed: int):
    self.tokenizer, self.sources, self.oracle = tokenizer, sources, oracle
    self.prompt_len, self.response_len = prompt_len, response_len
    self.pad_id, self.eos_ids = tokenizer.pad_id, tuple(tokenizer.eos_ids)
    self._seed = seed
    self._encoded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    self._order: dict[int, np.ndarray] = {}
    # Ids past the tokenizer's vocabulary are padding rows of the embedding: never sampled.
    allowed = np.arange(model_vocab_size) < tokenizer.vocab_size
    self._allowed = None if allowed.all() else allowed

  @property
  def allowed_tokens(self) -> Optional[np.ndarray]:
    return self._allowed

  def num_prompts(self, split: str) -> Optional[int]:
    return len(self._source(split))

  def _source(self, split: str) -> PromptSource:
    if split not in self.sources:
      raise ValueError(f'split={split!r}; allowed: {list(SPLITS)}.')
    return self.sources[split]

  def prompt_ids(self, split: str, index: int, n: int) -> np.ndarray:
    """Train: an endless stream of epochs, each a permutation of the split. Eval: in order."""
    total = len(self._source(split))
    positions = np.arange(index * n, (index + 1) * n)
    if split == EVAL:
      if positions[-1] >= total:
        raise ConfigError(f'The held-out split holds {total} prompts; eval.num_prompts asks for more.')
      return positions.astype(np.int32)
    epochs, offsets = np.divmod(positions, total)
    return np.asarray([self._epoch_order(int(e), total)[o] for e, o in zip(epochs, offsets)], np.int32)

  def _epoch_order(self, epoch: int, total: int) -> np.ndarray:
    if epoch not in self._order:
      self._order[epoch] = np.random.default_rng([self._seed, epoch]).permutation(total)
    return self._order[epoch]

  def prompts(self, split: str, index: int, n: int) -> PromptBatch:
    ids = self.prompt_ids(split, index, n)
    missing = [int(i) for i in ids if (split, int(i)) not in self._encoded]
    if missing:
      source = self._source(split)
      try:
        tokens, mask = self.tokenizer.encode_prompts([source.messages(i) for i in missing], self.prompt_len)
      except ValueError as e:  # An overlong prompt under task.chat.overlong_prompts='error'.
        raise ConfigError(f'{split} split: {one_line(e)}') from None
      for j, i in enumerate(missing):
        self._encoded[split, i] = tokens[j], mask[j]
    rows = [self._encoded[split, int(i)] for i in ids]
    return PromptBatch(np.stack([r[0] for r in rows]).astype(np.int32), np.stack([r[1] for r in rows]), ids)

  def rewards(self, split: str, prompts: PromptBatch, responses: np.ndarray, mask: np.ndarray) -> np.ndarray:
    source = self._source(split)
    conversations = [source.messages(int(i)) for i in np.asarray(prompts.ids)]
    return self.oracle(conversations, self.tokenizer.decode_responses(responses, mask))

  def describe(self, split: str, prompt_id: int) -> str:
    return '\n'.join(f'{m["role"]}: {m["content"]}' for m in self._source(split).messages(prompt_id))

  def render_response(self, tokens: np.ndarray, mask: np.ndarray) -> str:
    """The detokenised response (stop tokens and padding dropped), as the text oracle reads it."""
    return self.tokenizer.decode_responses(np.asarray(tokens)[None], np.asarray(mask)[None])[0]


def _prompt_sources(task_cfg, workdir: str) -> dict[str, PromptSource]:
  from pilaf_jax.model.checkpoints import resolve_path
  source_dir = resolve_path(task_cfg.source_dir)
  if task_cfg.dataset == 'hh_rlhf':
    from pilaf_jax.data.prompts import HHRLHFPrompts
    # The TFDS build (array_record) is written once and reused by every later run. By default it is a
    # local cache: in a local workdir, or in this machine's directory for a gs:// workdir (a new machine
    # builds it again from task.chat.source_dir).
    from pilaf_jax import paths
    data_dir = (resolve_path(task_cfg.data_dir) if task_cfg.data_dir
                else os.path.join(paths.local_dir(workdir), 'tfds'))
    return {split: HHRLHFPrompts(data_dir, name, task_cfg.subset, source_dir=source_dir)
            for split, name in ((TRAIN, 'train'), (EVAL, 'test'))}
  from pilaf_jax.data.prompts import JsonlPrompts
  sources = {}
  for split, name in ((TRAIN, 'train'), (EVAL, 'test')):
    candidates = [os.path.join(source_dir, name + ext) for ext in ('.jsonl', '.jsonl.gz')]
    found = [p for p in candidates if os.path.exists(p)]
    if not found:
      raise ConfigError(f'task.chat.source_dir={task_cfg.source_dir!r} holds no {name}.jsonl or {name}.jsonl.gz '
                        "(task.chat.dataset='jsonl' reads one conversation per line from each).")
    sources[split] = JsonlPrompts(found[0])
  return sources


def build_chat_task(config, run_key, placement, workdir: str) -> ChatTask:
  """The chat task of a resolved config (model.* already read from model.checkpoint).

  Bad paths and files stop here, before any work, with the config field to change.
  """
  del run_key  # The train order is seeded by config.seed directly (numpy, host side).
  from pilaf_jax.labelling.text_oracles import make_text_oracle
  from pilaf_jax.model.checkpoints import read_checkpoint_config, resolve_path
  c = config
  _, info = read_checkpoint_config(c.model.checkpoint)
  tokenizer_field = 'task.chat.tokenizer' if c.task.chat.tokenizer else 'model.checkpoint'
  try:
    tokenizer = ChatTokenizer(resolve_path(c.task.chat.tokenizer or c.model.checkpoint),
                              chat_template=c.task.chat.chat_template or None, overlong=c.task.chat.overlong_prompts,
                              extra_eos_ids=info.eos_token_ids)
  except (ValueError, OSError) as e:
    raise ConfigError(f'{tokenizer_field}: {one_line(e)}') from None
  if tokenizer.vocab_size > c.model.vocab_size:
    raise ConfigError(f'The tokenizer has {tokenizer.vocab_size} tokens but the model only '
                      f'{c.model.vocab_size} embeddings (model.checkpoint={c.model.checkpoint!r}, '
                      f'task.chat.tokenizer={c.task.chat.tokenizer!r}): they do not belong together.')
  try:
    sources = _prompt_sources(c.task.chat, workdir)
  except (ValueError, OSError) as e:
    raise ConfigError(f'task.chat.source_dir={c.task.chat.source_dir!r} (task.chat.dataset={c.task.chat.dataset!r}): '
                      f'{one_line(e)}') from None
  if c.eval.num_prompts > len(sources[EVAL]):
    raise ConfigError(f'eval.num_prompts={c.eval.num_prompts} exceeds the {len(sources[EVAL])} prompts of '
                      'the held-out split; lower it (and eval.batch_size to divide it).')
  if c.oracle.reward == 'text_rule':
    from pilaf_jax.labelling.text_rules import make_text_rule_oracle
    oracle = make_text_rule_oracle(c.oracle)
  else:
    oracle = make_text_oracle(c.oracle, placement.mesh)
  return ChatTask(tokenizer, sources, oracle, prompt_len=c.task.prompt_len, response_len=c.task.response_len,
                  model_vocab_size=c.model.vocab_size, seed=c.seed)
