"""Agreement statistics of the labelling queue's answers, for the run owner: per labeller, and per pair
of labellers. Read from one consistent snapshot of the queue's tables (the caller's transaction)."""
from __future__ import annotations

import sqlite3


def labeller_report(db: sqlite3.Connection) -> dict:
  """Per labeller: answers (all choices), skips, ties, and agreement with the stored oracle reward
  (share of its a/b answers that pick the response with the higher reward; None without rewards;
  pairs with equal rewards are left out); per pair of labellers: queries both answered (not
  skipped) and the share on which they chose the same."""
  names = [r[0] for r in db.execute('SELECT name FROM queue_labellers ORDER BY name')]
  answers = db.execute(
      'SELECT x.labeller, x.query_id, x.choice, q.oracle_reward_a, q.oracle_reward_b '
      'FROM queue_answers x JOIN queue_queries q USING (query_id)').fetchall()
  per = {n: {'name': n, 'answers': 0, 'skips': 0, 'ties': 0, 'agree': 0, 'n_oracle': 0} for n in names}
  choices: dict[str, dict[int, str]] = {n: {} for n in names}
  for name, qid, choice, ra, rb in answers:
    p = per.setdefault(name, {'name': name, 'answers': 0, 'skips': 0, 'ties': 0, 'agree': 0, 'n_oracle': 0})
    p['answers'] += 1
    p['skips'] += choice == 'skip'
    p['ties'] += choice == 'tie'
    if choice != 'skip':
      choices.setdefault(name, {})[qid] = choice
    if choice in ('a', 'b') and ra is not None and rb is not None and ra != rb:
      p['n_oracle'] += 1
      p['agree'] += (choice == 'a') == (ra > rb)
  labellers = []
  for p in per.values():
    agree, n = p.pop('agree'), p['n_oracle']
    labellers.append({'name': p['name'], 'answers': p['answers'], 'skips': p['skips'], 'ties': p['ties'],
                      'agree_with_oracle': agree / n if n else None, 'n_oracle': n})
  ordered = sorted(per)
  pairwise = []
  for i, a in enumerate(ordered):
    for b in ordered[i + 1:]:
      both = set(choices.get(a, {})) & set(choices.get(b, {}))
      same = sum(choices[a][q] == choices[b][q] for q in both)
      pairwise.append({'a': a, 'b': b, 'overlap': len(both), 'agreement': same / len(both) if both else None})
  return {'labellers': labellers, 'pairwise': pairwise}
