"""Oracles that read text: a reward model's score, or a chat model's verdict as a judge.

Both run the same Flax decoder with a score head on the hidden state of the last token:
- reward_model: a Hugging Face *ForSequenceClassification checkpoint (Llama, Qwen2, ...), reading
  the conversation and the response rendered with its own chat template (as the paper's
  Skywork-Reward-Llama-3.1-8B is used);
- judge: a chat model asked whether the response is helpful, correct and harmless; the score is
  logit(Yes) - logit(No) at the start of its answer, which is a score head made of two rows of its
  LM head. A demo oracle for CPU runs, not a human-preference reward model.

The oracle always reads text: the policy's response is detokenised and re-rendered with the
oracle's tokenizer, so an oracle with another tokenizer or template than the policy's works
unchanged. Sequences are left-padded to oracle.max_len tokens, so one program serves every batch.
A longer one loses its start (the BOS and chat header first): it is counted and logged
(oracle.overlong='truncate'), or refused (oracle.overlong='error').
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.errors import ConfigError
from pilaf_jax.model.llama import Llama
from pilaf_jax.parallel.mesh import batch_sharding
from pilaf_jax.parallel.partitioning import param_shardings
from pilaf_jax.parallel.placement import to_host

JUDGE_PROMPT = (
    'Here is a conversation between a user and an assistant.\n\n{conversation}\n\n'
    'Is the assistant\'s last reply helpful, correct and harmless? Answer Yes or No.')


def conversation_text(messages: Sequence[dict], response: str) -> str:
  """The conversation with the response as the assistant's last turn, as plain text."""
  turns = [f'{m["role"].capitalize()}: {m["content"]}' for m in messages]
  return '\n'.join(turns + [f'Assistant: {response}'])


class TextOracle:
  """fn(conversations, responses) -> rewards [n] (numpy): scale * score of each response."""

  def __init__(self, kind: str, model: Llama, params, tokenizer, *, max_len: int, scale: float, mesh,
               overlong: str = 'truncate', log=print):
    self.kind, self.model, self.params, self.tokenizer = kind, model, params, tokenizer
    self.max_len, self.scale, self.mesh = max_len, scale, mesh
    self.overlong, self.log = overlong, log
    self.truncated = 0  # Inputs cut to max_len so far (they lost their start).
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    from pilaf_jax.model.reward_model import sequence_scores
    shardings = jax.tree.map(lambda x: x.sharding, params)
    rows = batch_sharding(mesh, 2)
    self._score = jax.jit(functools.partial(_scores, model, sequence_scores),
                          in_shardings=(shardings, rows, rows))

  def render(self, messages: Sequence[dict], response: str) -> list[int]:
    """The oracle's token ids for one (conversation, response), before padding."""
    if self.kind == 'judge':
      chat = [{'role': 'user', 'content': JUDGE_PROMPT.format(conversation=conversation_text(messages, response))}]
      text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    else:
      chat = list(messages) + [{'role': 'assistant', 'content': response}]
      text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    return list(self.tokenizer(text, add_special_tokens=False)['input_ids'])

  def encode(self, conversations, responses) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [n, max_len] tokens and validity; longer sequences keep their end."""
    n = len(responses)
    tokens = np.full((n, self.max_len), self.pad_id, np.int32)
    valid = np.zeros((n, self.max_len), bool)
    cut, longest = 0, 0
    for i, (messages, response) in enumerate(zip(conversations, responses)):
      ids = self.render(messages, response)
      if len(ids) > self.max_len:
        if self.overlong == 'error':
          raise ConfigError(f'An oracle input has {len(ids)} tokens, over oracle.max_len={self.max_len}; '
                            "raise oracle.max_len, or set oracle.overlong='truncate' to keep its end.")
        cut, longest = cut + 1, max(longest, len(ids))
        ids = ids[-self.max_len:]
      tokens[i, self.max_len - len(ids):] = ids
      valid[i, self.max_len - len(ids):] = True
    if cut:
      self.truncated += cut
      self.log(f'warning: the oracle cut {cut} of {n} inputs to oracle.max_len={self.max_len} tokens (the '
               f'longest had {longest}; their start, with the BOS and chat header, is lost); '
               f'{self.truncated} so far. Raise oracle.max_len, or set oracle.overlong=\'error\'.')
    return tokens, valid

  def __call__(self, conversations, responses) -> np.ndarray:
    tokens, valid = self.encode(conversations, responses)
    rows = batch_sharding(self.mesh, 2)
    put = lambda x: jax.make_array_from_callback(x.shape, rows, lambda index: x[index])
    scores = to_host(self._score(self.params, put(tokens), put(valid)))
    return self.scale * np.asarray(scores, np.float64)


def _scores(model: Llama, sequence_scores, params, tokens, valid):
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  scores = sequence_scores(model, params, tokens, positions, valid)
  return scores.reshape(scores.shape[0], -1)[:, 0]


def single_token_id(tokenizer, word: str) -> int:
  """The id of `word` as the first token of an answer (a judge's Yes or No)."""
  ids = tokenizer(word, add_special_tokens=False)['input_ids']
  if len(ids) != 1:
    raise ConfigError(f'The judge needs "{word}" to be one token of its tokenizer; it is {len(ids)}: {ids}.')
  return ids[0]


def make_text_oracle(oracle_cfg, mesh) -> TextOracle:
  """The oracle of config.oracle (reward='reward_model' or 'judge'), sharded over the mesh."""
  from pilaf_jax.data.tokenization import load_tokenizer
  from pilaf_jax.model.checkpoints import load_checkpoint, read_checkpoint_config, resolve_path
  from pilaf_jax.model.reward_model import judge_score_head
  c = oracle_cfg
  kind = c.reward
  cfg, info = read_checkpoint_config(c.checkpoint)
  if kind == 'reward_model' and info.num_labels < 1:
    raise ConfigError(f'oracle.checkpoint={c.checkpoint!r} is not a sequence-classification (reward) model '
                      f'(no score head); use oracle.reward=\'judge\' for a chat model.')
  cfg = dataclasses.replace(cfg, param_dtype=c.dtype, dtype=c.dtype)
  from pilaf_jax.model.hf import hf_param_shapes  # The loaders' tree: an LM's, or a classifier's.
  abstract = hf_param_shapes(cfg, info.num_labels if kind == 'reward_model' else 0)
  _, params, _ = load_checkpoint(c.checkpoint, dtype=c.dtype, shardings=param_shardings(abstract, mesh))
  tokenizer = load_tokenizer(resolve_path(c.tokenizer or c.checkpoint))
  if not getattr(tokenizer, 'chat_template', None):
    raise ConfigError(f'The oracle tokenizer of {c.tokenizer or c.checkpoint!r} has no chat template.')
  if kind == 'judge':
    params = judge_score_head(params, cfg, single_token_id(tokenizer, 'Yes'), single_token_id(tokenizer, 'No'))
  return TextOracle(kind, Llama(cfg), params, tokenizer, max_len=c.max_len, scale=c.reward_scale, mesh=mesh,
                    overlong=c.get('overlong', 'truncate'))
