"""The labelling queue (pilaf_jax/labelling/queue.py): assignment, k answers and majority, ties, refused
calls that change nothing, expiry of assignments, tokens, settings, function-oracle answers, reports,
and concurrent labellers (threads and processes) that neither lose nor duplicate an answer."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import stored_query
from pilaf_jax.labelling import queue as lq
from pilaf_jax.labelling.queue import (AlreadyAnswered, BadChoice, LabelQueue, NotAssigned, QueryResolved,
                                       QueueError, QueueSettingsMismatch, UnknownLabeller, UnknownQuery)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def queries(n: int, rewards=None, first_prompt: int = 0) -> list[dict]:
  out = []
  for i in range(n):
    q = dict(row=i, prompt_id=first_prompt + i, prompt_text=f'prompt {first_prompt + i}',
             response_a_text=f'a{i}', response_b_text=f'b{i}', source_a=0, source_b=i % 4)
    if rewards is not None:
      q.update(oracle_reward_a=rewards[i][0], oracle_reward_b=rewards[i][1])
    out.append(q)
  return out


def queue_of(path: str, batch_queries: list[dict], labellers, **settings) -> LabelQueue:
  """A queue holding one batch 'b' (step 0, pilaf) of batch_queries, with these labellers added."""
  q = LabelQueue(path, **settings)
  q.enqueue('b', 0, 'pilaf', batch_queries)
  for name in labellers:
    q.add_labeller(name)
  return q


def dump(path: str) -> list[str]:
  """Every row of the queue's tables, for 'changed nothing' checks."""
  db = sqlite3.connect(path)
  try:
    return [line for line in db.iterdump() if 'queue_' in line]
  finally:
    db.close()


def resolution(path: str, query_id: int) -> tuple:
  db = sqlite3.connect(path)
  try:
    return db.execute('SELECT resolved, a_preferred, resolution FROM queue_queries WHERE query_id=?',
                      (query_id,)).fetchone()
  finally:
    db.close()


@pytest.fixture
def path(tmp_path):
  return str(tmp_path / 'labels.sqlite')


def test_enqueue_is_idempotent_and_status_follows_answers(path):
  q = LabelQueue(path)
  assert q.batch_progress('online/000000') == (0, 0)  # Absent.
  assert q.enqueue_batch('online/000000', 0, 'pilaf', queries(3)) is True
  assert q.batch_progress('online/000000') == (0, 3)  # Pending.
  before = dump(path)
  changed = [dict(x, prompt_text='other') for x in queries(5)]
  assert q.enqueue_batch('online/000000', 7, 'vanilla', changed) is False  # A restart re-enqueues: no-op.
  q.enqueue('online/000000', 7, 'vanilla', changed)
  assert dump(path) == before
  assert q.resolved_labels('online/000000') is None
  name = q.add_oracle_labeller('deterministic')
  work = q.oracle_work('online/000000', name)
  assert [row for _, row in work.todo] == [0, 1, 2]
  for (qid, row), choice in zip(work.todo, 'aba'):
    q.oracle_answer(qid, name, choice)
    assert q.batch_progress('online/000000') == (row + 1, 3)
  assert q.batch_progress('online/000000') == (3, 3)  # Resolved.
  np.testing.assert_array_equal(q.resolved_labels('online/000000'), [True, False, True])
  assert q.pending_batches() == []
  q.close()


def test_assignment_answer_and_refusals_change_nothing(path):
  q = LabelQueue(path)
  q.enqueue('online/000000', 0, 'pilaf', queries(3))
  alice, bob = q.add_labeller('alice'), q.add_labeller('bob')
  assert q.labeller_for_token(alice) == 'alice' and q.labeller_for_token(bob) == 'bob'
  first = q.next_query('alice')
  assert (first.batch_key, first.row, first.prompt_text, first.response_b_text, first.source_b) == \
      ('online/000000', 0, 'prompt 0', 'b0', 0)
  assert q.next_query('alice') == first  # A reload shows the same pair.
  second = q.next_query('bob')  # k = 1: the first is taken.
  assert second.row == 1
  before = dump(path)
  refused = [
      (lambda: q.labeller_for_token('not-a-token'), UnknownLabeller, 401),
      (lambda: q.labeller_for_token(''), UnknownLabeller, 401),
      (lambda: q.next_query('mallory'), UnknownLabeller, 401),
      (lambda: q.answer(first.query_id, 'mallory', 'a'), UnknownLabeller, 401),
      (lambda: q.answer(9999, 'alice', 'a'), UnknownQuery, 404),
      (lambda: q.answer(first.query_id, 'bob', 'a'), NotAssigned, 403),
      (lambda: q.answer(first.query_id, 'alice', 'maybe'), BadChoice, 400),
      (lambda: q.answer(first.query_id, 'alice', 'tie'), BadChoice, 400),  # Ties are off.
      (lambda: q.oracle_answer(first.query_id, 'alice', 'a'), NotAssigned, 403),  # People need assignments.
  ]
  for call, error, status in refused:
    with pytest.raises(error) as info:
      call()
    assert info.value.http_status == status and str(info.value)
    assert dump(path) == before, error
  assert q.answer(first.query_id, 'alice', 'b') == {'query_id': first.query_id, 'resolved': True,
                                                    'a_preferred': False}
  after = dump(path)
  with pytest.raises(AlreadyAnswered) as info:  # A replay of the same request.
    q.answer(first.query_id, 'alice', 'b')
  assert info.value.http_status == 409
  assert dump(path) == after
  assert resolution(path, first.query_id) == (1, 0, 'majority')
  # Alice moves on to the oldest open query nobody holds.
  assert q.next_query('alice').row == 2
  q.close()


def test_k_answers_majority_ties_and_skips(path):
  names = ['l0', 'l1', 'l2', 'l3']
  q = queue_of(path, queries(5), names, answers_per_query=3, allow_ties=True)
  votes = {0: 'aab', 1: 'abb', 2: 'abt', 3: 'ttt', 4: 'bsab'}  # t = tie, s = skip.
  word = {'a': 'a', 'b': 'b', 't': 'tie', 's': 'skip'}
  ids = {}
  for row, seq in votes.items():  # Row by row: each labeller's oldest open query is the row under test.
    for labeller, v in zip(names, seq):
      query = q.next_query(labeller)
      assert query is not None and query.row == row, (row, labeller, query)
      ids[row] = query.query_id
      result = q.answer(query.query_id, labeller, word[v])
      deciding = sum(c != 's' for c in seq[:names.index(labeller) + 1])
      assert result['resolved'] == (deciding == 3), (row, labeller, result)
  assert resolution(path, ids[0]) == (1, 1, 'majority')
  assert resolution(path, ids[1]) == (1, 0, 'majority')
  for row in (2, 3):  # a/b draw with a tie vote, and three ties: the query's coin.
    assert resolution(path, ids[row]) == (1, int(lq.tie_coin(ids[row])), 'coin')
  assert resolution(path, ids[4]) == (1, 0, 'majority')  # b, (skip), a, b: the skip does not count.
  np.testing.assert_array_equal(q.resolved_labels('b'), [True, False, lq.tie_coin(ids[2]),
                                                         lq.tie_coin(ids[3]), False])
  assert q.counts() == {'queries': 5, 'resolved': 5, 'answers': 16, 'excess_answers': 0}
  # The coin is fair over many ids and fixed per id.
  coins = [lq.tie_coin(i) for i in range(2000)]
  assert 900 < sum(coins) < 1100 and coins == [lq.tie_coin(i) for i in range(2000)]
  q.close()


def test_next_query_counts_answers_and_live_assignments(path):
  q = queue_of(path, queries(2), ('alice', 'bob', 'carol'), answers_per_query=2)
  first = q.next_query('alice')
  assert q.next_query('bob') == first  # Two answers needed: two people may hold it.
  assert q.next_query('carol').row == 1
  q.answer(first.query_id, 'alice', 'a')
  # One answer in and bob still holds it: nobody else gets it.
  q.answer(q.next_query('carol').query_id, 'carol', 'b')
  assert q.next_query('carol') is None
  assert q.next_query('alice').row == 1  # Alice answered row 0; row 1 needs a second answer.
  q.close()


def test_assignments_expire(path):
  q = queue_of(path, queries(2), ('alice', 'bob', 'carol'), assignment_timeout_s=0.3)
  held = q.next_query('alice')
  assert q.next_query('bob').row == 1
  assert q.next_query('carol') is None
  time.sleep(0.4)  # Both assignments expire; bob's own comes back to him first.
  assert q.next_query('bob').row == 1
  taken = q.next_query('carol')
  assert taken == held
  # Alice's late answer is not lost: the query is unresolved, so it counts.
  assert q.answer(held.query_id, 'alice', 'a')['resolved']
  with pytest.raises(QueryResolved) as info:
    q.answer(held.query_id, 'carol', 'b')
  assert info.value.http_status == 409
  assert q.resolved_labels('b') is None and q.batch_progress('b') == (1, 2)
  q.close()


def test_a_skip_nobody_else_may_answer_comes_back_to_the_skipper(path):
  """k=2 with two labellers: bob's skip would leave a query nobody may answer (the run would wait
  forever); it comes back to bob once he has nothing else, his answer replaces the skip, and the
  batch resolves."""
  q = queue_of(path, queries(3), ('alice', 'bob'), answers_per_query=2)
  first = q.next_query('bob')
  assert q.answer(first.query_id, 'bob', 'skip')['resolved'] is False
  assert q.waiting('b')[0] == {'query_id': first.query_id, 'batch_key': 'b', 'row': 0, 'deciding': 0,
                               'needed': 2, 'holders': [], 'skipped_by': ['bob'], 'may_answer': ['alice'],
                               'stuck': True}
  line = lq.describe_waiting(q.waiting('b'))
  assert line.startswith(f'query {first.query_id} (row 0; 0/2 answers; skipped by bob; may answer: alice; '
                         'needs bob again'), line
  assert q.next_query('bob').row == 1  # New work first.
  for name in ('alice', 'bob'):
    while (query := q.next_query(name)) is not None and not q.skipped(query.query_id, name):
      q.answer(query.query_id, name, 'a')
  # Alice has answered everything; bob is offered his skipped query again.
  assert q.next_query('alice') is None
  again = q.next_query('bob')
  assert again == first and q.skipped(first.query_id, 'bob')
  assert q.next_query('bob') == first  # A reload shows it again.
  assert q.answer(first.query_id, 'bob', 'b')['resolved'] is True
  assert resolution(path, first.query_id) == (1, int(lq.tie_coin(first.query_id)), 'coin')  # a and b.
  np.testing.assert_array_equal(q.resolved_labels('b'), [lq.tie_coin(first.query_id), True, True])
  assert [a['choice'] for a in q.answers('bob')] == ['a', 'a', 'b']  # The skip is replaced, not doubled.
  assert q.counts() == {'queries': 3, 'resolved': 3, 'answers': 6, 'excess_answers': 0}
  assert q.waiting() == []
  with pytest.raises(AlreadyAnswered):
    q.answer(first.query_id, 'bob', 'a')
  q.close()


def test_a_skip_others_may_answer_is_not_offered_again(path):
  q = queue_of(path, queries(1), ('alice', 'bob', 'carol'), answers_per_query=2)
  qid = q.next_query('bob').query_id
  q.answer(qid, 'bob', 'skip')
  with pytest.raises(AlreadyAnswered):  # Skipping twice without the query coming back: a replay.
    q.answer(qid, 'bob', 'skip')
  q.answer(q.next_query('alice').query_id, 'alice', 'a')
  assert q.next_query('bob') is None  # Carol may still answer it.
  [w] = q.waiting()
  assert (w['deciding'], w['may_answer'], w['skipped_by'], w['stuck']) == (1, ['carol'], ['bob'], False)
  # The owner hands it to bob anyway: he gets it next, and his answer replaces his skip.
  q.reassign(qid, 'bob')
  assert q.next_query('bob').query_id == qid
  assert q.answer(qid, 'bob', 'b')['resolved'] is True
  assert resolution(path, qid) == (1, int(lq.tie_coin(qid)), 'coin')  # One a, one b: the coin.
  q.close()


def test_owner_drops_and_reassigns_with_clear_refusals(path):
  q = queue_of(path, queries(3, rewards=[(1.0, 0.0)] * 3), ('alice', 'bob'), answers_per_query=2)
  oracle = q.add_oracle_labeller('deterministic')
  q0 = q.next_query('alice').query_id
  q.answer(q0, 'alice', 'b')
  assert q.drop(q0) == {'query_id': q0, 'resolved': True, 'a_preferred': False}  # From alice's 'b'.
  assert resolution(path, q0) == (1, 0, 'dropped')
  q1 = q.next_query('alice').query_id
  assert q.drop(q1)['a_preferred'] == lq.tie_coin(q1)  # No deciding answer: the coin.
  q2 = q.next_query('alice').query_id
  q.answer(q2, 'alice', 'a')
  before = dump(path)
  for call, error in [(lambda: q.drop(q0), QueryResolved), (lambda: q.drop(2**63), UnknownQuery),
                      (lambda: q.drop(-1), UnknownQuery), (lambda: q.drop(10**6), UnknownQuery),
                      (lambda: q.reassign(q2, 'alice'), AlreadyAnswered),
                      (lambda: q.reassign(q2, 'nobody'), UnknownLabeller),
                      (lambda: q.reassign(q2, oracle), QueueError),
                      (lambda: q.reassign(q0, 'bob'), QueryResolved),
                      (lambda: q.answer(2**63, 'bob', 'a'), UnknownQuery),
                      (lambda: q.skipped(2**64, 'bob'), UnknownQuery)]:
    with pytest.raises(error):
      call()
    assert dump(path) == before
  q.close()


def test_tokens_are_hashed_and_replaced(path):
  q = LabelQueue(path)
  token = q.add_labeller('alice')
  assert len(token) >= 32
  with open(path, 'rb') as f:
    assert token.encode() not in f.read()
  new = q.add_labeller('alice')  # A lost token: a new one replaces it.
  assert q.labeller_for_token(new) == 'alice'
  with pytest.raises(UnknownLabeller):
    q.labeller_for_token(token)
  for bad in ('', 'x' * 65, 'oracle:me', 'tab\there'):
    with pytest.raises(QueueError):
      q.add_labeller(bad)
  assert q.add_oracle_labeller('bradley_terry') == 'oracle:bradley_terry'
  assert q.labellers() == ['alice', 'oracle:bradley_terry']
  q.close()


def test_settings_live_in_the_file(path):
  with pytest.raises(QueueError, match='does not exist'):
    LabelQueue.open_existing(path)
  LabelQueue(path, answers_per_query=3, allow_ties=True).close()
  server = LabelQueue.open_existing(path)
  assert (server.answers_per_query, server.allow_ties) == (3, True)
  server.close()
  with pytest.raises(QueueSettingsMismatch, match='answers_per_query: 3 in the file, 1 asked'):
    LabelQueue(path, answers_per_query=1, allow_ties=True)
  other = os.path.join(os.path.dirname(path), 'store_only.sqlite')
  sqlite3.connect(other).execute('CREATE TABLE meta (key TEXT)').connection.close()
  with pytest.raises(QueueError, match='no labelling queue'):
    LabelQueue.open_existing(other)
  with pytest.raises(QueueError):
    LabelQueue(path, answers_per_query=0)


def test_oracle_work_and_reports(path):
  q = LabelQueue(path, allow_ties=True)
  rewards = [(1.0, 0.0), (0.0, 2.0), (0.5, 0.5), (3.0, -1.0)]
  q.enqueue_batch('b', 4, 'pilaf', queries(4, rewards), oracle_index=17)
  q.enqueue('no_rewards', 5, 'pilaf', queries(1, [(None, float('nan'))], first_prompt=10))
  oracle = q.add_oracle_labeller('deterministic')
  work = q.oracle_work('b', oracle)
  assert work.oracle_index == 17 and work.rewards.tolist() == [list(r) for r in rewards]
  assert np.isnan(q.oracle_work('no_rewards', oracle).rewards).all()
  assert q.oracle_work('missing', oracle) is None
  q.oracle_answer(work.todo[0][0], oracle, 'a')
  assert [row for _, row in q.oracle_work('b', oracle).todo] == [1, 2, 3]
  with pytest.raises(AlreadyAnswered):
    q.oracle_answer(work.todo[0][0], oracle, 'b')
  with pytest.raises(QueryResolved):
    q.oracle_answer(work.todo[0][0], q.add_oracle_labeller('other'), 'b')
  for n in ('alice', 'bob'):
    q.add_labeller(n)
  # k = 1, taken in turns: alice row 1 'b', bob row 2 'b', alice row 3 'tie', bob no_rewards 'skip'
  # (a skip does not resolve it), alice no_rewards 'a'.
  answers = {'alice': ['b', 'tie', 'a'], 'bob': ['b', 'skip']}
  for _ in range(4):
    for n in ('alice', 'bob'):
      query = q.next_query(n)
      if query is not None:
        q.answer(query.query_id, n, answers[n].pop(0))
  assert answers == {'alice': [], 'bob': []}
  q.set_loop_step(12)
  assert q.progress() == {'answered': 5, 'pending': 0, 'loop_step': 12, 'answers': 6}
  report = q.labeller_report()
  by = {r['name']: r for r in report['labellers']}
  # alice: row 1 'b' agrees (2 > 0); the tie and the pair without rewards are left out.
  assert by['alice'] == {'name': 'alice', 'answers': 3, 'skips': 0, 'ties': 1, 'agree_with_oracle': 1.0,
                         'n_oracle': 1}
  # bob: row 2 has equal rewards (left out), and a skip.
  assert by['bob'] == {'name': 'bob', 'answers': 2, 'skips': 1, 'ties': 0, 'agree_with_oracle': None,
                       'n_oracle': 0}
  assert by['oracle:deterministic'] == {'name': 'oracle:deterministic', 'answers': 1, 'skips': 0, 'ties': 0,
                                        'agree_with_oracle': 1.0, 'n_oracle': 1}
  assert by['oracle:other']['agree_with_oracle'] is None and by['oracle:other']['answers'] == 0
  pairs = {(p['a'], p['b']): p for p in report['pairwise']}
  assert set(pairs) == {('alice', 'bob'), ('alice', 'oracle:deterministic'), ('alice', 'oracle:other'),
                        ('bob', 'oracle:deterministic'), ('bob', 'oracle:other'),
                        ('oracle:deterministic', 'oracle:other')}
  assert pairs[('alice', 'bob')]['overlap'] == 0 and pairs[('alice', 'bob')]['agreement'] is None
  assert pairs[('oracle:deterministic', 'oracle:other')] == {
      'a': 'oracle:deterministic', 'b': 'oracle:other', 'overlap': 0, 'agreement': None}
  q.close()


def test_report_agreement_figures(path):
  """k = 2, two people answer every query: overlap and agreement by hand."""
  q = queue_of(path, queries(4, [(1, 0), (1, 0), (0, 1), (0, 1)]), ('alice', 'bob'), answers_per_query=2,
               allow_ties=True)
  plan = {'alice': 'aabt', 'bob': 'abbs'}
  for n, seq in plan.items():
    for c in seq:
      query = q.next_query(n)
      q.answer(query.query_id, n, {'t': 'tie', 's': 'skip'}.get(c, c))
  report = q.labeller_report()
  by = {r['name']: r for r in report['labellers']}
  assert by['alice'] == {'name': 'alice', 'answers': 4, 'skips': 0, 'ties': 1, 'agree_with_oracle': 1.0,
                         'n_oracle': 3}
  assert by['bob'] == {'name': 'bob', 'answers': 4, 'skips': 1, 'ties': 0, 'agree_with_oracle': 2 / 3,
                       'n_oracle': 3}
  # Both answered rows 0-3 but bob skipped row 3: overlap 3 (rows 0, 1, 2), same choice on rows 0 and 2.
  assert report['pairwise'] == [{'a': 'alice', 'b': 'bob', 'overlap': 3, 'agreement': 2 / 3}]
  q.close()


def _check_no_loss(path: str, submitted: list, k: int, n_queries: int):
  """Every accepted answer is in the file exactly once; every query has exactly k answers."""
  db = sqlite3.connect(path)
  try:
    stored = db.execute('SELECT query_id, labeller, choice FROM queue_answers').fetchall()
    per_query = dict(db.execute('SELECT query_id, COUNT(*) FROM queue_answers GROUP BY query_id').fetchall())
    resolved = db.execute('SELECT COUNT(*) FROM queue_queries WHERE resolved=1').fetchone()[0]
  finally:
    db.close()
  assert sorted(stored) == sorted(submitted)  # None lost, none invented.
  q = LabelQueue.open_existing(path)
  assert [(a['query_id'], a['labeller'], a['choice']) for a in q.answers()] == stored  # Commit order.
  for name in {l for _, l, _ in stored}:
    assert q.answer_count(name) == len(q.answers(name)) == sum(l == name for _, l, _ in stored)
  q.close()
  assert len(stored) == len(set((q, l) for q, l, _ in stored))  # None duplicated.
  assert resolved == n_queries
  assert set(per_query.values()) == {k} and len(per_query) == n_queries


def test_concurrent_labeller_threads_lose_and_duplicate_nothing(path):
  k, n = 2, 60
  q = LabelQueue(path, answers_per_query=k)
  q.enqueue('b0', 0, 'pilaf', queries(n // 2))
  q.enqueue('b1', 1, 'pilaf', queries(n // 2))
  names = [f'p{i}' for i in range(6)]
  for name in names:
    q.add_labeller(name)
  submitted, errors, lock = [], [], threading.Lock()

  def work(name: str, seed: int):
    rs = np.random.RandomState(seed)
    while True:
      query = q.next_query(name)  # Each thread uses its own connection.
      if query is None:
        return
      choice = 'ab'[rs.randint(2)]
      try:
        q.answer(query.query_id, name, choice)
      except QueueError as e:
        with lock:
          errors.append(e)
        continue
      with lock:
        submitted.append((query.query_id, name, choice))

  threads = [threading.Thread(target=work, args=(name, i)) for i, name in enumerate(names)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors, errors[:3]  # No expiry here: every assignment is answered by its holder.
  _check_no_loss(path, submitted, k, n)
  q.close()


_PROCESS = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {repo!r})
    from pilaf_jax.labelling.queue import LabelQueue, QueueError
    q = LabelQueue.open_existing({path!r})
    name, role = sys.argv[1], sys.argv[2]
    done = []
    if role == 'oracle':  # Two processes run the same function oracle over the same batches.
      for key in q.pending_batches():
        work = q.oracle_work(key, name)
        for qid, row in work.todo:
          try:
            q.oracle_answer(qid, name, 'a' if work.rewards[row, 0] > work.rewards[row, 1] else 'b')
            done.append([qid, name, 'a' if work.rewards[row, 0] > work.rewards[row, 1] else 'b'])
          except QueueError as e:
            done.append(['refused', type(e).__name__])
    else:
      while True:
        query = q.next_query(name)
        if query is None:
          break
        choice = 'a' if query.row % 3 else 'b'
        try:  # The function oracle may have resolved it meanwhile.
          q.answer(query.query_id, name, choice)
          done.append([query.query_id, name, choice])
        except QueueError as e:
          done.append(['refused', type(e).__name__])
    print(json.dumps(done))
''')


def test_concurrent_processes_lose_and_duplicate_nothing(path):
  import json
  q = LabelQueue(path, answers_per_query=1)
  rs = np.random.RandomState(0)
  for b in range(4):
    q.enqueue_batch(f'b{b}', b, 'pilaf', queries(10, rs.randn(10, 2).tolist()), oracle_index=b)
  oracle = q.add_oracle_labeller('deterministic')
  for i in range(2):
    q.add_labeller(f'person{i}')
  code = _PROCESS.format(repo=REPO, path=path)
  roles = [(oracle, 'oracle'), (oracle, 'oracle'), ('person0', 'person'), ('person1', 'person')]
  procs = [subprocess.Popen([sys.executable, '-c', code, name, role], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for name, role in roles]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    results.append(json.loads(out))
  submitted = [tuple(r) for res in results for r in res if r[0] != 'refused']
  refused = [r for res in results for r in res if r[0] == 'refused']
  # Refused only where the query was answered already (by the other oracle process, or resolved).
  assert {r[1] for r in refused} <= {'AlreadyAnswered', 'QueryResolved'}
  _check_no_loss(path, submitted, 1, 40)
  # The function oracle's answers follow the rewards, whichever process gave them.
  for qid, name, choice in submitted:
    if name == oracle:
      query = stored_query(q.path, qid)
      work = q.oracle_work(query.batch_key, oracle)
      r = work.rewards[query.row]
      assert choice == ('a' if r[0] > r[1] else 'b')
  q.close()


def test_opening_never_disturbs_a_store_being_created(path, monkeypatch):
  """A server or worker polling open_existing while the run creates its store must neither open an
  empty or rollback-mode file (opening may change its journal mode under the run) nor, in the run,
  open an existing database file outside SQLite (closing that descriptor drops SQLite's locks)."""
  open(path, 'wb').close()  # What the run has made so far.
  with pytest.raises(QueueError, match='no labelling queue yet'):
    LabelQueue.open_existing(path)
  assert os.path.getsize(path) == 0 and not os.path.exists(path + '-wal')
  os.remove(path)
  from pilaf_jax.labelling.label_store import LabelStore
  store = LabelStore(path, {'x': 1})
  opened = []
  real_open = os.open

  def recording_open(p, *args, **kwargs):  # Records the descriptors actually opened.
    fd = real_open(p, *args, **kwargs)
    opened.append(os.fspath(p))
    return fd
  monkeypatch.setattr(os, 'open', recording_open)
  q = LabelQueue(path)
  monkeypatch.undo()
  assert os.path.abspath(path) not in map(os.path.abspath, opened), opened
  q.close()
  store.close()
  assert LabelQueue.open_existing(path).answers_per_query == 1
