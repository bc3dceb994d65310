"""SamplingCost against hand counts: the useful tokens (non-padding prompt tokens plus the response's
own tokens) and what actually ran (every row's whole prompt buffer at prefill, then every row at every
decode step until the last row ends; teacher-forced scoring over the whole [P + R] buffer)."""
import json
import sqlite3
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EOS, PAD, TINY_ALLOWED, TINY_VOCAB, prompt_batch, tiny_model
from pilaf_jax.batches import POLICY, CostTotals, PreferenceBatch, SamplingCost
from pilaf_jax.labelling.label_store import LabelStore
from pilaf_jax.loops.loop import evaluation_row
from pilaf_jax.sampling.decode import DecodeSettings
from pilaf_jax.sampling.samplers import SamplerContext, make_sampler

B, P, R = 6, 4, 5
LEFT_PAD = (1, 2)  # Rows 0 and 1 of the prompts carry 1 and 2 padding tokens.
NO_EOS = TINY_ALLOWED & (np.arange(TINY_VOCAB) != EOS)  # Responses never end: every row runs R steps.
ONLY_EOS = np.arange(TINY_VOCAB) == EOS  # Every response is [EOS]: the loop stops after one step.


def _ctx(allowed, r=R, **kw):
  policy, pp = tiny_model(0, scale=3.0)
  ref, rp = tiny_model(1, scale=3.0)
  ctx = SamplerContext(policy=policy, ref=ref, settings=DecodeSettings(r, EOS, PAD), beta=0.1,
                       allowed_tokens=allowed, **kw)
  return ctx, pp, rp


def _run(name, allowed, b=B, r=R, **kw):
  ctx, pp, rp = _ctx(allowed, r, **kw)
  prompts = prompt_batch(b, length=P, seed=3, left_pad=LEFT_PAD)
  pairs = make_sampler(name, ctx)(pp, rp, prompts, jax.random.key(7))
  return pairs.cost.as_dict(), pairs, prompts


def _prompt_tokens(prompts):
  return int(np.asarray(prompts.mask).sum())


def test_vanilla_full_length_hand_count():
  """2B policy rows, R steps each: executed 2B (P + R); useful 2 (valid prompt tokens) + 2B R."""
  cost, pairs, prompts = _run('vanilla', NO_EOS)
  assert int(np.asarray(pairs.response_mask).sum()) == 2 * B * R
  assert cost['policy_decode_tokens_executed'] == 2 * B * (P + R) == 108
  assert cost['policy_decode_tokens'] == 2 * _prompt_tokens(prompts) + 2 * B * R == 2 * (B * P - 3) + 60
  assert cost['ref_decode_tokens_executed'] == cost['ref_decode_tokens'] == 0
  # The reference scores both responses teacher-forced, over the whole buffer.
  assert cost['ref_scoring_tokens_executed'] == 2 * B * (P + R)
  assert cost['ref_scoring_tokens'] == cost['policy_decode_tokens']
  assert cost['policy_scoring_tokens_executed'] == cost['policy_scoring_tokens'] == 0


def test_early_stop_counts_one_step_per_row():
  """Every response is [EOS]: one decode step; executed rows x (P + 1), useful rows x 1 + valid prompt."""
  cost, pairs, prompts = _run('vanilla', ONLY_EOS)
  assert (np.asarray(pairs.response_mask).sum(-1) == 1).all()
  assert cost['policy_decode_tokens_executed'] == 2 * B * (P + 1)
  assert cost['policy_decode_tokens'] == 2 * _prompt_tokens(prompts) + 2 * B
  # Scoring runs the whole [P + R] buffer even for one-token responses.
  assert cost['ref_scoring_tokens_executed'] == 2 * B * (P + R)


def test_steps_follow_the_longest_row():
  """With EOS allowed, the loop runs max(response length) steps over all rows, for every row."""
  cost, pairs, prompts = _run('vanilla', TINY_ALLOWED, b=3, r=6)
  lengths = np.asarray(pairs.response_mask).sum(-1)
  steps = int(lengths.max())
  assert cost['policy_decode_tokens_executed'] == 2 * 3 * (P + steps)
  assert cost['policy_decode_tokens'] == 2 * _prompt_tokens(prompts) + int(lengths.sum())
  assert cost['policy_decode_tokens_executed'] >= cost['policy_decode_tokens']


def test_hybrid_hand_count():
  """B policy rows and B reference rows, R steps; the reference scores only the policy's responses."""
  cost, _, _ = _run('hybrid', NO_EOS)
  assert cost['policy_decode_tokens_executed'] == B * (P + R)
  assert cost['ref_decode_tokens_executed'] == B * (P + R)
  assert cost['ref_scoring_tokens_executed'] == B * (P + R)


def test_pilaf_hand_count_even_and_odd():
  """B = 6, f = 1/2: 3 vanilla prompts (6 policy rows) and 3 mixed (6 rows, both models).
  B = 5: the boundary prompt is decoded both ways (3 vanilla, 3 mixed prompts): it ran, it counts."""
  cost, pairs, _ = _run('pilaf', NO_EOS)
  assert cost['policy_decode_tokens_executed'] == 12 * (P + R)
  assert cost['ref_decode_tokens_executed'] == 6 * (P + R)
  assert cost['ref_scoring_tokens_executed'] == 6 * (P + R)  # The vanilla rows' reference pass.
  cost, pairs, _ = _run('pilaf', NO_EOS, b=5)
  assert cost['pairs'] == 5
  assert cost['policy_decode_tokens_executed'] == (2 * 3 + 2 * 3) * (P + R)
  assert cost['ref_decode_tokens_executed'] == 2 * 3 * (P + R)
  assert cost['ref_scoring_tokens_executed'] == 2 * 3 * (P + R)
  assert cost['policy_decode_sequences'] == 12 and cost['ref_decode_sequences'] == 6


def test_best_of_n_counts_the_discarded_samples():
  cost, _, _ = _run('best_of_n', NO_EOS, best_of_n=4)
  assert cost['policy_decode_tokens_executed'] == 4 * B * (P + R)
  assert cost['ref_scoring_tokens_executed'] == 4 * B * (P + R)
  assert cost['oracle_responses'] == 2 * B


def test_t_pilaf_scores_every_enumerated_response():
  r = 2
  cost, _, _ = _run('t_pilaf', TINY_ALLOWED, b=2, r=r)
  e = 1 + 2 + 4  # Responses of <= 2 tokens over 2 content tokens.
  assert cost['policy_scoring_tokens_executed'] == cost['ref_scoring_tokens_executed'] == 2 * e * (P + r)
  assert cost['policy_decode_tokens_executed'] == 0


def test_costs_add_and_old_label_stores_still_load(tmp_path):
  cost, pairs, _ = _run('vanilla', NO_EOS)
  total = pairs.cost + pairs.cost
  assert total.as_dict()['policy_decode_tokens_executed'] == 2 * cost['policy_decode_tokens_executed']
  host = jax.tree.map(np.asarray, pairs)
  host = host.replace(prompts=host.prompts.replace(ids=np.arange(B, dtype=np.int32)))
  store = LabelStore(str(tmp_path / 'labels.sqlite'), {'x': 1})
  store.put('b0', 0, 'vanilla', PreferenceBatch(host, np.ones(B, bool)), np.zeros((B, 2)))
  assert store.get('b0')[0].pairs.cost.as_dict() == cost
  store.close()
  # A store written before the executed counters existed: they read as 0, the old fields as written.
  db = sqlite3.connect(str(tmp_path / 'labels.sqlite'))
  old = {k: v for k, v in cost.items() if not k.endswith('_executed')}
  db.execute('UPDATE batches SET cost=?', (json.dumps(old),))
  db.commit()
  db.close()
  store = LabelStore(str(tmp_path / 'labels.sqlite'), {'x': 1})
  loaded = store.get('b0')[0].pairs.cost.as_dict()
  store.close()
  assert {k: loaded[k] for k in old} == old
  assert all(loaded[k] == 0 for k in loaded if k.endswith('_executed'))
  assert (SamplingCost.zero() + _store_cost(loaded)).as_dict() == loaded


def _store_cost(d):
  return SamplingCost(**{k: np.int32(v) for k, v in d.items()})


def test_evaluation_rows_carry_the_executed_counters():
  cost, pairs, _ = _run('vanilla', NO_EOS)
  run = types.SimpleNamespace(labels_used=jnp.int32(B))
  row = evaluation_row(lambda p, r: {'reward': 0.0}, None, None, run, CostTotals().add(pairs.cost), 1)
  for m in ('policy', 'ref'):
    for kind in ('decode', 'scoring'):
      assert row[f'{m}_{kind}_tokens_executed'] == cost[f'{m}_{kind}_tokens_executed']
      assert row[f'{m}_{kind}_tokens'] == cost[f'{m}_{kind}_tokens']
  assert row['decode_sequences_per_pair'] == 2.0


def test_run_totals_do_not_wrap_at_int32():
  """A paper-scale run decodes billions of tokens: totals are host integers, not int32 arrays."""
  big = SamplingCost.zero().replace(policy_decode_tokens=jnp.int32(2**31 - 1), pairs=jnp.int32(7))
  totals = CostTotals().add(big).add(big).add(big)
  assert totals.as_dict()['policy_decode_tokens'] == 3 * (2**31 - 1) and totals.as_dict()['pairs'] == 21
  assert CostTotals(json.loads(json.dumps(totals.as_dict()))).as_dict() == totals.as_dict()  # Via meta.
