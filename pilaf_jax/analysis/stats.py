"""Small statistics for studies over seeds: t-intervals, paired differences, bootstrap intervals,
and the labels a run needs to reach a J threshold."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean (or other estimate) with a two-sided interval; lo/hi are nan when n < 2."""
  estimate: float
  lo: float
  hi: float
  n: int

  def format(self, digits: int = 3) -> str:
    if not np.isfinite(self.estimate):
      return 'n/a'
    if self.n < 2 or not np.isfinite(self.lo):
      return f'{self.estimate:.{digits}f} (n={self.n})'
    return f'{self.estimate:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]'

  @property
  def half_width(self) -> float:
    return (self.hi - self.lo) / 2


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """Mean and Student-t interval of the mean over independent values (seeds)."""
  x = np.asarray(values, np.float64)
  n = len(x)
  if n == 0:
    return Interval(float('nan'), float('nan'), float('nan'), 0)
  mean = float(x.mean())
  if n < 2:
    return Interval(mean, float('nan'), float('nan'), n)
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> tuple[Interval, int]:
  """t-interval of a[seed] - b[seed] over the seeds both have; also how many seeds a > b."""
  seeds = sorted(set(a) & set(b))
  diffs = [a[s] - b[s] for s in seeds]
  return t_interval(diffs, confidence), int(sum(d > 0 for d in diffs))


def bootstrap_interval(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean,
                       confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
  """Percentile bootstrap interval of statistic(values), resampling values (seeds) with replacement.

  Infinite values (a threshold never reached) are allowed: statistics such as the median handle them.
  """
  x = np.asarray(values, np.float64)
  n = len(x)
  if n == 0:
    return Interval(float('nan'), float('nan'), float('nan'), 0)
  estimate = float(statistic(x))
  if n < 2:
    return Interval(estimate, float('nan'), float('nan'), n)
  rs = np.random.RandomState(seed)
  idx = rs.randint(0, n, size=(resamples, n))
  boots = np.asarray([statistic(x[i]) for i in idx], np.float64)
  alpha = (1 - confidence) / 2
  lo, hi = np.quantile(boots, [alpha, 1 - alpha], method='linear' if np.isfinite(boots).all() else 'lower')
  return Interval(estimate, float(lo), float(hi), n)


def paired_bootstrap_ratio(a: dict, b: dict, confidence: float = 0.95, resamples: int = 10_000,
                           seed: int = 0) -> Interval:
  """mean(a) / mean(b) over the seeds both have, with a bootstrap interval that resamples seeds
  jointly (keeps the pairing)."""
  seeds = sorted(set(a) & set(b))
  x = np.asarray([a[s] for s in seeds], np.float64)
  y = np.asarray([b[s] for s in seeds], np.float64)
  n = len(seeds)
  if n == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
    return Interval(float('nan'), float('nan'), float('nan'), n)
  with np.errstate(divide='ignore', invalid='ignore'):
    estimate = float(x.mean() / y.mean())
  if n < 2:
    return Interval(estimate, float('nan'), float('nan'), n)
  rs = np.random.RandomState(seed)
  idx = rs.randint(0, n, size=(resamples, n))
  with np.errstate(divide='ignore', invalid='ignore'):
    boots = x[idx].mean(1) / y[idx].mean(1)
  boots = boots[np.isfinite(boots)]
  if len(boots) == 0:
    return Interval(estimate, float('nan'), float('nan'), n)
  alpha = (1 - confidence) / 2
  lo, hi = np.quantile(boots, [alpha, 1 - alpha])
  return Interval(estimate, float(lo), float(hi), n)


def labels_to_reach(labels: Sequence[float], values: Sequence[float], threshold: float) -> float:
  """The labels at which a curve first reaches threshold, linearly interpolated between the two
  evaluations around the crossing; inf when it never does. (labels ascending.)"""
  x, y = np.asarray(labels, np.float64), np.asarray(values, np.float64)
  if len(y) == 0:
    return float('inf')
  if y[0] >= threshold:
    return float(x[0])
  for i in range(1, len(y)):
    if y[i] >= threshold:
      frac = (threshold - y[i - 1]) / (y[i] - y[i - 1])
      return float(x[i - 1] + frac * (x[i] - x[i - 1]))
  return float('inf')


def band(curves: Sequence[Sequence[float]], confidence: float = 0.95) -> Optional[tuple[np.ndarray, ...]]:
  """Pointwise mean and t-interval of equally long curves (truncated to the shortest): (mean, lo, hi)."""
  if not curves:
    return None
  n = min(len(c) for c in curves)
  y = np.asarray([list(c)[:n] for c in curves], np.float64)
  intervals = [t_interval(y[:, i], confidence) for i in range(n)]
  mean = np.asarray([iv.estimate for iv in intervals])
  lo = np.asarray([iv.lo if np.isfinite(iv.lo) else iv.estimate for iv in intervals])
  hi = np.asarray([iv.hi if np.isfinite(iv.hi) else iv.estimate for iv in intervals])
  return mean, lo, hi
