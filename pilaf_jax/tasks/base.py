"""What a loop needs from a task, behind one small protocol.

A task owns the prompts (a train and a held-out split, deterministic by index), the token
conventions (padding, the set of stop tokens, the tokens a response may contain), where the
reference policy comes from, and the oracle's reward r*(x, y). Everything else (models, sampling,
labelling rules, DPO, evaluation) is the same for every task.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import numpy as np

from pilaf_jax.batches import PromptBatch

TRAIN, EVAL = 'train', 'eval'
SPLITS = (TRAIN, EVAL)

# Where the reference policy comes from.
REFERENCE_SFT = 'sft'  # Fine-tuned here on the task's behaviour data (Task.sft_batch).
REFERENCE_CHECKPOINT = 'checkpoint'  # Loaded from model.checkpoint / model.reference_checkpoint.


@runtime_checkable
class Task(Protocol):
  """The task interface. Arrays cross it as numpy on the host; kernels stay inside the loop."""

  prompt_len: int  # P: prompts are left-padded (and truncated) to this many tokens.
  response_len: int  # R: responses are right-padded to this many tokens.
  pad_id: int
  eos_ids: tuple[int, ...]  # Stop tokens; the first is the canonical one.
  reference_source: str  # REFERENCE_SFT or REFERENCE_CHECKPOINT.

  @property
  def allowed_tokens(self) -> Optional[np.ndarray]:
    """[V] bool: the tokens a response may contain, or None for all of them."""

  def num_prompts(self, split: str) -> Optional[int]:
    """How many distinct prompts the split holds (None: an endless generated stream)."""

  def prompts(self, split: str, index: int, n: int) -> PromptBatch:
    """Batch `index` of n prompts of a split, with their ids: the same for the same arguments."""

  def rewards(self, split: str, prompts: PromptBatch, responses: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The oracle's reward r*(x, y) of each response, [n] float. prompts carry their ids in `split`."""

  def describe(self, split: str, prompt_id: int) -> str:
    """The prompt's text (for exports, label pages and oracles that read text)."""

  def render_response(self, tokens: np.ndarray, mask: np.ndarray) -> str:
    """One response's text ([R] tokens and validity), as a labeller is shown it."""


def pair_queries(task: Task, pairs, rewards: Optional[np.ndarray]) -> list[dict]:
  """A sampled batch's queries for the labelling queue (host PairBatch, TRAIN prompts): texts,
  sources, and the oracle's rewards [B, 2] (None when people label)."""
  ids, source = np.asarray(pairs.prompts.ids), np.asarray(pairs.source)
  responses, mask = np.asarray(pairs.responses), np.asarray(pairs.response_mask)
  many = getattr(task, 'describe_many', None)  # Optional: one call for the whole batch.
  texts = many(TRAIN, ids) if many else [task.describe(TRAIN, int(i)) for i in ids]
  reward = lambda i, k: None if rewards is None else float(rewards[i, k])
  return [dict(row=i, prompt_id=int(ids[i]), prompt_text=texts[i],
               response_a_text=task.render_response(responses[i, 0], mask[i, 0]),
               response_b_text=task.render_response(responses[i, 1], mask[i, 1]),
               source_a=int(source[i, 0]), source_b=int(source[i, 1]),
               oracle_reward_a=reward(i, 0), oracle_reward_b=reward(i, 1)) for i in range(len(ids))]
