"""The change between two evaluation rows, with its paired standard error over held-out prompts.

Every evaluation scores the same held-out prompts with the same sampling noise, so two rows' rewards
are correlated prompt by prompt. The standard error of their difference is then the standard
deviation of the per-prompt differences over sqrt(n) (paired), not sqrt(SE_a^2 + SE_b^2) (what it
would be if the rows were independent, usually larger). Rows keep per-prompt values for this under
`per_prompt` (Evaluator); rows written before they did give the unpaired error only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

PER_PROMPT_KEYS = ('reward', 'kl')  # The per-prompt values an evaluation row keeps.
PER_PROMPT_DECIMALS = 4  # Rounded in the row: far below any standard error, and a compact file.


def per_prompt_values(values: np.ndarray) -> list[float]:
  """A row's compact per-prompt list."""
  return [round(float(v), PER_PROMPT_DECIMALS) for v in values]


@dataclasses.dataclass(frozen=True)
class Gain:
  """last[key] - first[key] with its standard errors (paired is None without per-prompt values)."""
  key: str
  first_step: int
  last_step: int
  first: float
  last: float
  unpaired_se: float
  paired_se: Optional[float]
  n: Optional[int]  # Prompts paired.

  @property
  def delta(self) -> float:
    return self.last - self.first

  @property
  def se(self) -> float:
    """The paired error when the rows allow it, else the unpaired one."""
    return self.paired_se if self.paired_se is not None else self.unpaired_se

  @property
  def z(self) -> float:
    """The change in standard errors."""
    if self.se > 0:
      return self.delta / self.se
    return math.copysign(math.inf, self.delta) if self.delta else 0.0

  def format(self) -> str:
    how = f'paired over {self.n} prompts' if self.paired_se is not None else 'unpaired: rows without per-prompt values'
    return (f'{self.key} {self.first:.3f} -> {self.last:.3f}: {self.delta:+.3f} ± {self.se:.3f} '
            f'({self.z:.1f} SE, {how}; unpaired ± {self.unpaired_se:.3f})')


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
  """Standard error of mean(b - a) for values paired by position: sd(b - a, ddof=1) / sqrt(n)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
    raise ValueError(f'paired_se needs two equally long lists of at least 2 values, got {a.shape} and {b.shape}.')
  return float(np.std(b - a, ddof=1) / math.sqrt(len(a)))


def gain(first: dict, last: dict, key: str = 'reward') -> Gain:
  """The change of `key` from row `first` to row `last` (evaluation rows of one run)."""
  unpaired = math.sqrt(first[f'{key}_se'] ** 2 + last[f'{key}_se'] ** 2)
  a, b = (row.get('per_prompt', {}).get(key) for row in (first, last))
  paired, n = None, None
  if a is not None and b is not None and len(a) == len(b) and len(a) >= 2:
    paired, n = paired_se(np.asarray(a), np.asarray(b)), len(a)
  return Gain(key, int(first['step']), int(last['step']), float(first[key]), float(last[key]), unpaired,
              paired, n)


def format_gains(first: dict, last: dict) -> str:
  """The end-of-run lines: reward and KL change from the first evaluation to the last."""
  return '\n'.join(f'Step {first["step"]} -> {last["step"]}: ' + gain(first, last, k).format()
                   for k in PER_PROMPT_KEYS)
