r"""The map: where a PILAF variant should beat vanilla, predicted by the exact theory on the rare task.

  python -m pilaf_jax.analysis.rare_map --out=docs/theory_map \
      [--betas=0.1,0.5,1,2 --scales=0.5,1,2,4 --lambdas=0,0.25,0.5,0.75,0.9 --good_prob=0.05]

For every cell (beta, reward_scale, start_lambda) the policy is pi_lambda ~ pi_ref exp(lambda r*/beta)
on the rare task (tasks/rare.py) with the behaviour distribution as pi_ref (what SFT imitates), and
the lab's price (analysis/price.py) is computed exactly for the tabular softmax policy: the J gain per
label of pilaf, t_pilaf and t_pilaf_half relative to vanilla's (n1(vanilla) / n1(S); > 1: S buys more
J per label). The tabular geometry is a model of the network's: the studies test it on the network.
Writes map.json (every cell: the ratios, cosines, n1, log Z+ Z-, sd_pi(r_theta), sd_pi(r* - r_theta),
KL(pi_lambda || pi_ref), KL(pi* || pi_lambda), KL(pi* || pi_ref)) and one heat map per sampler.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from pilaf_jax.analysis import price, theory
from pilaf_jax.sampling.samplers import enumerate_responses
from pilaf_jax.tasks import rare

VARIANTS = ('pilaf', 't_pilaf', 't_pilaf_half')


def _kl(lp, lq):
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def _log_softmax(z):
  top = z.max(-1, keepdims=True)
  return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def cell(beta: float, reward_scale: float, start_lambda: float, good_prob: float = 0.05,
         topic_spread: float = 1.0, vocab_size: int = 6, response_len: int = 4) -> dict:
  """The exact price of every sampler at pi_lambda on the rare task with these settings."""
  cfg = rare.RareTaskConfig(vocab_size=vocab_size, prompt_len=4, response_len=response_len, beta=beta,
                            **{**dict(rare.default_fields()), 'good_prob': good_prob,
                               'topic_spread': topic_spread, 'reward_scale': reward_scale,
                               'start_lambda': start_lambda})
  tokens, mask = enumerate_responses(np.arange(vocab_size) >= rare.EOS, rare.EOS, rare.PAD, response_len)
  ref = rare.behaviour_logprobs(cfg, tokens, mask)
  r = rare.reward_table(cfg, tokens, mask)
  start = _log_softmax(ref + start_lambda * r / beta)
  star = _log_softmax(ref + r / beta)
  out = price.tabular_measure(start, ref, r, tokens, mask, beta)
  out.update(beta=beta, reward_scale=reward_scale, start_lambda=start_lambda, good_prob=good_prob,
             J_star=theory.optimum(ref, r, beta),
             kl_start_ref=_kl(start, ref), kl_star_start=_kl(star, start), kl_start_star=_kl(start, star), kl_star_ref=_kl(star, ref),
             reward_sd_ref=float(np.mean(np.sqrt(np.sum(np.exp(ref) * r ** 2, -1)
                                                 - np.sum(np.exp(ref) * r, -1) ** 2))))
  for name in price.MAP_SAMPLERS:
    out['samplers'][name]['relative_gain'] = price.relative_gain(out, name)
  return out


def build_map(betas, scales, lambdas, good_prob: float, log=print) -> list[dict]:
  cells = []
  for beta in betas:
    for scale in scales:
      for lam in lambdas:
        c = cell(beta, scale, lam, good_prob)
        c.pop('per_prompt', None)
        cells.append(c)
        log(f'beta {beta:g} scale {scale:g} lambda {lam:g}: KL(pi*||pi_ref) {c["kl_star_ref"]:.2f}  '
            + '  '.join(f'{n} x{c["samplers"][n]["relative_gain"]:.2f}' for n in VARIANTS))
  return cells


def plot_map(cells: list[dict], betas, scales, lambdas, path_prefix: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  paths = []
  for name in VARIANTS:
    fig, axes = plt.subplots(1, len(betas), figsize=(3.9 * len(betas), 3.6), squeeze=False)
    for ax, beta in zip(axes[0], betas):
      grid = np.full((len(lambdas), len(scales)), np.nan)
      kl = np.full(len(scales), np.nan)
      for c in cells:
        if c['beta'] == beta:
          i, j = lambdas.index(c['start_lambda']), scales.index(c['reward_scale'])
          g = c['samplers'][name]['relative_gain']
          grid[i, j] = np.log2(max(g, 1e-3))
          kl[j] = c['kl_star_ref']
      im = ax.imshow(grid, origin='lower', cmap='RdBu', vmin=-3, vmax=3, aspect='auto')
      for i in range(len(lambdas)):
        for j in range(len(scales)):
          ax.text(j, i, f'{2 ** grid[i, j]:.2g}', ha='center', va='center', fontsize=7)
      ax.set_xticks(range(len(scales)), [f'{s:g}\n({k:.1f})' for s, k in zip(scales, kl)], fontsize=7)
      ax.set_yticks(range(len(lambdas)), [f'{l:g}' for l in lambdas], fontsize=7)
      ax.set_xlabel('reward scale (KL(pi* || pi_ref))', fontsize=8)
      if ax is axes[0][0]:
        ax.set_ylabel('start lambda (0 = pi_ref, 1 = pi*)', fontsize=8)
      ax.set_title(f'beta = {beta:g}', fontsize=9)
    fig.suptitle(f'{name}: predicted J gain per label / vanilla\'s (exact, tabular; blue > 1)', fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label='log2 ratio')
    path = f'{path_prefix}_{name}.png'
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    paths.append(path)
  return paths


def _floats(text: str) -> list[float]:
  try:
    return [float(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise SystemExit(f'error: expected comma-separated numbers, got {text!r}.') from None


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='Directory for map.json and the heat maps.')
  p.add_argument('--betas', default='0.1,0.5,1,2')
  p.add_argument('--scales', default='0.5,1,2,4')
  p.add_argument('--lambdas', default='0,0.25,0.5,0.75,0.9')
  p.add_argument('--good_prob', type=float, default=0.05)
  p.add_argument('--replot', action='store_true', help='Redraw the heat maps from <out>/map.json.')
  a = p.parse_args(argv)
  betas, scales, lambdas = _floats(a.betas), _floats(a.scales), _floats(a.lambdas)
  if not (betas and scales and lambdas) or min(betas) <= 0 or min(scales) <= 0 \
      or not all(0 <= l <= 1 for l in lambdas) or not 0 < a.good_prob < 1:
    print('error: betas and scales must be > 0, lambdas in [0, 1], good_prob in (0, 1).', file=sys.stderr)
    sys.exit(2)
  os.makedirs(a.out, exist_ok=True)
  if a.replot:
    with open(os.path.join(a.out, 'map.json')) as f:
      cells = json.load(f)['cells']
    for path in plot_map(cells, betas, scales, lambdas, os.path.join(a.out, 'map')):
      print(f'Wrote {path}')
    return
  cells = build_map(betas, scales, lambdas, a.good_prob)
  with open(os.path.join(a.out, 'map.json'), 'w') as f:
    json.dump({'command': ' '.join(['python -m pilaf_jax.analysis.rare_map'] + (argv or sys.argv[1:])),
               'cells': cells}, f, indent=1)
  for path in plot_map(cells, betas, scales, lambdas, os.path.join(a.out, 'map')):
    print(f'Wrote {path}')


if __name__ == '__main__':
  main()
