"""The report of a study (python -m pilaf_jax.study report --workdir=<dir>): report.md with tables in
the form of the paper's Tables 2 and 3, paired differences against a baseline sampler, labels needed
to reach a J threshold, and PNG plots (J against labels, J against decode compute, reward against KL).

Statistics are over seeds (each finished run is one observation): means with 95% Student-t
intervals; paired differences use the seeds both samplers finished; 'labels to reach' intervals are
percentile bootstraps over seeds. Only finished runs enter the tables; unfinished ones are listed.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from pilaf_jax import study_spec as study_lib
from pilaf_jax.analysis import stats
from pilaf_jax.paths import read_metrics

DECODE_FIELDS = ('policy_decode_tokens', 'ref_decode_tokens')
SCORING_FIELDS = ('policy_scoring_tokens', 'ref_scoring_tokens')


def compute_axis(row: dict, compute: str = 'decode') -> float:
  """Forward-pass tokens spent so far: what ran (`*_executed`) when the row has it, else the useful
  count (metrics written before the executed counters existed)."""
  fields = DECODE_FIELDS + (SCORING_FIELDS if compute == 'all' else ())
  executed = [row.get(f + '_executed') for f in fields]
  if all(v is not None for v in executed):
    return float(sum(executed))
  return float(sum(row.get(f, 0) for f in fields))


def load_runs(workdir: str) -> tuple[dict, list[dict]]:
  """The spec and one dict per planned run: setting, sampler, seed, state, rows, config."""
  spec = study_lib.load_spec(workdir)
  runs = []
  for run in study_lib.plan(spec, workdir):
    state, _, _ = study_lib.run_state(run.workdir)
    runs.append(dict(name=run.name, setting=run.setting, sampler=run.sampler, seed=run.seed, state=state,
                     workdir=run.workdir, rows=read_metrics(run.workdir),
                     config=study_lib.read_config(run.workdir)))
  return spec, runs


def _final(run: dict, key: str) -> float:
  return float(run['rows'][-1][key])


def _plot(path: str, curves: dict, xlabel: str, ylabel: str, title: str, frontier: bool = False,
          beta: Optional[float] = None) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, (name, c) in enumerate(curves.items()):
    color = f'C{i}'
    if frontier:
      ax.errorbar(c['x'], c['y'], xerr=c['xerr'], yerr=c['yerr'], color=color, marker='o', ms=3,
                  capsize=2, lw=1.2, label=f'{name} (n={c["n"]})')
    else:
      ax.plot(c['x'], c['y'], color=color, marker='o', ms=3, lw=1.5, label=f'{name} (n={c["n"]})')
      ax.fill_between(c['x'], c['lo'], c['hi'], color=color, alpha=0.2, lw=0)
  if frontier and beta:  # Iso-J lines: reward = J + beta * KL.
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    for j in np.linspace(y0 - beta * x1, y1, 7):
      ax.plot([x0, x1], [j + beta * x0, j + beta * x1], color='0.85', lw=0.8, ls='--', zorder=0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _curves(runs: list[dict], x_of, y_key: str) -> dict:
  """Per evaluation index: mean x over seeds, mean y and its t-interval."""
  n = min(len(r['rows']) for r in runs)
  x = np.asarray([[x_of(row) for row in r['rows'][:n]] for r in runs], np.float64).mean(0)
  mean, lo, hi = stats.band([[row[y_key] for row in r['rows'][:n]] for r in runs])
  return dict(x=x, y=mean, lo=lo, hi=hi, n=len(runs))


def _frontier(runs: list[dict]) -> dict:
  n = min(len(r['rows']) for r in runs)
  out = {}
  for key, name in (('kl', 'x'), ('reward', 'y')):
    mean, lo, hi = stats.band([[row[key] for row in r['rows'][:n]] for r in runs])
    out[name], out[name + 'err'] = mean, np.stack([mean - lo, hi - mean])
  out['n'] = len(runs)
  return out


def setting_report(setting: str, runs: list[dict], spec: dict, workdir: str, *, baseline: str,
                   threshold_fraction: float, threshold: Optional[float], compute: str,
                   plots: bool) -> list[str]:
  """The markdown lines of one setting."""
  lines = [f'## Setting: {setting}' if setting != 'base' else '## Results', '']
  done = [r for r in runs if r['state'] == 'done' and r['sampler'] != 'branch' and r['rows']]
  samplers = [s for s in spec['samplers'] if any(r['sampler'] == s for r in done)]
  by = {s: [r for r in done if r['sampler'] == s] for s in samplers}
  if not done:
    return lines + ['No finished runs yet.', '']
  first = done[0]
  config = first['config'] or {}
  beta = float(config.get('beta', 0.1))
  last_step = first['rows'][-1]['step']
  labels = first['rows'][-1]['labels_used']
  lines += [f'Final evaluation: step {last_step}, {labels} labelled pairs per run. Mean over seeds '
            f'[95% t-interval]; n = seeds. J = reward - {beta:g} KL.', '']

  # Table 2/3 form.
  lines += ['| method | n | reward | KL | J |', '|---|---|---|---|---|']
  for s in samplers:
    cells = [stats.t_interval([_final(r, k) for r in by[s]]).format() for k in ('reward', 'kl', 'J')]
    lines.append(f'| {s} | {len(by[s])} | ' + ' | '.join(cells) + ' |')
  lines.append('')

  # Paired differences against the baseline.
  if baseline in by and len(samplers) > 1:
    lines += [f'Paired differences against {baseline} (same seeds; positive J = better than {baseline}):',
              '', f'| method - {baseline} | n | reward | KL | J | seeds with higher J |', '|---|---|---|---|---|---|']
    base = {k: {r['seed']: _final(r, k) for r in by[baseline]} for k in ('reward', 'kl', 'J')}
    for s in samplers:
      if s == baseline:
        continue
      cells, wins, n = [], 0, 0
      for k in ('reward', 'kl', 'J'):
        diff, above = stats.paired_difference({r['seed']: _final(r, k) for r in by[s]}, base[k])
        cells.append(diff.format())
        if k == 'J':
          wins, n = above, diff.n
      lines.append(f'| {s} | {n} | ' + ' | '.join(cells) + f' | {wins}/{n} |')
    lines.append('')

  # Labels to reach a J threshold.
  j0 = float(np.mean([r['rows'][0]['J'] for r in done]))
  if threshold is None and baseline in by:
    target = j0 + threshold_fraction * (np.mean([_final(r, 'J') for r in by[baseline]]) - j0)
    how = (f'{threshold_fraction:g} of {baseline}\'s final J gain: J0 + {threshold_fraction:g} x '
           f'(final J of {baseline} - J0), J0 = {j0:.3f} (the starting policy, mean over runs)')
  elif threshold is not None:
    target, how = threshold, 'given on the command line'
  else:
    target = None
  if target is not None:
    lines += [f'Labels to reach J >= {target:.3f} ({how}); linear interpolation between evaluations, '
              'mean over seeds with a 95% bootstrap interval (seeds resampled); ratio to the baseline '
              'paired by seed:', '', '| method | reached | labels | labels / ' + baseline + ' labels |',
              '|---|---|---|---|']
    reach = {s: {r['seed']: stats.labels_to_reach([row['labels_used'] for row in r['rows']],
                                                  [row['J'] for row in r['rows']], target) for r in by[s]}
             for s in samplers}
    for s in samplers:
      values = list(reach[s].values())
      reached = sum(np.isfinite(values))
      if reached == len(values):
        cell = stats.bootstrap_interval(values).format(0)
      else:
        cell = f'median {stats.bootstrap_interval(values, np.median).format(0)} (not reached: inf)'
      ratio = (stats.paired_bootstrap_ratio(reach[s], reach[baseline]).format(2)
               if baseline in reach and s != baseline else '')
      lines.append(f'| {s} | {reached}/{len(values)} | {cell} | {ratio} |')
    lines.append('')

  if plots:
    slug = ''.join(c if c.isalnum() or c in '.-_=' else '_' for c in setting)
    directory = os.path.join(workdir, 'plots')
    os.makedirs(directory, exist_ok=True)
    names = {}
    xlabel = ('decode tokens run (policy + reference)' if compute == 'decode'
              else 'forward tokens run (decode + teacher-forced scoring, both models)')
    for key, x_of, label in (('labels', lambda row: row['labels_used'], 'labelled pairs'),
                             ('compute', lambda row: compute_axis(row, compute), xlabel)):
      path = os.path.join(directory, f'{slug}_J_vs_{key}.png')
      _plot(path, {s: _curves(by[s], x_of, 'J') for s in samplers}, label, 'J (held-out)',
            f'J against {key} ({setting}); bands: 95% t-interval over seeds')
      names[key] = path
    path = os.path.join(directory, f'{slug}_reward_vs_kl.png')
    _plot(path, {s: _frontier(by[s]) for s in samplers}, 'KL(pi || pi_ref), nats', 'reward (held-out)',
          f'reward-KL frontier ({setting}); dashed: iso-J lines; bars: 95% t-intervals', frontier=True,
          beta=beta)
    names['frontier'] = path
    lines += [f'![J against labels]({os.path.relpath(names["labels"], workdir)})',
              f'![J against compute]({os.path.relpath(names["compute"], workdir)})',
              f'![reward against KL]({os.path.relpath(names["frontier"], workdir)})', '']

  unfinished = [r for r in runs if r['state'] != 'done']
  if unfinished:
    lines += ['Not finished (left out of the tables): ' + ', '.join(
        f'{r["name"]} ({r["state"]})' for r in unfinished), '']
  lines += run_gain_table(done)
  lines += ['<details><summary>Every run: final reward, KL, J (± standard error over evaluation prompts)'
            '</summary>', '', '| run | step | labels | reward | KL | J |', '|---|---|---|---|---|---|']
  for r in done:
    f = r['rows'][-1]
    lines.append(f'| {r["name"]} | {f["step"]} | {f["labels_used"]} | {f["reward"]:.3f} ± {f["reward_se"]:.3f} '
                 f'| {f["kl"]:.3f} ± {f["kl_se"]:.3f} | {f["J"]:.3f} ± {f["J_se"]:.3f} |')
  lines += ['', '</details>', '']
  return lines


def run_gain_table(runs: list[dict]) -> list[str]:
  """Markdown lines: each run's held-out reward from its first evaluation to its last, the gain with
  its paired standard error over prompts (evaluation.gains), and the final KL."""
  from pilaf_jax.evaluation.gains import gain  # The package imports jax; report readers need not.
  lines = ['Each run, first evaluation to last: held-out reward (± SE over prompts), the gain ± its '
           'paired SE (per-prompt differences; unpaired for rows without per-prompt values), and KL:', '',
           '| run | steps | reward, first | reward, last | gain ± SE | gain / SE | paired | KL, last |',
           '|---|---|---|---|---|---|---|---|']
  for r in runs:
    if len(r['rows']) < 2:
      continue
    first, last = r['rows'][0], r['rows'][-1]
    g = gain(first, last, 'reward')
    lines.append(f'| {r["name"]} | {g.first_step}-{g.last_step} | {g.first:.2f} ± {first["reward_se"]:.2f} '
                 f'| {g.last:.2f} ± {last["reward_se"]:.2f} | {g.delta:+.2f} ± {g.se:.2f} | {g.z:.1f} '
                 f'| {"yes" if g.paired_se is not None else "no"} | {last["kl"]:.2f} ± {last["kl_se"]:.2f} |')
  return lines + ['']


def write_report(workdir: str, *, threshold_fraction: float = 0.9, threshold: Optional[float] = None,
                 baseline: str = 'vanilla', compute: str = 'decode', plots: bool = True) -> str:
  spec, runs = load_runs(workdir)
  lines = [f'# Study report: {os.path.basename(os.path.normpath(workdir))}', '',
           f'- config: `{spec["config"]}`; protocol: `{spec["protocol"]}`',
           f'- samplers: {", ".join(spec["samplers"])}; seeds: {", ".join(map(str, spec["seeds"]))}',
           f'- overrides: `{" ".join(spec["overrides"]) or "(none)"}`',
           f'- sweeps: {spec["sweeps"] or "(none)"}',
           f'- runs finished: {sum(r["state"] == "done" for r in runs)} of {len(runs)}',
           '- the command of every run: `study.json` (`commands`)', '']
  for setting, _ in study_lib.settings(spec):
    lines += setting_report(setting, [r for r in runs if r['setting'] == setting], spec, workdir,
                            baseline=baseline, threshold_fraction=threshold_fraction, threshold=threshold,
                            compute=compute, plots=plots)
  path = os.path.join(workdir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path




def _label_ratio(by: dict, sampler: str, baseline: str, threshold_fraction: float) -> str:
  """Labels the sampler needs to reach the baseline-derived J threshold, relative to the baseline."""
  runs = [r for s in (sampler, baseline) for r in by[s]]
  j0 = float(np.mean([r['rows'][0]['J'] for r in runs]))
  target = j0 + threshold_fraction * (np.mean([_final(r, 'J') for r in by[baseline]]) - j0)
  reach = {s: {r['seed']: stats.labels_to_reach([row['labels_used'] for row in r['rows']],
                                                [row['J'] for row in r['rows']], target) for r in by[s]}
           for s in (sampler, baseline)}
  return stats.paired_bootstrap_ratio(reach[sampler], reach[baseline]).format(2)


def compare_studies(workdirs: list[str], out: str, *, baseline: str = 'vanilla',
                    threshold_fraction: float = 0.9, plots: bool = True) -> str:
  """One table across studies (e.g. one study per regime): for every setting and sampler, the paired
  differences against the baseline at the final evaluation (reward, KL, J, with 95% t-intervals), the
  seeds where the sampler's J was higher, and the label ratio to reach the baseline's J threshold.
  Writes `out` (markdown) and, with plots, a forest plot of the J differences beside it."""
  specs = {w: study_lib.load_spec(w) for w in workdirs}
  missing = [w for w, s in specs.items() if s is None]
  if missing:
    raise study_lib.StudyError(f'not study directories (no {study_lib.STUDY_FILE}): {", ".join(missing)}')
  common = set.intersection(*(set(s['overrides']) for s in specs.values()))
  rows, forest = [], []
  lines = [f'# Sampler differences across studies (against {baseline})', '',
           f'Paired by seed at the final evaluation; mean [95% t-interval]. Overrides common to every '
           f'study: `{" ".join(sorted(common)) or "(none)"}`. Label ratio: labels to reach '
           f'J0 + {threshold_fraction:g} x ({baseline}\'s final J gain), sampler / {baseline}, paired '
           'bootstrap over seeds (< 1: fewer labels).', '',
           f'| study | setting | method | n | {baseline} J | ΔJ | Δreward | ΔKL | seeds with higher J '
           '| label ratio |', '|---|---|---|---|---|---|---|---|---|---|']
  for w, spec in specs.items():
    name = os.path.basename(os.path.normpath(w))
    _, runs = load_runs(w)
    for setting, _ in study_lib.settings(spec):
      done = [r for r in runs if r['setting'] == setting and r['state'] == 'done'
              and r['sampler'] != 'branch' and r['rows']]
      by = {s: [r for r in done if r['sampler'] == s] for s in spec['samplers']}
      if not by.get(baseline):
        continue
      base = {k: {r['seed']: _final(r, k) for r in by[baseline]} for k in ('reward', 'kl', 'J')}
      base_j = stats.t_interval(list(base['J'].values())).format()
      for s in spec['samplers']:
        if s == baseline or not by.get(s):
          continue
        diffs = {k: stats.paired_difference({r['seed']: _final(r, k) for r in by[s]}, base[k])
                 for k in ('reward', 'kl', 'J')}
        j, wins = diffs['J']
        overrides = ' '.join(o.replace('--config.', '') for o in spec['overrides'] if o not in common)
        label = f'{name}' + (f' (`{overrides}`)' if overrides else '')
        lines.append(f'| {label} | {setting} | {s} | {j.n} | {base_j} | {j.format()} | '
                     f'{diffs["reward"][0].format()} | {diffs["kl"][0].format()} | {wins}/{j.n} | '
                     f'{_label_ratio(by, s, baseline, threshold_fraction)} |')
        forest.append((f'{name}/{setting}/{s}' if setting != 'base' else f'{name}/{s}', j))
  lines.append('')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if plots and forest:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(forest) + 1.2))
    for i, (label, j) in enumerate(reversed(forest)):
      ax.errorbar([j.estimate], [i], xerr=[[j.estimate - j.lo], [j.hi - j.estimate]], fmt='o', color='C0',
                  capsize=3)
    ax.axvline(0.0, color='0.5', lw=1, ls='--')
    ax.set_yticks(range(len(forest)))
    ax.set_yticklabels([label for label, _ in reversed(forest)], fontsize=8)
    ax.set_xlabel(f'J(sampler) - J({baseline}), paired by seed; 95% t-interval')
    ax.grid(alpha=0.3, axis='x')
    fig.tight_layout()
    plot = os.path.splitext(out)[0] + '_forest.png'
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    lines += [f'![J differences]({os.path.basename(plot)})', '']
  with open(out, 'w') as f:
    f.write('\n'.join(lines))
  return out
