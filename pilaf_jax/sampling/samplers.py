"""The pair samplers of the paper (Table 1), behind one registry.

A sampler is a pure function (ctx, policy_params, ref_params, prompts, rng) -> PairBatch. `make_sampler`
validates the choice and returns it jitted. Every PairBatch carries reference log-probs for all its
responses and a SamplingCost counted from the rows each model actually ran on.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PI_MINUS, PI_PLUS, POLICY, REFERENCE, PairBatch, PromptBatch, SamplingCost
from pilaf_jax.model.llama import Llama
from pilaf_jax.registry import lookup, registrar
from pilaf_jax.model.scoring import response_logprobs
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, Rollout, decode

SamplerFn = Callable[..., PairBatch]
SAMPLERS: dict[str, SamplerFn] = {}
register_sampler = registrar(SAMPLERS)


@dataclasses.dataclass(frozen=True)
class SamplerContext:
  """Everything static a sampler needs. allowed_tokens is a concrete numpy [V] bool mask (or None)."""
  policy: Llama
  ref: Llama
  settings: DecodeSettings
  beta: float
  allowed_tokens: Optional[np.ndarray] = None
  vanilla_fraction: float = 0.5
  best_of_n: int = 8
  max_enumerated_responses: int = 4096

  @property
  def allowed(self) -> Optional[jax.Array]:
    return None if self.allowed_tokens is None else jnp.asarray(self.allowed_tokens)

  def decode(self, policy_params, ref_params, prompts, mix_coef, rng, layout) -> Rollout:
    return decode(self.policy, self.ref, policy_params, ref_params, prompts, mix_coef, rng,
                  layout=layout, settings=self.settings, allowed_tokens=self.allowed)

  def score(self, model: Llama, params, prompts: PromptBatch, tokens, mask) -> jax.Array:
    return response_logprobs(model, params, prompts.tokens, prompts.mask, tokens, mask, self.allowed)


def _count(x) -> jax.Array:
  return jnp.sum(x).astype(jnp.int32)


def _decode_cost(rows: PromptBatch, rollout: Rollout, layout: RowLayout) -> SamplingCost:
  """Decode cost of a rollout, per model: useful tokens (each row's non-padding prompt tokens plus
  its generated tokens) and executed tokens (the whole [P] prompt buffer of every row at prefill,
  then every row at every decode step the loop ran, finished rows included)."""
  tokens = rows.mask.sum(1) + rollout.mask.sum(1)
  per_row_run = rows.tokens.shape[1] + rollout.steps.astype(jnp.int32)
  pol, ref = layout.policy_rows, layout.ref_rows
  n_pol, n_ref = pol.stop - pol.start, ref.stop - ref.start
  return SamplingCost.zero().replace(
      policy_decode_sequences=jnp.int32(n_pol), ref_decode_sequences=jnp.int32(n_ref),
      policy_decode_tokens=_count(tokens[pol]), ref_decode_tokens=_count(tokens[ref]),
      policy_decode_tokens_executed=jnp.int32(n_pol) * per_row_run,
      ref_decode_tokens_executed=jnp.int32(n_ref) * per_row_run)


def _scoring_tokens(model: str, rows: PromptBatch, mask: jax.Array) -> dict:
  """Cost fields of one teacher-forced pass of `model` ('policy' or 'ref') over responses [N, R]:
  useful tokens (non-padding prompt and response tokens) and executed ones (N x (P + R))."""
  n, p = rows.tokens.shape
  return {f'{model}_scoring_tokens': _count(rows.mask.sum(1) + mask.sum(1)),
          f'{model}_scoring_tokens_executed': jnp.int32(n * (p + mask.shape[1]))}


def _assemble(prompts: PromptBatch, tokens_ab, mask_ab, policy_lp_ab, ref_lp_ab, source_ab,
              cost: SamplingCost) -> PairBatch:
  """Stacks (a, b) pieces, each [B, ...], into a PairBatch ([B, 2, ...])."""
  stack = lambda ab: jnp.stack(ab, axis=1)
  b = prompts.size
  cost = cost.replace(pairs=jnp.int32(b), oracle_responses=jnp.int32(2 * b))
  return PairBatch(prompts=prompts, responses=stack(tokens_ab), response_mask=stack(mask_ab),
                   policy_logprobs=stack(policy_lp_ab), ref_logprobs=stack(ref_lp_ab),
                   source=jnp.stack([jnp.full((b,), s, jnp.int8) for s in source_ab], axis=1), cost=cost)


@register_sampler('vanilla')
def vanilla(ctx: SamplerContext, policy_params, ref_params, prompts: PromptBatch, rng) -> PairBatch:
  """Both responses from pi_theta (Rafailov et al. 2023)."""
  b = prompts.size
  rows, layout = prompts.repeat(2), RowLayout(policy_only=2 * b)
  ro = ctx.decode(policy_params, ref_params, rows, jnp.zeros((0,)), rng, layout)
  ref_lp = ctx.score(ctx.ref, ref_params, rows, ro.tokens, ro.mask)
  cost = _decode_cost(rows, ro, layout).replace(**_scoring_tokens('ref', rows, ro.mask))
  a, bb = slice(0, b), slice(b, 2 * b)
  return _assemble(prompts, (ro.tokens[a], ro.tokens[bb]), (ro.mask[a], ro.mask[bb]),
                   (ro.policy_logprobs[a], ro.policy_logprobs[bb]), (ref_lp[a], ref_lp[bb]),
                   (POLICY, POLICY), cost)


@register_sampler('pilaf')
def pilaf(ctx: SamplerContext, policy_params, ref_params, prompts: PromptBatch, rng) -> PairBatch:
  """Algorithm 1: a vanilla pair for a random share of the prompts, (pi_plus, pi_minus) for the rest.

  The coin is stratified so that shapes stay static and the reference runs only on the rows that
  mix: after a random permutation, the first floor(B * f) prompts get a vanilla pair and the rest a
  mixed one (f = vanilla_fraction). When B * f is not an integer, the prompt at the boundary is
  decoded both ways and a coin with probability frac(B * f) keeps its vanilla pair, so every prompt
  gets a vanilla pair with probability exactly f at any batch size (the discarded pair is counted
  in the cost: it ran).
  """
  b = prompts.size
  k_perm, k_decode = jax.random.split(rng)
  prompts = prompts.take(jax.random.permutation(k_perm, b))
  exact = b * ctx.vanilla_fraction
  nv = int(np.floor(exact + 1e-9))  # Prompts that surely get a vanilla pair.
  swing = int(exact - nv > 1e-9)  # 1 when the boundary prompt is decided by a coin.
  nvr, nm = nv + swing, b - nv  # Prompts decoded as vanilla pairs, as mixed pairs.
  vanilla_prompts, mixed_prompts = prompts.take(slice(0, nvr)), prompts.take(slice(nv, b))
  rows = PromptBatch.concatenate([vanilla_prompts, vanilla_prompts, mixed_prompts, mixed_prompts])
  layout = RowLayout(policy_only=2 * nvr, mixed=2 * nm)
  coef = jnp.concatenate([jnp.full((nm,), 1 + ctx.beta), jnp.full((nm,), 1 - ctx.beta)])
  ro = ctx.decode(policy_params, ref_params, rows, coef, k_decode, layout)
  vanilla_rows = slice(0, 2 * nvr)
  scored = ctx.score(ctx.ref, ref_params, rows.take(vanilla_rows), ro.tokens[vanilla_rows],
                     ro.mask[vanilla_rows])
  ref_lp = jnp.concatenate([scored, ro.ref_logprobs[2 * nvr:]])
  cost = _decode_cost(rows, ro, layout).replace(
      **_scoring_tokens('ref', rows.take(vanilla_rows), ro.mask[vanilla_rows]))
  # Pair i < nv: vanilla rows (i, nvr + i); pair nv + j: mixed rows (2 nvr + j, 2 nvr + nm + j),
  # except the boundary prompt (i = nv), which keeps its vanilla rows when the coin says so.
  i = jnp.arange(b)
  is_vanilla = i < nv
  if swing:
    is_vanilla = is_vanilla | ((i == nv) & jax.random.bernoulli(jax.random.fold_in(k_perm, 1), exact - nv))
  j = jnp.maximum(i - nv, 0)
  a = jnp.where(is_vanilla, i, 2 * nvr + j)
  bb = jnp.where(is_vanilla, nvr + i, 2 * nvr + nm + j)
  pick = lambda x: (x[a], x[bb])
  pairs = _assemble(prompts, pick(ro.tokens), pick(ro.mask), pick(ro.policy_logprobs), pick(ref_lp),
                    (POLICY, POLICY), cost)
  source = jnp.stack([jnp.where(is_vanilla, POLICY, PI_PLUS), jnp.where(is_vanilla, POLICY, PI_MINUS)], 1)
  return pairs.replace(source=source.astype(jnp.int8))


@register_sampler('hybrid')
def hybrid(ctx: SamplerContext, policy_params, ref_params, prompts: PromptBatch, rng) -> PairBatch:
  """One response from pi_theta, one from pi_ref (Xie et al. 2024)."""
  b = prompts.size
  rows, layout = prompts.repeat(2), RowLayout(policy_only=b, ref_only=b)
  ro = ctx.decode(policy_params, ref_params, rows, jnp.zeros((0,)), rng, layout)
  a, bb = slice(0, b), slice(b, 2 * b)
  ref_lp_a = ctx.score(ctx.ref, ref_params, rows.take(a), ro.tokens[a], ro.mask[a])
  cost = _decode_cost(rows, ro, layout).replace(**_scoring_tokens('ref', rows.take(a), ro.mask[a]))
  return _assemble(prompts, (ro.tokens[a], ro.tokens[bb]), (ro.mask[a], ro.mask[bb]),
                   (ro.policy_logprobs[a], ro.policy_logprobs[bb]), (ref_lp_a, ro.ref_logprobs[bb]),
                   (POLICY, REFERENCE), cost)


@register_sampler('best_of_n')
def best_of_n(ctx: SamplerContext, policy_params, ref_params, prompts: PromptBatch, rng) -> PairBatch:
  """N policy samples per prompt; the highest and lowest DPO implicit reward form the pair.

  The implicit reward beta * sum_t (log pi_theta - log pi_ref) uses the decode pass's own policy
  log-probs and one teacher-forced reference pass. Only the chosen two reach the oracle.
  """
  b, n = prompts.size, ctx.best_of_n
  rows, layout = prompts.repeat(n), RowLayout(policy_only=n * b)
  ro = ctx.decode(policy_params, ref_params, rows, jnp.zeros((0,)), rng, layout)
  ref_lp = ctx.score(ctx.ref, ref_params, rows, ro.tokens, ro.mask)
  implicit = ctx.beta * (ro.policy_logprobs.sum(-1) - ref_lp.sum(-1)).reshape(n, b)
  best = jnp.argmax(implicit, axis=0)
  # Exclude the best so the pair is two distinct samples even when rewards tie.
  worst = jnp.argmin(jnp.where(jnp.arange(n)[:, None] == best[None], jnp.inf, implicit), axis=0)
  row = lambda j: j * b + jnp.arange(b)
  pick = lambda x: (x[row(best)], x[row(worst)])
  cost = _decode_cost(rows, ro, layout).replace(**_scoring_tokens('ref', rows, ro.mask))
  return _assemble(prompts, pick(ro.tokens), pick(ro.mask), pick(ro.policy_logprobs), pick(ref_lp),
                   (POLICY, POLICY), cost)


# --- T-PILAF: the exact sequence-level sampler, for tasks small enough to enumerate. ---

def num_responses(num_content: int, max_len: int) -> int:
  """Responses of at most max_len tokens: content^l + EOS for l < max_len, or content^max_len."""
  return sum(num_content ** l for l in range(max_len + 1))


def enumerate_responses(allowed_tokens: np.ndarray, eos_id: int, pad_id: int,
                        max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Every possible response, as (tokens [E, R], mask [E, R]) in numpy."""
  content = [int(t) for t in np.flatnonzero(allowed_tokens) if t != eos_id]
  tokens, masks = [], []
  for length in range(max_len + 1):
    for body in itertools.product(content, repeat=length):
      seq = list(body) + ([eos_id] if length < max_len else [])
      tokens.append(seq + [pad_id] * (max_len - len(seq)))
      masks.append([True] * len(seq) + [False] * (max_len - len(seq)))
  return np.asarray(tokens, np.int32), np.asarray(masks, bool)


def t_pilaf_distributions(ctx: SamplerContext, policy_params, ref_params, prompts: PromptBatch) -> dict:
  """Exact log-probabilities of every response under pi_theta, pi_ref, pi_plus and pi_minus.

  Returns arrays [B, E] ('policy', 'ref', 'plus', 'minus', normalised), per-token log-probs
  [B, E, R] ('policy_tokens', 'ref_tokens'), the responses ('tokens', 'mask': [E, R]) and
  'vanilla_weight' [B] = 1 / (1 + Z_plus * Z_minus).
  """
  s = ctx.settings
  tokens, mask = enumerate_responses(ctx.allowed_tokens, s.eos_id, s.pad_id, s.max_new_tokens)
  b, e = prompts.size, tokens.shape[0]
  rows = PromptBatch(jnp.repeat(prompts.tokens, e, axis=0), jnp.repeat(prompts.mask, e, axis=0))
  tiled_tokens, tiled_mask = jnp.tile(tokens, (b, 1)), jnp.tile(mask, (b, 1))
  pol_tok = ctx.score(ctx.policy, policy_params, rows, tiled_tokens, tiled_mask).reshape(b, e, -1)
  ref_tok = ctx.score(ctx.ref, ref_params, rows, tiled_tokens, tiled_mask).reshape(b, e, -1)
  lp, lr = pol_tok.sum(-1), ref_tok.sum(-1)
  plus = (1 + ctx.beta) * lp - ctx.beta * lr
  minus = (1 - ctx.beta) * lp + ctx.beta * lr
  log_z_plus = jax.nn.logsumexp(plus, axis=-1)
  log_z_minus = jax.nn.logsumexp(minus, axis=-1)
  return dict(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), policy=lp, ref=lr,
              plus=plus - log_z_plus[:, None], minus=minus - log_z_minus[:, None],
              policy_tokens=pol_tok, ref_tokens=ref_tok,
              vanilla_weight=jax.nn.sigmoid(-(log_z_plus + log_z_minus)))


@register_sampler('t_pilaf')
def t_pilaf(ctx: SamplerContext, policy_params, ref_params, prompts: PromptBatch, rng,
            vanilla_weight: Optional[float] = None) -> PairBatch:
  """T-PILAF: with probability 1/(1 + Z+ Z-) a vanilla pair, else y_a ~ pi_plus, y_b ~ pi_minus
  (sequence level). vanilla_weight replaces that probability by a fixed coin."""
  d = t_pilaf_distributions(ctx, policy_params, ref_params, prompts)
  b, e = d['policy'].shape
  k_coin, k_a, k_b, k_va, k_vb = jax.random.split(rng, 5)
  weight = d['vanilla_weight'] if vanilla_weight is None else jnp.full((b,), vanilla_weight)
  vanilla_pair = jax.random.bernoulli(k_coin, weight)
  idx_a = jnp.where(vanilla_pair, jax.random.categorical(k_va, d['policy']),
                    jax.random.categorical(k_a, d['plus']))
  idx_b = jnp.where(vanilla_pair, jax.random.categorical(k_vb, d['policy']),
                    jax.random.categorical(k_b, d['minus']))
  per_row = lambda x, idx: x[jnp.arange(b), idx]
  pick = lambda x: (per_row(x, idx_a), per_row(x, idx_b))
  tokens = jnp.broadcast_to(d['tokens'], (b, e, d['tokens'].shape[-1]))
  mask = jnp.broadcast_to(d['mask'], tokens.shape)
  # Both models score every enumerated response of every prompt.
  scoring = _count(prompts.mask.sum(1)[:, None] + d['mask'].sum(1)[None, :])
  executed = jnp.int32(b * e * (prompts.tokens.shape[1] + d['tokens'].shape[-1]))
  cost = SamplingCost.zero().replace(policy_scoring_tokens=scoring, ref_scoring_tokens=scoring,
                                     policy_scoring_tokens_executed=executed,
                                     ref_scoring_tokens_executed=executed)
  pairs = _assemble(prompts, pick(tokens), pick(mask), pick(d['policy_tokens']), pick(d['ref_tokens']),
                    (POLICY, POLICY), cost)
  source = jnp.stack([jnp.where(vanilla_pair, POLICY, PI_PLUS), jnp.where(vanilla_pair, POLICY, PI_MINUS)], 1)
  return pairs.replace(source=source.astype(jnp.int8))


@register_sampler('t_pilaf_half')
def t_pilaf_half(ctx: SamplerContext, policy_params, ref_params, prompts: PromptBatch, rng) -> PairBatch:
  """T-PILAF's sequence-level pi_plus x pi_minus with the practical method's coin: a vanilla pair with
  probability sampler.vanilla_fraction (1/2) instead of 1/(1 + Z+ Z-)."""
  return t_pilaf(ctx, policy_params, ref_params, prompts, rng, vanilla_weight=ctx.vanilla_fraction)


def build_sampler(name: str, ctx: SamplerContext) -> SamplerFn:
  """The named sampler function, after checking that it can run with ctx (clear errors, no work)."""
  fn = lookup(SAMPLERS, name, 'sampler.name')
  if ctx.policy.cfg.vocab_size != ctx.ref.cfg.vocab_size:
    raise ValueError(f'Policy and reference must share one vocabulary to mix token by token: '
                     f'policy vocab_size={ctx.policy.cfg.vocab_size}, '
                     f'reference vocab_size={ctx.ref.cfg.vocab_size}.')
  if name == 'best_of_n' and ctx.best_of_n < 2:
    raise ValueError(f'sampler.best_of_n={ctx.best_of_n}: best-of-N needs N >= 2 samples per prompt.')
  if name in ('pilaf', 't_pilaf_half') and not 0.0 <= ctx.vanilla_fraction <= 1.0:
    raise ValueError(f'sampler.vanilla_fraction={ctx.vanilla_fraction} must lie in [0, 1].')
  if name in ('t_pilaf', 't_pilaf_half'):
    if ctx.allowed_tokens is None:
      raise ValueError('t_pilaf needs the task to declare its response tokens (allowed_tokens).')
    num_content = int(np.sum(ctx.allowed_tokens)) - int(ctx.allowed_tokens[ctx.settings.eos_id])
    e = num_responses(num_content, ctx.settings.max_new_tokens)
    if e > ctx.max_enumerated_responses:
      raise ValueError(
          f't_pilaf enumerates every response: {num_content} content tokens and response_len='
          f'{ctx.settings.max_new_tokens} give {e} responses per prompt, more than '
          f'sampler.max_enumerated_responses={ctx.max_enumerated_responses}. Use a smaller task '
          f'(e.g. configs/enumerable.py) or raise that limit.')
  return fn


check_sampler = build_sampler  # The former name, for one release.


def make_sampler(name: str, ctx: SamplerContext) -> Callable[..., PairBatch]:
  """The named sampler, checked and jitted: fn(policy_params, ref_params, prompts, rng) -> PairBatch.

  (The run builds its own jit of build_sampler(...) with explicit shardings.)
  """
  fn = build_sampler(name, ctx)
  return jax.jit(lambda policy_params, ref_params, prompts, rng: fn(ctx, policy_params, ref_params,
                                                                   prompts, rng))
