"""What both loops share: the checkpointed run state, preemption handling, evaluation rows, the table."""
from __future__ import annotations

import signal
import time

import jax

from pilaf_jax.batches import CostTotals
from pilaf_jax.learning.train_state import RunState


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps: save, then exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def evaluation_row(evaluate, policy_params, ref_params, run: RunState, cost: CostTotals, step: int,
                   **extra) -> dict:
  """One metrics.jsonl row: the policy's evaluation plus labels and compute spent so far."""
  cost = cost.as_dict()
  pairs = max(cost['pairs'], 1)
  row = {'step': step, **extra, 'labels_used': int(run.labels_used),
         **evaluate(policy_params, ref_params),
         'oracle_responses': cost['oracle_responses'],
         'policy_decode_tokens': cost['policy_decode_tokens'], 'ref_decode_tokens': cost['ref_decode_tokens'],
         'policy_scoring_tokens': cost['policy_scoring_tokens'], 'ref_scoring_tokens': cost['ref_scoring_tokens'],
         # What actually ran (padding and finished rows included), beside the useful counts above.
         **{f'{m}_{kind}_tokens_executed': cost[f'{m}_{kind}_tokens_executed']
            for m in ('policy', 'ref') for kind in ('decode', 'scoring')},
         'decode_sequences_per_pair': (cost['policy_decode_sequences'] + cost['ref_decode_sequences']) / pairs
         if cost['pairs'] else 0.0}
  return row


def format_table(rows: list[dict]) -> str:
  """The final table printed on stdout."""
  lines = [f'{"step":>6} {"labels":>8} {"reward":>16} {"KL":>16} {"J":>16}']
  for r in rows:
    lines.append(f'{r["step"]:>6} {r["labels_used"]:>8} {r["reward"]:>8.3f} ± {r["reward_se"]:<5.3f} '
                 f'{r["kl"]:>8.3f} ± {r["kl_se"]:<5.3f} {r["J"]:>8.3f} ± {r["J_se"]:<5.3f}')
  return '\n'.join(lines)


class Timer:
  def __init__(self):
    self.start = time.time()

  def elapsed(self) -> float:
    return time.time() - self.start


def progress(total: int, initial: int, enabled: bool, desc: str):
  """A tqdm bar (process 0, when enabled), or a no-op with the same interface."""
  if enabled and jax.process_index() == 0:
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

  class _NoBar:
    def update(self, n=1):
      pass

    def set_postfix(self, *args, **kwargs):
      pass

    def close(self):
      pass
  return _NoBar()
