"""Sampling speed on the default model: what PILAF's two-model decode costs, and what the KV cache saves.

  (a) new tokens/s of plain policy decoding vs pi_plus / pi_minus decoding (both models, mixed rows);
  (b) wall time per pair of every registered sampler at the default batch, and pilaf / vanilla;
  (c) the cached two-model mixture (decode.decode) vs the cache-less one (uncached.decode_uncached,
      what TRL's Nash-MD GeometricMixtureWrapper does) at 128 new tokens;
  (d) a sweep over batch size and response length: response tokens/s of every sampler.

Parameters: the reference is a random init of the default model, the policy a randomly perturbed copy
of it (speed does not depend on training). Response length does (EOS ends rows early), so every
benchmark samples with allowed_tokens = the task's response tokens minus EOS: every row decodes
exactly response_len tokens and tokens/s compare like for like.

Timing: each case is compiled ahead of time (lower().compile(), reported separately), run once to
warm up, then run --repeats times with jax.block_until_ready, round-robin with the cases it is
compared with; the median is reported. A case stops repeating early once its timed runs exceed
--case-budget seconds (the tables say how many ran). See benchmarks/README.md.

  python benchmarks/sampler_speed.py                       # everything (a, b, c, d)
  python benchmarks/sampler_speed.py --only=a,c --repeats=7
  python benchmarks/sampler_speed.py --only=d --sweep=grid --sweep-batches=16,64 --sweep-lengths=16,128
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pilaf_jax import default_config  # noqa: E402
from pilaf_jax.batches import PromptBatch  # noqa: E402
from pilaf_jax.model.llama import Llama, LlamaConfig, count_params, init_params  # noqa: E402
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, decode  # noqa: E402
from pilaf_jax.sampling.samplers import SAMPLERS, SamplerContext, make_sampler  # noqa: E402
from pilaf_jax.sampling.uncached import decode_uncached  # noqa: E402
from pilaf_jax.tasks import EOS, PAD, make_task, sample_prompts  # noqa: E402

PARTS = ('a', 'b', 'c', 'd')


# --- Setup -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  """The default model and task, random parameters, prompts; everything a case needs."""
  config: object
  model: Llama
  policy_params: dict
  ref_params: dict
  allowed_no_eos: np.ndarray  # [V] bool: the task's response tokens minus EOS.
  beta: float

  @classmethod
  def build(cls, seed: int = 0) -> 'Setup':
    c = default_config.get_config()
    model = Llama(LlamaConfig.from_config(c.model))
    k_ref, k_noise = jax.random.split(jax.random.key(seed))
    ref_params = init_params(model.cfg, k_ref)
    # The policy: the reference plus noise of the init's own scale, so the two models differ.
    leaves, treedef = jax.tree.flatten(ref_params)
    keys = jax.random.split(k_noise, len(leaves))
    policy_params = jax.tree.unflatten(
        treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    world = make_task(c.task)
    allowed = np.asarray(world.allowed_response_tokens) & (np.arange(c.task.vocab_size) != EOS)
    return cls(c, model, policy_params, ref_params, allowed, float(c.beta))

  def prompts(self, n: int, prompt_len: Optional[int] = None, seed: int = 1) -> PromptBatch:
    task = self.config.task.copy_and_resolve_references()
    if prompt_len is not None:
      task.prompt_len = prompt_len
    return sample_prompts(make_task(task), jax.random.key(seed), n)[0]

  def settings(self, response_len: int) -> DecodeSettings:
    return DecodeSettings(max_new_tokens=response_len, eos_ids=EOS, pad_id=PAD)

  def sampler_ctx(self, response_len: int) -> SamplerContext:
    s = self.config.sampler
    return SamplerContext(policy=self.model, ref=self.model, settings=self.settings(response_len),
                          beta=self.beta, allowed_tokens=self.allowed_no_eos,
                          vanilla_fraction=s.vanilla_fraction, best_of_n=s.best_of_n,
                          max_enumerated_responses=s.max_enumerated_responses)


# --- Timing ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
  compile_s: float
  first_s: float  # The first run after compiling: the warm-up (or the measurement, see measure).
  times: list[float]
  output: object
  first_only: bool = False  # The warm-up run was long enough to be the only measurement.

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def runs(self) -> str:
    return '1*' if self.first_only else str(len(self.times))

  @property
  def spread(self) -> str:
    lo, hi = min(self.times) * 1e3, max(self.times) * 1e3
    return f'{lo:.0f}' if len(self.times) == 1 else f'{lo:.0f}-{hi:.0f}'


def measure(cases: Sequence[tuple[Callable, Sequence]], repeats: int, case_budget_s: float) -> list[Timing]:
  """Times a group of (jitted fn, args) cases that will be compared with each other.

  Each case is AOT-compiled (lower().compile()) and run once to warm up. Then the timed runs go
  round-robin over the cases (case 1, 2, .., 1, 2, ..), so a change in machine load hits every case
  alike and their ratios stay meaningful. A case stops after `repeats` runs or once its timed runs
  exceed case_budget_s. A case whose warm-up run alone exceeds case_budget_s is not run again: that
  run (already compiled, so it is a clean run) is its only measurement ('1*' in the tables).
  """
  compiled, timings = [], []
  for jitted, args in cases:
    t0 = time.perf_counter()
    exe = jitted.lower(*args).compile()
    t1 = time.perf_counter()
    output = jax.block_until_ready(exe(*args))
    first = time.perf_counter() - t1
    compiled.append(exe)
    long = first > case_budget_s
    timings.append(Timing(t1 - t0, first, [first] if long else [], output, first_only=long))
  for _ in range(max(repeats, 1)):
    for exe, (_, args), t in zip(compiled, cases, timings):
      if len(t.times) >= max(repeats, 1) or sum(t.times) > case_budget_s:
        continue
      start = time.perf_counter()
      jax.block_until_ready(exe(*args))
      t.times.append(time.perf_counter() - start)
  return timings


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]], notes=()) -> None:
  cells = [[str(h) for h in header]] + [[str(x) for x in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  print(f'\n{title}')
  print(line(cells[0]))
  print('  '.join('-' * w for w in widths))
  for r in cells[1:]:
    print(line(r))
  for n in notes:
    print(f'  note: {n}')
  sys.stdout.flush()


def fmt_rate(x: float) -> str:
  return f'{x:,.0f}'


# --- Decode-level cases ------------------------------------------------------------------------------

def decode_fn(setup: Setup, layout: RowLayout, response_len: int, uncached: bool = False,
              prefix_bucket: int = 0) -> Callable:
  """decode (or decode_uncached), jitted, as fn(policy_params, ref_params, prompts, coef, rng)."""
  kw = dict(layout=layout, settings=setup.settings(response_len),
            allowed_tokens=jnp.asarray(setup.allowed_no_eos))
  if uncached:
    fn = functools.partial(decode_uncached, setup.model, setup.model, prefix_bucket=prefix_bucket, **kw)
  else:
    fn = functools.partial(decode, setup.model, setup.model, **kw)
  return jax.jit(fn)


def mixed_rows(setup: Setup, prompts: PromptBatch) -> tuple[RowLayout, jax.Array]:
  """Every row mixed: the first half pi_plus (coef 1 + beta), the rest pi_minus (1 - beta)."""
  n = prompts.size
  coef = jnp.concatenate([jnp.full((n // 2,), 1 + setup.beta), jnp.full((n - n // 2,), 1 - setup.beta)])
  return RowLayout(mixed=n), coef


def part_a(setup: Setup, args) -> dict:
  """New tokens/s: policy-only rows vs mixed (pi_plus / pi_minus) rows, same row count."""
  r = setup.config.task.response_len
  rows = 2 * args.batch  # A pair batch's rows: two responses per prompt.
  prompts = setup.prompts(rows)
  call = lambda coef: (setup.policy_params, setup.ref_params, prompts, coef, jax.random.key(2))
  mixed_layout, coef = mixed_rows(setup, prompts)
  labels = ['vanilla (policy only)', 'pi_plus/pi_minus (both models)']
  timings = measure([(decode_fn(setup, RowLayout(policy_only=rows), r), call(jnp.zeros((0,)))),
                     (decode_fn(setup, mixed_layout, r), call(coef))], args.repeats, args.case_budget)
  rates = []
  for t in timings:
    new_tokens = int(np.asarray(t.output.mask).sum())
    assert new_tokens == rows * r, 'EOS is excluded: every row should decode response_len tokens.'
    rates.append(new_tokens / t.median)
  ratio = rates[1] / rates[0]
  print_table(
      f'(a) decode throughput: {rows} rows ({args.batch} prompts x 2) x {r} new tokens, '
      f'prompt_len {setup.config.task.prompt_len}',
      ['decode', 'compile s', 'median ms', 'range ms', 'runs', 'new tok/s', 'vs vanilla'],
      [[label, f'{t.compile_s:.1f}', f'{t.median * 1e3:.1f}', t.spread, t.runs, fmt_rate(tps),
        f'{tps / rates[0]:.2f}x'] for label, t, tps in zip(labels, timings, rates)],
      notes=[f'pi_plus/pi_minus vs vanilla tokens/s = {ratio:.2f} (each mixed token runs both models; '
             f'0.50 would be pure compute).'])
  return {'a_mixed_over_vanilla_tokens_per_s': ratio}


def part_c(setup: Setup, args) -> dict:
  """Cached two-model mixture vs the cache-less (TRL Nash-MD style) baseline, 128 new tokens."""
  r, p, rows = args.long_response_len, setup.config.task.prompt_len, args.batch
  prompts = setup.prompts(rows, prompt_len=p)
  layout, coef = mixed_rows(setup, prompts)
  call = (setup.policy_params, setup.ref_params, prompts, coef, jax.random.key(3))
  variants = [('cached (decode.decode: KV caches)', dict())]
  if args.prefix_bucket:
    variants.append((f'uncached, growing prefix (chunks of {args.prefix_bucket})',
                     dict(uncached=True, prefix_bucket=args.prefix_bucket)))
  if args.uncached_full or not args.prefix_bucket:
    variants.append(('uncached, full [N, P+R] buffer', dict(uncached=True, prefix_bucket=0)))
  timings = measure([(decode_fn(setup, layout, r, **kw), call) for _, kw in variants], args.repeats,
                    args.case_budget)
  cached = timings[0]
  same = [int(np.all(np.asarray(cached.output.tokens) == np.asarray(t.output.tokens), axis=1).sum())
          for t in timings]
  new_tokens = rows * r
  speedups = {label: t.median / cached.median for (label, _), t in zip(variants, timings)}
  c = args.prefix_bucket
  print_table(
      f'(c) two-model mixture: {rows} mixed rows, prompt_len {p}, {r} new tokens; KV cache vs none',
      ['decode', 'compile s', 'median ms', 'range ms', 'runs', 'new tok/s', 'time vs cached',
       'rows = cached'],
      [[label, f'{t.compile_s:.1f}', f'{t.median * 1e3:.0f}', t.spread, t.runs,
        fmt_rate(new_tokens / t.median), f'{t.median / cached.median:.1f}x', f'{s}/{rows}']
       for (label, _), t, s in zip(variants, timings, same)],
      notes=[f'cache speed-up over the uncached baseline(s): '
             + ', '.join(f'{v:.1f}x' for v in list(speedups.values())[1:]) + ' (target >= 5x).',
             '"rows = cached": rows whose tokens equal the cached decode\'s under the same rng.',
             'TRL samples the mixture with use_cache=False, so every step re-runs the growing prefix; '
             f'the chunked row approximates that (steps {c}k..{c}k+{c - 1} feed the first '
             f'P + {c}(k + 1) slots), the full-buffer row feeds all P + R slots at every step.',
             '1* = one run: the first run after compiling exceeded --case-budget.'])
  return {f'c_speedup[{k}]': v for k, v in list(speedups.items())[1:]}


# --- Sampler-level cases -----------------------------------------------------------------------------

def time_samplers(setup: Setup, batch: int, response_len: int, args) -> tuple[list, list]:
  """Times every registered sampler at (batch, response_len), round-robin; (results, skip notes).

  Results are kept in args.sampler_results, so (d) reuses the point (b) already measured.
  """
  key = (batch, response_len)
  if key not in args.sampler_results:
    args.sampler_results[key] = _time_samplers(setup, batch, response_len, args)
  return args.sampler_results[key]


def _time_samplers(setup: Setup, batch: int, response_len: int, args) -> tuple[list, list]:
  ctx = setup.sampler_ctx(response_len)
  prompts = setup.prompts(batch)
  call = (setup.policy_params, setup.ref_params, prompts, jax.random.key(4))
  names, fns, notes = [], [], []
  for name in SAMPLERS:
    try:
      fns.append(make_sampler(name, ctx))
      names.append(name)
    except ValueError as e:
      notes.append(f'{name} skipped: make_sampler refuses it here: {e}'.split('. ')[0] + '.')
  timings = measure([(fn, call) for fn in fns], args.repeats, args.case_budget)
  for t in timings:
    assert int(np.asarray(t.output.response_mask).sum()) == 2 * batch * response_len
  return list(zip(names, timings)), notes


def part_b(setup: Setup, args) -> dict:
  b, r = args.batch, setup.config.task.response_len
  results, notes = time_samplers(setup, b, r, args)
  vanilla = dict(results)['vanilla'].median
  rows = []
  for name, t in results:
    cost = t.output.cost.as_dict()
    rows.append([name, f'{t.compile_s:.1f}', f'{t.median * 1e3:.1f}', t.spread, t.runs,
                 f'{t.median / b * 1e3:.2f}', f'{t.median / vanilla:.2f}x',
                 cost['policy_decode_sequences'], cost['ref_decode_sequences'], cost['ref_scoring_tokens']])
  pilaf = dict(results).get('pilaf')
  fastest = min(dict(results)['vanilla'].times)
  summary = [f'pilaf/vanilla time per pair = {pilaf.median / vanilla:.2f} from medians, '
             f'{min(pilaf.times) / fastest:.2f} from the fastest runs (target <= 1.6).'] if pilaf else []
  print_table(
      f'(b) samplers at the default batch: {b} prompts -> {b} pairs, response_len {r}',
      ['sampler', 'compile s', 'median ms', 'range ms', 'runs', 'ms/pair', 'vs vanilla',
       'pol seqs', 'ref seqs', 'ref scored tok'],
      rows, notes=summary + notes + [
          'pol/ref seqs: responses each model decoded; ref scored tok: teacher-forced reference '
          'tokens (prompt + response); both from PairBatch.cost.'])
  return {'b_pilaf_over_vanilla': pilaf.median / vanilla} if pilaf else {}


def sweep_points(args) -> list[tuple[int, int]]:
  if args.sweep == 'grid':
    return [(b, r) for b in args.sweep_batches for r in args.sweep_lengths]
  # 'cross': a batch sweep at the default response length and a length sweep at the default batch.
  b0, r0 = args.batch, args.default_response_len
  points = [(b, r0) for b in args.sweep_batches] + [(b0, r) for r in args.sweep_lengths]
  return sorted(set(points), key=points.index)


def part_d(setup: Setup, args) -> dict:
  rows, notes, names = [], set(), []
  for b, r in sweep_points(args):
    results, skipped = time_samplers(setup, b, r, args)
    notes.update(n.split(':')[0] + ' at every point (not applicable on this task).' for n in skipped)
    names = [n for n, _ in results]
    vanilla = dict(results)['vanilla'].median
    rows.append([b, r] + [fmt_rate(2 * b * r / t.median) + ('*' if t.first_only else '')
                          for _, t in results]
                + [f'{dict(results)["pilaf"].median / vanilla:.2f}' if 'pilaf' in names else '-'])
    print(f'  (d) batch {b}, response_len {r}: done ({time.perf_counter() - args.start:.0f} s)', flush=True)
  print_table(
      f'(d) sweep ({args.sweep}): response tokens delivered per second (2 x batch x response_len / '
      f'median time of one sampler call)',
      ['batch', 'resp len'] + names + ['pilaf/vanilla time'], rows,
      notes=sorted(notes) + ['best_of_n decodes best_of_n responses per prompt but delivers 2.',
                             '* = one run: the first run after compiling exceeded --case-budget.'])
  return {}


# --- Main --------------------------------------------------------------------------------------------

def int_list(s: str) -> list[int]:
  return [int(x) for x in s.split(',') if x]


def main(argv: Optional[Sequence[str]] = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--only', default=','.join(PARTS), help='parts to run, e.g. a,c (default: all)')
  ap.add_argument('--repeats', type=int, default=5, help='timed runs per case (median reported)')
  ap.add_argument('--case-budget', type=float, default=5.0,
                  help='stop repeating a case once its timed runs exceed this many seconds')
  ap.add_argument('--batch', type=int, default=None,
                  help='prompts per batch for (a), (b); rows for (c) (default: dpo.batch_size = 64)')
  ap.add_argument('--long-response-len', type=int, default=128, help='(c) new tokens')
  ap.add_argument('--prefix-bucket', type=int, default=16,
                  help='(c) growing-prefix chunk size for decode_uncached (0: full buffer only)')
  ap.add_argument('--uncached-full', action='store_true',
                  help='(c) also time decode_uncached on the full [N, P+R] buffer (slow)')
  ap.add_argument('--sweep', choices=('cross', 'grid'), default='cross',
                  help='(d) cross: batches at the default response_len plus lengths at the default '
                       'batch; grid: every (batch, length) pair (much slower)')
  ap.add_argument('--sweep-batches', type=int_list, default=[16, 64, 256])
  ap.add_argument('--sweep-lengths', type=int_list, default=[16, 64, 128])
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args(argv)
  parts = [p for p in args.only.split(',') if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    ap.error(f'--only: unknown parts {unknown}; choose from {",".join(PARTS)}')

  args.start = start = time.perf_counter()
  setup = Setup.build(args.seed)
  if args.batch is None:
    args.batch = int(setup.config.dpo.batch_size)
  args.default_response_len = int(setup.config.task.response_len)
  args.sampler_results = {}
  m = setup.config.model
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s), '
        f'{os.cpu_count()} CPUs); default model: d={m.hidden_size}, {m.num_layers} layers, '
        f'{m.num_heads} heads / {m.num_kv_heads} kv, ffn {m.intermediate_size}, vocab {m.vocab_size}, '
        f'{count_params(setup.ref_params):,} params')
  print(f'params: random init (reference) + perturbed copy (policy); EOS excluded from sampling, so '
        f'every response has exactly response_len tokens. repeats={args.repeats}, '
        f'case budget {args.case_budget:.0f} s.')
  summary, part_times = {}, []
  for part, fn in (('a', part_a), ('b', part_b), ('c', part_c), ('d', part_d)):
    if part in parts:
      t0 = time.perf_counter()
      summary.update(fn(setup, args))
      part_times.append(f'{part} {time.perf_counter() - t0:.0f} s')
  if summary:
    print('\nsummary: ' + ', '.join(f'{k} = {v:.2f}' for k, v in summary.items()))
  print(f'total wall time: {time.perf_counter() - start:.0f} s ({", ".join(part_times)})')


if __name__ == '__main__':
  main()
