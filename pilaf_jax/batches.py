"""The pytrees that flow between sampling, labelling and learning.

Prompts are left-padded to a fixed length P, responses right-padded to R: shapes stay static and every
row of a batch writes the same KV-cache slot at the same decode step.
"""
from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Which distribution produced a response (PairBatch.source).
POLICY, PI_PLUS, PI_MINUS, REFERENCE = 0, 1, 2, 3
SOURCE_NAMES = {POLICY: 'policy', PI_PLUS: 'pi_plus', PI_MINUS: 'pi_minus', REFERENCE: 'reference'}


@flax.struct.dataclass
class PromptBatch:
  """Prompts as token rows, each with the id of its prompt in the task's split.

  ids travel with the rows through every reordering (pilaf shuffles prompts), so an oracle, the
  label store or an export can always find the text a pair belongs to. They may be None in code
  that never needs the text (unit tests of the kernels).
  """
  tokens: jax.Array  # [B, P] int32, left-padded.
  mask: jax.Array  # [B, P] bool.
  ids: Optional[jax.Array] = None  # [B] int32: the prompt's index in its split.

  @property
  def size(self) -> int:
    return self.tokens.shape[0]

  def repeat(self, n: int) -> 'PromptBatch':
    """[B, P] -> [n * B, P], row i of copy j at j * B + i."""
    ids = None if self.ids is None else jnp.tile(self.ids, n)
    return PromptBatch(jnp.tile(self.tokens, (n, 1)), jnp.tile(self.mask, (n, 1)), ids)

  def take(self, index: jax.Array) -> 'PromptBatch':
    return PromptBatch(self.tokens[index], self.mask[index], None if self.ids is None else self.ids[index])

  @classmethod
  def concatenate(cls, batches: 'list[PromptBatch]') -> 'PromptBatch':
    ids = None if batches[0].ids is None else jnp.concatenate([b.ids for b in batches])
    return cls(jnp.concatenate([b.tokens for b in batches]), jnp.concatenate([b.mask for b in batches]), ids)


@flax.struct.dataclass
class SamplingCost:
  """What producing a batch of pairs cost, counted from what actually ran.

  A 'decode sequence' is one response decoded autoregressively by one model (a response mixed from
  two models counts twice); 'scoring' is teacher-forced (parallel) evaluation; oracle_responses are
  the responses shown to the labeller.

  Two token counts per model and kind of pass:
  - `*_tokens` (useful tokens): the non-padding prompt tokens plus the response's own tokens (EOS
    included), once per response a model ran on: what an ideal, padding-free implementation would
    evaluate.
  - `*_tokens_executed` (what ran): token positions the model actually evaluated. Decoding prefills
    every row's whole [P] prompt buffer (left padding included), then runs every row of the batch
    for every decode step until all rows have ended: rows x (P + steps). Teacher-forced scoring
    runs every row over the whole [P + R] buffer: rows x (P + R). Rows that were decoded and then
    discarded (pilaf's boundary prompt, best-of-N's unpicked samples) count too: they ran.
  The executed counts default to 0 so that label stores written before they existed still load.
  """
  pairs: jax.Array
  policy_decode_sequences: jax.Array
  ref_decode_sequences: jax.Array
  policy_decode_tokens: jax.Array
  ref_decode_tokens: jax.Array
  policy_scoring_tokens: jax.Array
  ref_scoring_tokens: jax.Array
  oracle_responses: jax.Array
  policy_decode_tokens_executed: jax.Array = np.int32(0)
  ref_decode_tokens_executed: jax.Array = np.int32(0)
  policy_scoring_tokens_executed: jax.Array = np.int32(0)
  ref_scoring_tokens_executed: jax.Array = np.int32(0)

  @classmethod
  def zero(cls) -> 'SamplingCost':
    z = jnp.zeros((), jnp.int32)
    return cls(**{name: z for name in cls.__dataclass_fields__})

  def __add__(self, other: 'SamplingCost') -> 'SamplingCost':
    return jax.tree.map(lambda a, b: a + b, self, other)

  def as_dict(self) -> dict:
    return {f.name: int(getattr(self, f.name)) for f in self.__dataclass_fields__.values()}


class CostTotals:
  """Cumulative SamplingCost of a run, counted on the host in Python ints.

  A batch's cost fits int32 easily; a run's totals do not (a paper-scale run decodes billions of
  tokens), and jax arrays are int32 unless x64 is on. So totals live here and in the checkpoint's
  JSON meta, not on the device.
  """

  def __init__(self, totals: Optional[dict] = None):
    self._totals = {name: 0 for name in SamplingCost.__dataclass_fields__}
    self._totals.update({k: int(v) for k, v in (totals or {}).items() if k in self._totals})

  def add(self, cost: SamplingCost) -> 'CostTotals':
    """A new total with one batch's cost (device or host arrays) added."""
    return CostTotals({k: v + int(getattr(cost, k)) for k, v in self._totals.items()})

  def as_dict(self) -> dict:
    return dict(self._totals)


@flax.struct.dataclass
class PairBatch:
  """B prompts, two responses each, with per-token log-probs from the sampling pass.

  responses, response_mask, policy_logprobs, ref_logprobs: [B, 2, R]. ref_logprobs are always filled
  (from the decode loop when the reference ran there, else teacher-forced), so DPO never recomputes
  them. policy_logprobs are filled for every response the policy decoded and are 0 for responses
  decoded by the reference alone (the DPO step recomputes policy log-probs with gradients anyway).
  source: [B, 2] int, one of POLICY, PI_PLUS, PI_MINUS, REFERENCE.
  """
  prompts: PromptBatch
  responses: jax.Array
  response_mask: jax.Array
  policy_logprobs: jax.Array
  ref_logprobs: jax.Array
  source: jax.Array
  cost: SamplingCost

  @property
  def size(self) -> int:
    return self.responses.shape[0]


@flax.struct.dataclass
class PreferenceBatch:
  """Labelled pairs: a_preferred[i] is True when responses[i, 0] beat responses[i, 1]."""
  pairs: PairBatch
  a_preferred: jax.Array  # [B] bool.

  def chosen_rejected(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits a [B, 2, ...] field into (chosen, rejected), each [B, ...]."""
    first = self.a_preferred.reshape((-1,) + (1,) * (x.ndim - 2))
    return jnp.where(first, x[:, 0], x[:, 1]), jnp.where(first, x[:, 1], x[:, 0])
