"""The label store: bit-exact round trips, durability under SIGKILL, the config fingerprint, counts."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost
from pilaf_jax.labelling.label_store import LabelStore, LabelStoreMismatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINGERPRINT = {'seed': 0, 'beta': 0.1, 'task.response_len': 6, 'sampler.name': 'pilaf'}


def make_batch(seed: int, b: int = 5, p: int = 4, r: int = 6):
  """A labelled batch of numpy arrays with awkward float32 values, and its oracle rewards."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, 1 << 20, size=(b, p)).astype(np.int32)
  tokens[0, 0] = np.iinfo(np.int32).min  # Extremes survive the byte encoding.
  tokens[0, 1] = np.iinfo(np.int32).max
  prompt_mask = rs.rand(b, p) < 0.7
  responses = rs.randint(-5, 70_000, size=(b, 2, r)).astype(np.int32)
  response_mask = rs.rand(b, 2, r) < 0.6
  policy_lp = (rs.randn(b, 2, r) * 3).astype(np.float32)
  ref_lp = (rs.randn(b, 2, r) * 3).astype(np.float32)
  # Values a decimal or float64 round trip would change: -0.0, subnormals, infinities, NaN payloads.
  policy_lp[0, 0, :5] = [-0.0, np.float32(1e-45), -np.inf, np.finfo(np.float32).max, np.float32(1 / 3)]
  policy_lp[0, 1, 0] = np.frombuffer(np.uint32(0x7FC00123).tobytes(), np.float32)[0]  # A NaN payload.
  ref_lp[1, 0, 0] = np.nextafter(np.float32(-1.0), np.float32(0.0))
  source = rs.randint(0, 4, size=(b, 2)).astype(np.int8)
  cost = SamplingCost(*[np.int32(v) for v in rs.randint(0, 1 << 30, size=8)])
  prompt_ids = rs.permutation(1 << 20)[:b].astype(np.int32)
  pairs = PairBatch(PromptBatch(tokens, prompt_mask, prompt_ids), responses, response_mask, policy_lp, ref_lp, source,
                    cost)
  labelled = PreferenceBatch(pairs, rs.rand(b) < 0.5)
  rewards = rs.randn(b, 2) * 1e3
  rewards[0, 0] = 1 / 3  # float64 precision kept.
  return labelled, rewards


def log_legacy_query(path: str, batch_key: str, num_pairs: int) -> None:
  """What a run made before the labelling queue wrote before asking its oracle about a batch: a row
  of the store's query log (oracle_queries), committed."""
  db = sqlite3.connect(path, timeout=60)
  with db:
    db.execute('INSERT INTO oracle_queries (batch_key, num_pairs, pid, time) VALUES (?,?,?,?)',
               (batch_key, num_pairs, os.getpid(), time.time()))
  db.close()


def batch_keys(store: LabelStore) -> list:
  """The labelled batches' keys in commit order."""
  return list(dict.fromkeys(r['batch_key'] for r in store.iter_rows()))


def assert_bit_equal(actual, expected, name):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, name
  assert actual.dtype == expected.dtype, f'{name}: {actual.dtype} != {expected.dtype}'
  assert actual.tobytes() == expected.tobytes(), name


def assert_batch_equal(got, labelled, rewards):
  batch, got_rewards = got
  p, q = batch.pairs, labelled.pairs
  assert_bit_equal(p.prompts.tokens, q.prompts.tokens, 'prompt tokens')
  assert_bit_equal(p.prompts.mask, q.prompts.mask, 'prompt mask')
  assert_bit_equal(p.prompts.ids, q.prompts.ids, 'prompt ids')
  for name in ('responses', 'response_mask', 'policy_logprobs', 'ref_logprobs', 'source'):
    assert_bit_equal(getattr(p, name), getattr(q, name), name)
  assert_bit_equal(batch.a_preferred, labelled.a_preferred, 'a_preferred')
  assert_bit_equal(got_rewards, np.asarray(rewards, np.float64), 'oracle rewards')
  assert p.cost.as_dict() == q.cost.as_dict()


def test_put_get_round_trip_is_bit_exact(tmp_path):
  store = LabelStore(str(tmp_path / 'labels.sqlite'), FINGERPRINT)
  batches = {f'online/{i:06d}': make_batch(i) for i in range(3)}
  for i, (key, (labelled, rewards)) in enumerate(batches.items()):
    store.put(key, i, 'pilaf', labelled, rewards)
  assert store.get('online/000099') is None
  for key, (labelled, rewards) in batches.items():
    assert_batch_equal(store.get(key), labelled, rewards)
  store.close()
  # And from a fresh connection (what a resumed run sees).
  store = LabelStore(str(tmp_path / 'labels.sqlite'), FINGERPRINT)
  for key, (labelled, rewards) in batches.items():
    assert_batch_equal(store.get(key), labelled, rewards)
  assert batch_keys(store) == list(batches)
  store.close()


def test_a_key_is_written_once(tmp_path):
  store = LabelStore(str(tmp_path / 'labels.sqlite'), FINGERPRINT)
  labelled, rewards = make_batch(0)
  store.put('online/000000', 0, 'pilaf', labelled, rewards)
  other, other_rewards = make_batch(1)
  with pytest.raises(sqlite3.IntegrityError):
    store.put('online/000000', 0, 'pilaf', other, other_rewards)
  assert_batch_equal(store.get('online/000000'), labelled, rewards)  # The failed write left nothing.
  assert store.counts()['labelled_pairs'] == 5
  store.close()


_CHILD = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_label_store import FINGERPRINT, log_legacy_query, make_batch
    from pilaf_jax.labelling.label_store import LabelStore
    store = LabelStore({path!r}, FINGERPRINT)
    log_legacy_query({path!r}, 'online/000007', 5)
    labelled, rewards = make_batch(7)
    store.put('online/000007', 7, 'pilaf', labelled, rewards)
    log_legacy_query({path!r}, 'online/000008', 5)  # Asked, never answered.
    print('committed', flush=True)
    time.sleep(600)
''')


def _sigkill_after_commit(child_code: str, path: str) -> None:
  """Runs child_code (a template of repo, tests, path) until it prints 'committed', then SIGKILLs it:
  no close, no WAL checkpoint, so only what was committed survives."""
  code = child_code.format(repo=REPO, tests=os.path.dirname(os.path.abspath(__file__)), path=path)
  child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  try:
    assert child.stdout.readline().strip() == 'committed', child.stderr.read()
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()


def test_committed_batch_survives_sigkill(tmp_path):
  path = str(tmp_path / 'labels.sqlite')
  _sigkill_after_commit(_CHILD, path)
  store = LabelStore(path, FINGERPRINT)
  labelled, rewards = make_batch(7)
  assert_batch_equal(store.get('online/000007'), labelled, rewards)
  assert store.get('online/000008') is None
  assert store.counts() == {'labelled_pairs': 5, 'queried_pairs': 10, 'queried_twice': 0, 'pending_pairs': 0}
  store.close()


def test_refuses_a_store_of_another_config_and_names_the_fields(tmp_path):
  path = str(tmp_path / 'labels.sqlite')
  store = LabelStore(path, FINGERPRINT)
  labelled, rewards = make_batch(0)
  store.put('online/000000', 0, 'pilaf', labelled, rewards)
  store.close()
  other = dict(FINGERPRINT, seed=1, **{'sampler.name': 'vanilla', 'dpo.batch_size': 8})
  del other['beta']
  with pytest.raises(LabelStoreMismatch) as info:
    LabelStore(path, other)
  message = str(info.value)
  assert 'seed: 0 -> 1' in message
  assert "sampler.name: 'pilaf' -> 'vanilla'" in message
  assert "dpo.batch_size: '<absent>' -> 8" in message
  assert "beta: 0.1 -> '<absent>'" in message
  assert 'task.response_len' not in message  # Only the fields that differ.
  # The refusal changed nothing: the original config still opens the store with its labels.
  store = LabelStore(path, FINGERPRINT)
  assert_batch_equal(store.get('online/000000'), labelled, rewards)
  store.close()


def test_fingerprint_compares_json_normalised_values(tmp_path):
  """A tuple saved as a JSON list, or an int that JSON keeps as an int, is not a difference."""
  path = str(tmp_path / 'labels.sqlite')
  LabelStore(path, dict(FINGERPRINT, shape=(1, 2))).close()
  LabelStore(path, dict(FINGERPRINT, shape=[1, 2])).close()
  with pytest.raises(LabelStoreMismatch, match=r'shape: \[1, 2\] -> \[1, 3\]'):
    LabelStore(path, dict(FINGERPRINT, shape=(1, 3)))


def test_counts_and_queried_twice(tmp_path):
  path = str(tmp_path / 'labels.sqlite')
  store = LabelStore(path, FINGERPRINT)
  assert store.counts() == {'labelled_pairs': 0, 'queried_pairs': 0, 'queried_twice': 0, 'pending_pairs': 0}
  log_legacy_query(path, 'online/000000', 5)
  labelled, rewards = make_batch(0)
  store.put('online/000000', 0, 'pilaf', labelled, rewards)
  assert store.counts() == {'labelled_pairs': 5, 'queried_pairs': 5, 'queried_twice': 0, 'pending_pairs': 0}
  # A crash between asking and committing: the resumed run asks again for the same batch.
  log_legacy_query(path, 'online/000001', 5)
  log_legacy_query(path, 'online/000001', 5)
  labelled, rewards = make_batch(1)
  store.put('online/000001', 1, 'pilaf', labelled, rewards)
  assert store.counts() == {'labelled_pairs': 10, 'queried_pairs': 15, 'queried_twice': 5, 'pending_pairs': 0}
  log_legacy_query(path, 'online/000001', 5)  # A third time.
  log_legacy_query(path, 'iteration000/chunk00000', 3)
  assert store.counts() == {'labelled_pairs': 10, 'queried_pairs': 23, 'queried_twice': 10, 'pending_pairs': 0}
  store.close()


def test_iter_rows_exports_every_pair(tmp_path):
  store = LabelStore(str(tmp_path / 'labels.sqlite'), FINGERPRINT)
  batches = [('iteration000/chunk00000', 0, 'vanilla', *make_batch(3, b=2)),
             ('iteration000/chunk00001', 0, 'vanilla', *make_batch(4, b=3)),
             ('iteration001/chunk00000', 8, 'pilaf', *make_batch(5, b=2))]
  for key, step, sampler, labelled, rewards in batches:
    store.put(key, step, sampler, labelled, rewards)
  rows = list(store.iter_rows())
  assert [(r['batch_key'], r['row']) for r in rows] == [(k, i) for k, _, _, lab, _ in batches
                                                         for i in range(lab.pairs.size)]
  it = iter(rows)
  for key, step, sampler, labelled, rewards in batches:
    p = labelled.pairs
    for i in range(p.size):
      row = next(it)
      assert (row['step'], row['sampler']) == (step, sampler)
      assert row['prompt_id'] == int(p.prompts.ids[i])
      assert row['prompt'] == p.prompts.tokens[i].tolist()
      assert row['prompt_mask'] == p.prompts.mask[i].tolist()
      for j, side in enumerate('ab'):
        assert row[f'response_{side}'] == p.responses[i, j].tolist()
        assert row[f'mask_{side}'] == p.response_mask[i, j].tolist()
        for name in ('policy_logprobs', 'ref_logprobs'):
          got = np.asarray(row[f'{name}_{side}'], np.float32)
          assert got.tobytes() == getattr(p, name)[i, j].tobytes(), (key, i, name, side)
        assert row[f'source_{side}'] == int(p.source[i, j])
        assert row[f'oracle_reward_{side}'] == rewards[i, j]
      assert row['a_preferred'] is bool(labelled.a_preferred[i])
  store.close()


# --- pending batches (sampled, waiting for the labelling queue) ---

@pytest.fixture
def store_and_queue(tmp_path):
  """A label store and the labelling queue in its file; both closed after the test."""
  from pilaf_jax.labelling.queue import LabelQueue
  path = str(tmp_path / 'labels.sqlite')
  store, queue = LabelStore(path, FINGERPRINT), LabelQueue(path)
  yield store, queue
  queue.close()
  store.close()


def _queries(labelled) -> list[dict]:
  p = labelled.pairs
  return [dict(row=i, prompt_id=int(p.prompts.ids[i]), prompt_text=f'prompt {i}', response_a_text='a',
               response_b_text='b', source_a=int(p.source[i, 0]), source_b=int(p.source[i, 1]))
          for i in range(p.size)]


def test_pending_batch_round_trip_and_commit(store_and_queue):
  store, queue = store_and_queue
  labelled, rewards = make_batch(0)
  assert store.status('online/000000') == 'absent'
  assert store.put_pending(queue, 'online/000000', 3, 'pilaf', labelled.pairs, rewards, _queries(labelled), 0)
  assert store.status('online/000000') == 'pending' and queue.batch_progress('online/000000') == (0, 5)
  assert store.get('online/000000') is None
  assert store.counts() == {'labelled_pairs': 0, 'queried_pairs': 5, 'queried_twice': 0, 'pending_pairs': 5}
  # Enqueueing the key again (a restarted loop) writes nothing, arrays included.
  other, other_rewards = make_batch(1)
  assert not store.put_pending(queue, 'online/000000', 3, 'pilaf', other.pairs, other_rewards, _queries(other))
  assert store.commit_resolved('online/000000', labelled.a_preferred)
  assert not store.commit_resolved('online/000000', labelled.a_preferred)  # Idempotent.
  assert store.status('online/000000') == 'labelled'
  # The pending arrays, bit-exact (the second put_pending wrote nothing), now with their labels.
  assert_batch_equal(store.get('online/000000'), labelled, rewards)
  assert store.counts() == {'labelled_pairs': 5, 'queried_pairs': 5, 'queried_twice': 0, 'pending_pairs': 0}
  assert [r['batch_key'] for r in store.iter_rows()] == ['online/000000'] * 5
  with pytest.raises(KeyError):
    store.commit_resolved('online/000001', labelled.a_preferred)


def test_pending_batch_and_queries_are_one_transaction(store_and_queue):
  """A failure while writing the arrays leaves no queries behind (and the reverse)."""
  from pilaf_jax.labelling.queue import QueueError
  store, queue = store_and_queue
  labelled, rewards = make_batch(0)
  bad = labelled.pairs.replace(source=labelled.pairs.source[:2])  # Row 2 has no source: fails mid-write.
  with pytest.raises(IndexError):
    store.put_pending(queue, 'b', 0, 'pilaf', bad, rewards, _queries(labelled))
  assert queue.batch_progress('b') == (0, 0) and store.status('b') == 'absent'
  broken = _queries(labelled)
  del broken[3]['prompt_text']
  with pytest.raises(QueueError):
    store.put_pending(queue, 'b', 0, 'pilaf', labelled.pairs, rewards, broken)
  assert queue.batch_progress('b') == (0, 0) and store.status('b') == 'absent'
  assert store.put_pending(queue, 'b', 0, 'pilaf', labelled.pairs, rewards, _queries(labelled))


def test_missing_rewards_are_nan(store_and_queue):
  """Without a function oracle (people label), the rewards are stored as NULL and read as NaN."""
  store, queue = store_and_queue
  labelled, _ = make_batch(2)
  store.put_pending(queue, 'b', 0, 'pilaf', labelled.pairs, None, _queries(labelled))
  store.commit_resolved('b', labelled.a_preferred)
  assert np.isnan(store.get('b')[1]).all()
  assert all(r['oracle_reward_a'] is None for r in store.iter_rows())


_PENDING_CHILD = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_label_store import FINGERPRINT, make_batch, _queries
    from pilaf_jax.labelling.label_store import LabelStore
    from pilaf_jax.labelling.queue import LabelQueue
    store = LabelStore({path!r}, FINGERPRINT)
    queue = LabelQueue({path!r})
    labelled, rewards = make_batch(9)
    store.put_pending(queue, 'online/000009', 9, 'pilaf', labelled.pairs, rewards, _queries(labelled))
    print('committed', flush=True)
    time.sleep(600)
''')


def test_pending_batch_survives_sigkill(tmp_path):
  from pilaf_jax.labelling.queue import LabelQueue
  path = str(tmp_path / 'labels.sqlite')
  _sigkill_after_commit(_PENDING_CHILD, path)
  store, queue = LabelStore(path, FINGERPRINT), LabelQueue(path)
  labelled, rewards = make_batch(9)
  assert store.status('online/000009') == 'pending'
  assert queue.batch_progress('online/000009') == (0, 5)
  # The pending arrays survived bit-exact: committing the labels moves them, unchanged.
  assert store.commit_resolved('online/000009', labelled.a_preferred)
  assert_batch_equal(store.get('online/000009'), labelled, rewards)
  queue.close()
  store.close()


def test_fields_added_since_match_at_their_default(tmp_path):
  path = str(tmp_path / 'labels.sqlite')
  LabelStore(path, FINGERPRINT).close()
  defaults = {'labelling.max_staleness': 0, 'seed': 0}
  LabelStore(path, dict(FINGERPRINT, **{'labelling.max_staleness': 0}), defaults=defaults).close()
  with pytest.raises(LabelStoreMismatch, match="labelling.max_staleness: '<absent>' -> 2"):
    LabelStore(path, dict(FINGERPRINT, **{'labelling.max_staleness': 2}), defaults=defaults)


def test_empty_batch_matches_what_the_store_returns(tmp_path):
  """A process without the store receives a broadcast into empty_preference_batch: same tree, shapes
  and dtypes as LabelStore.get's batch, or the broadcast would not line up."""
  import jax
  from pilaf_jax.labelling.label_store import empty_preference_batch
  store = LabelStore(str(tmp_path / 'labels.sqlite'), FINGERPRINT)
  labelled, rewards = make_batch(0)
  store.put('b', 0, 'pilaf', labelled, rewards)
  got, _ = store.get('b')
  store.close()
  empty = empty_preference_batch(5, 4, 6)
  assert jax.tree.structure(empty) == jax.tree.structure(got)
  for x, y in zip(jax.tree.leaves(empty), jax.tree.leaves(got)):
    assert (np.shape(x), np.asarray(x).dtype) == (np.shape(y), np.asarray(y).dtype)
