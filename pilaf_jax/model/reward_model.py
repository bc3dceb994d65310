"""Reward models: a linear score head on the hidden state of each sequence's last token.

Same computation as transformers' LlamaForSequenceClassification / Qwen2ForSequenceClassification:
the decoder's final-norm hidden states, `score` ([d, num_labels], no bias) applied at the last valid
token of each row, whether the row is left- or right-padded. Params are the LM's with 'score'
instead of 'lm_head' (what load_hf_checkpoint gives for a ...ForSequenceClassification checkpoint).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pilaf_jax.model.llama import Llama, LlamaConfig


def decoder_params(params: Any) -> dict:
  """params without the heads the decoder's hidden states do not use ('score', 'lm_head')."""
  return {k: v for k, v in params.items() if k not in ('score', 'lm_head')}


def last_valid_index(valid: jax.Array) -> jax.Array:
  """[B] index of the rightmost valid token of each row (0 for a row with none), as HF pools."""
  t = valid.shape[1]
  return jnp.argmax(jnp.arange(t)[None, :] * valid.astype(jnp.int32), axis=1)


def sequence_scores(model: Llama, params: Any, tokens: jax.Array, positions: jax.Array,
                    valid: jax.Array) -> jax.Array:
  """Scores of whole sequences, float32: [B] when the head has one label, else [B, num_labels].

  tokens, positions, valid: [B, T] as for Llama (e.g. from scoring.sequence_inputs).
  """
  hidden, _ = model.apply({'params': decoder_params(params)}, tokens, positions, valid,
                          return_hidden=True)
  last = last_valid_index(valid)
  pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, d]
  kernel = params['score']['kernel'].astype(jnp.float32)
  scores = jnp.dot(pooled, kernel, precision=jax.lax.Precision.HIGHEST)
  return scores[:, 0] if kernel.shape[1] == 1 else scores


def judge_score_head(lm_params: Any, cfg: LlamaConfig, yes_id: int, no_id: int) -> dict:
  """A causal LM's params as a one-label reward model scoring logit(yes) - logit(no).

  The score at the last token is h @ (w_yes - w_no), with w the lm_head columns (the embedding rows
  when tied), so an instruct model can judge through sequence_scores like any reward model.
  """
  for name, i in (('yes_id', yes_id), ('no_id', no_id)):
    if not 0 <= i < cfg.vocab_size:
      raise ValueError(f'{name}={i} is outside the vocabulary [0, {cfg.vocab_size}).')
  if cfg.tie_embeddings:
    table = lm_params['embed_tokens']['embedding']  # [V, d]
    w = table[yes_id] - table[no_id]
  else:
    kernel = lm_params['lm_head']['kernel']  # [d, V]
    w = kernel[:, yes_id] - kernel[:, no_id]
  params = decoder_params(lm_params)
  params['score'] = {'kernel': w[:, None]}
  return params
