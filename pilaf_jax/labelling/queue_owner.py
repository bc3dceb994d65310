"""The run owner's view of the labelling queue's unresolved queries: who holds them, who skipped them,
who may still answer them, and which are stuck. Read on the caller's snapshot of the queue's tables.

Skips: a skip is stored as that labeller's answer and hands the query to someone else. When nobody
else may answer it any more (every other labeller has answered it, so its deciding answers can never
reach answers_per_query without the skipper), it is stuck: LabelQueue.next_query offers it again to
the skipper once they have nothing else to do, and their next answer replaces the skip. The run
owner sees such queries (`LabelQueue.waiting()`) and can `drop()` one (resolve it from the answers
in) or `reassign()` it to someone.
"""
from __future__ import annotations

import sqlite3
from typing import Optional


def waiting(db: sqlite3.Connection, answers_per_query: int, cutoff: float, batch_key: Optional[str] = None,
            limit: int = 50) -> list[dict]:
  """LabelQueue.waiting's rows; assignments made at or before `cutoff` have expired."""
  sql = 'SELECT query_id, batch_key, row FROM queue_queries WHERE resolved=0'
  args: tuple = ()
  if batch_key is not None:
    sql, args = sql + ' AND batch_key=?', (batch_key,)
  queries = db.execute(sql + ' ORDER BY query_id', args).fetchall()
  names = [r[0] for r in db.execute('SELECT name FROM queue_labellers ORDER BY name')]
  answers: dict = {}
  holders: dict = {}
  if queries:
    first = queries[0][0]
    for qid, name, choice in db.execute('SELECT query_id, labeller, choice FROM queue_answers '
                                        'WHERE query_id>=? ORDER BY answer_id', (first,)):
      answers.setdefault(qid, {})[name] = choice
    for qid, name in db.execute('SELECT query_id, labeller FROM queue_assignments WHERE query_id>=? '
                                'AND assigned>? ORDER BY labeller', (first, cutoff)):
      holders.setdefault(qid, []).append(name)
  out = []
  for qid, key, row in queries:
    given = answers.get(qid, {})
    deciding = sum(c != 'skip' for c in given.values())
    may_answer = [n for n in names if n not in given]
    out.append({'query_id': qid, 'batch_key': key, 'row': row, 'deciding': deciding,
                'needed': answers_per_query, 'holders': holders.get(qid, []),
                'skipped_by': sorted(n for n, c in given.items() if c == 'skip'), 'may_answer': may_answer,
                'stuck': deciding + len(may_answer) < answers_per_query})
  out.sort(key=lambda w: (not w['stuck'], w['query_id']))
  return out[:limit]


def describe_waiting(waiting: list[dict], limit: int = 4) -> str:
  """One line on what a batch waits for (LabelQueue.waiting's rows): each open query, its answers,
  who holds it, who skipped it and who may still answer it."""
  if not waiting:
    return 'no query is open'
  parts = []
  for w in waiting[:limit]:
    bits = [f'row {w["row"]}', f'{w["deciding"]}/{w["needed"]} answers']
    if w['holders']:
      bits.append('on screen for ' + ', '.join(w['holders']))
    if w['skipped_by']:
      bits.append('skipped by ' + ', '.join(w['skipped_by']))
    bits.append('may answer: ' + (', '.join(w['may_answer']) or 'nobody'))
    if w['stuck'] and w['skipped_by']:
      bits.append(f'needs {" or ".join(w["skipped_by"])} again (offered back once they have nothing else; '
                  'the owner page can drop or reassign it)')
    elif w['stuck']:
      bits.append('fewer labellers than answers needed: add one, or drop it on the owner page')
    parts.append(f'query {w["query_id"]} ({"; ".join(bits)})')
  more = f' and {len(waiting) - limit} more' if len(waiting) > limit else ''
  return ', '.join(parts) + more

