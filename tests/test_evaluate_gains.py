"""The paired standard error of a gain between two evaluation rows (pilaf_jax/evaluation/gains.py)."""
import math

import numpy as np
import pytest

from pilaf_jax.analysis.report import run_gain_table
from pilaf_jax.evaluation import gains


def _row(step, reward, kl):
  reward, kl = np.asarray(reward, np.float64), np.asarray(kl, np.float64)
  se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))
  return {'step': step, 'reward': float(reward.mean()), 'reward_se': se(reward), 'kl': float(kl.mean()),
          'kl_se': se(kl), 'per_prompt': {'reward': gains.per_prompt_values(reward),
                                          'kl': gains.per_prompt_values(kl)}}


def test_paired_se_is_the_hand_computation_and_beats_the_unpaired_one_on_correlated_prompts():
  first = _row(0, [-10.0, -4.0, -16.0, -7.0], [0.0, 0.0, 0.0, 0.0])
  last = _row(10, [-8.0, -3.0, -13.0, -7.0], [1.0, 2.0, 4.0, 1.0])
  g = gains.gain(first, last, 'reward')
  # Differences 2, 1, 3, 0: mean 1.5, sample variance (0.25 + 0.25 + 2.25 + 2.25) / 3 = 5/3.
  assert g.delta == pytest.approx(1.5)
  assert g.paired_se == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12) and g.n == 4
  assert g.se == g.paired_se and g.z == pytest.approx(1.5 / (math.sqrt(5 / 3) / 2))
  # The unpaired error ignores the prompt-level correlation (hard and easy prompts): much larger.
  unpaired = math.sqrt(first['reward_se'] ** 2 + last['reward_se'] ** 2)
  assert g.unpaired_se == pytest.approx(unpaired) and g.paired_se < unpaired / 3
  assert gains.gain(first, last, 'kl').delta == pytest.approx(2.0)


def test_independent_rows_give_paired_and_unpaired_errors_of_the_same_size():
  rs = np.random.RandomState(0)
  a, b = rs.normal(0, 1, 4000), rs.normal(0.1, 1, 4000)
  g = gains.gain(_row(0, a, a), _row(1, b, b))
  assert g.paired_se == pytest.approx(g.unpaired_se, rel=0.05)


def test_rows_without_per_prompt_values_fall_back_to_the_unpaired_error():
  first, last = _row(0, [1.0, 2.0, 4.0], [0.0] * 3), _row(5, [2.0, 2.0, 5.0], [1.0] * 3)
  del first['per_prompt']
  g = gains.gain(first, last)
  assert g.paired_se is None and g.n is None and g.se == g.unpaired_se
  assert 'unpaired: rows without per-prompt values' in g.format()
  with pytest.raises(ValueError, match='equally long'):
    gains.paired_se(np.zeros(3), np.zeros(4))


def test_end_of_run_lines_and_report_table():
  first = _row(0, [-10.0, -4.0, -16.0, -7.0], [0.0] * 4)
  last = _row(10, [-8.0, -3.0, -13.0, -7.0], [1.0, 2.0, 4.0, 1.0])
  text = gains.format_gains(first, last)
  assert text.splitlines()[0] == ('Step 0 -> 10: reward -9.250 -> -7.750: +1.500 ± 0.645 (2.3 SE, paired over 4 '
                                  f'prompts; unpaired ± {math.sqrt(first["reward_se"] ** 2 + last["reward_se"] ** 2):.3f})')
  lines = run_gain_table([{'name': 'base/pilaf/seed0', 'rows': [first, last]},
                          {'name': 'base/pilaf/seed1', 'rows': [first]}])  # One row: no gain to show.
  assert '| base/pilaf/seed0 | 0-10 | -9.25 ± 2.56 | -7.75 ± 2.06 | +1.50 ± 0.65 | 2.3 | yes | 2.00 ± 0.71 |' in lines
  assert not any('seed1' in line for line in lines)
