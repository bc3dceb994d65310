"""The theory lab's outputs in its workdir: theory.md (a table per measured step) and the plots
theory_cosine.png and theory_J.png (from the rows that analysis/lab.py measured)."""
from __future__ import annotations

import os
from typing import Sequence


def write_outputs(rows: list[dict], samplers: Sequence[str], workdir: str, train_sampler: str) -> None:
  nan = float('nan')
  lines = [f'# Theory lab: exact alignment along an online DPO run ({train_sampler} sampling)', '',
           'cos = cosine between the population DPO ascent direction of each sampler\'s preference data '
           'and grad J (parameter space). var = per-label variance of the stochastic DPO gradient '
           '(trace); n1 = labelled pairs for its component along grad J to reach signal/noise 1; '
           'x van = J gain per label relative to vanilla\'s (n1 of vanilla / n1). log ZZ = log Z+ Z-; '
           'sd r_th, sd res = sd under pi of r_theta = beta log pi/pi_ref and of r* - r_theta.', '',
           '| step | J | J* | log ZZ | sd r_th | sd res | ' +
           ' | '.join(f'{s} cos | {s} var | {s} n1 | {s} x van' for s in samplers) + ' |',
           '|---|---|---|---|---|---|' + '---|---|---|---|' * len(samplers)]
  for r in rows:
    cells = [f'{r.get(k, nan):.3g}' for k in ('log_zz', 'sd_r_theta', 'sd_residual')]
    for s in samplers:
      x = r['samplers'][s]
      cells += [f'{x["cosine"]:+.3f}'] + [f'{x.get(k, nan):.3g}' for k in (
          'variance', 'labels_for_snr1_along_J', 'relative_gain')]
    lines.append(f'| {r["step"]} | {r["J"]:.3f} | {r["J_star"]:.3f} | ' + ' | '.join(cells) + ' |')
  with open(os.path.join(workdir, 'theory.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps = [r['step'] for r in rows]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for i, s in enumerate(samplers):
    ax.plot(steps, [r['samplers'][s]['cosine'] for r in rows], marker='o', ms=3, color=f'C{i}', label=s)
  ax.set_xlabel(f'online DPO step ({train_sampler} sampling)')
  ax.set_ylabel('cos(population DPO direction, grad J)')
  ax.set_title('Exact alignment of each sampler\'s expected DPO gradient with grad J', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'theory_cosine.png'), dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.plot(steps, [r['J'] for r in rows], marker='o', ms=3, label='J(pi_theta), exact')
  ax.axhline(rows[0]['J_star'], color='k', ls='--', lw=1, label='J* (optimum)')
  ax.set_xlabel('online DPO step')
  ax.set_ylabel('J on the lab prompts')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'theory_J.png'), dpi=120)
  plt.close(fig)
