r"""The exact theory lab: on a task small enough to enumerate every response, the quantities of the
paper's analysis computed exactly at the current policy, with no sampling.

The lab's training run and CLI: analysis/lab.py (python -m pilaf_jax.analysis.lab); the price per
label built on these quantities: analysis/price.py.

For a fixed set of prompts x (held-out prompts of the task) and every response y:
- J(pi) = mean_x [ sum_y pi(y|x) r*(x,y) - beta KL(pi(.|x) || pi_ref(.|x)) ], exactly, and its
  gradient with respect to the policy parameters (jax.grad);
- J* = mean_x beta log sum_y pi_ref(y|x) exp(r*(x,y) / beta), the value of the optimum
  pi* proportional to pi_ref exp(r*/beta);
- for each sampler S, its exact pair distribution q_S(y_a, y_b | x) at the current policy:
    vanilla    pi x pi
    hybrid     pi x pi_ref
    t_pilaf    w pi x pi + (1 - w) pi_plus x pi_minus, w = 1/(1 + Z_plus Z_minus) (sequence level);
               t_pilaf_half: the same with w = sampler.vanilla_fraction (the practical coin)
    pilaf      f pi x pi + (1 - f) pi_plus^tok x pi_minus^tok, f = sampler.vanilla_fraction, where
               pi_plus^tok(y) = prod_t softmax((1+beta) h_theta - beta h_ref)[y_t] from both models'
               per-token logits along y (exactly what the token-level sampler draws)
    best_of_n  the (highest, lowest) implicit reward beta log(pi/pi_ref) of N draws of pi, exactly:
               with the responses sorted by implicit reward and m the policy mass from rank(b) to
               rank(a), P(best = a, worst = b) = m^N - (m - pi_a)^N - (m - pi_b)^N + (m - pi_a - pi_b)^N
               (distinct implicit rewards assumed; where they all tie, at pi = pi_ref, every pair of
               draws is equally likely and the pair is a vanilla pair);
- the population DPO gradient g_S = grad of E_x E_{(a,b)~q_S} E_{label~BT(r*)} [DPO loss], with the
  data held fixed (stop-gradient through q_S, as in training), its cosine with grad J (the paper's
  claim: T-PILAF's -g points along grad J to first order), and its norm;
- the per-label variance of the stochastic gradient: tr Cov(g) = E||g||^2 - ||E g||^2 for one labelled
  pair (x uniform over the prompts), exactly from the per-prompt Gram matrices of the per-response
  gradients, and the variance of its component along grad J.

"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PromptBatch
from pilaf_jax.model.scoring import masked_log_softmax, response_logprobs, sequence_inputs
from pilaf_jax.sampling.mixing import mix_logits
from pilaf_jax.sampling.samplers import SamplerContext, enumerate_responses

LAB_SAMPLERS = ('vanilla', 'pilaf', 'hybrid', 't_pilaf', 't_pilaf_half', 'best_of_n')
_TIE = 1e-6  # Implicit rewards closer than this count as tied (best-of-N).


# --- the exact objective and the expected DPO loss, generic in the log-probabilities --------------

def objective(logp: jax.Array, ref_logp: jax.Array, rewards: jax.Array, beta: float) -> jax.Array:
  """J = mean_x [sum_y pi (r - beta (log pi - log pi_ref))] from log-probs [B, E] of every response."""
  p = jnp.exp(logp)
  return jnp.mean(jnp.sum(p * (rewards - beta * (logp - ref_logp)), axis=-1))


def optimum(ref_logp, rewards, beta: float) -> float:
  """J* = mean_x beta log sum_y pi_ref(y|x) exp(r*(x,y)/beta) (attained by pi* ~ pi_ref e^{r*/beta})."""
  ref_logp, rewards = np.asarray(ref_logp, np.float64), np.asarray(rewards, np.float64)
  z = ref_logp + rewards / beta
  top = z.max(-1, keepdims=True)
  return float(np.mean(beta * (top[:, 0] + np.log(np.exp(z - top).sum(-1)))))


def expected_dpo_loss(logp: jax.Array, ref_logp: jax.Array, rewards: jax.Array, q: jax.Array,
                      beta: float) -> jax.Array:
  """E_x E_{(a,b)~q} E_{label ~ Bradley-Terry(r*)} [-log sigmoid(h_w - h_l)], h = beta log(pi/pi_ref).

  q: [B, E, E], each prompt's pair distribution (rows: y_a, columns: y_b); held fixed.
  """
  h = beta * (logp - ref_logp)
  dh = h[:, :, None] - h[:, None, :]
  p_a = jax.nn.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # P(y_a preferred).
  per_pair = -(p_a * jax.nn.log_sigmoid(dh) + (1 - p_a) * jax.nn.log_sigmoid(-dh))
  return jnp.mean(jnp.sum(jax.lax.stop_gradient(q) * per_pair, axis=(1, 2)))


def gradient_second_moment(logp, ref_logp, rewards, q, beta: float, gram) -> np.ndarray:
  """E||g||^2 of the gradient g of one labelled pair's DPO loss (x uniform over the B prompts), [].

  g for 'w beats l' is -beta sigmoid(-(h_w - h_l)) (grad log pi_w - grad log pi_l), so
  ||g||^2 = beta^2 sigmoid(-dh)^2 (G_ww + G_ll - 2 G_wl) with G the per-prompt Gram matrix [B, E, E]
  of the per-response gradients (or, with a vector v instead of G, the squared component along v:
  pass gram = v[:, :, None] * v[:, None, :]).
  """
  logp, ref_logp, rewards, q, gram = (np.asarray(x, np.float64) for x in (logp, ref_logp, rewards, q, gram))
  h = beta * (logp - ref_logp)
  dh = h[:, :, None] - h[:, None, :]
  p_a = 1 / (1 + np.exp(-(rewards[:, :, None] - rewards[:, None, :])))
  sig = lambda x: 1 / (1 + np.exp(-x))
  weight = beta ** 2 * (p_a * sig(-dh) ** 2 + (1 - p_a) * sig(dh) ** 2)
  diag = np.diagonal(gram, axis1=1, axis2=2)
  dist = diag[:, :, None] + diag[:, None, :] - 2 * gram
  return np.mean(np.sum(q * weight * dist, axis=(1, 2)))


# --- exact pair distributions ------------------------------------------------------------------------

def best_of_n_pairs(logp, ref_logp, beta: float, n: int) -> np.ndarray:
  """P(best = a, worst = b) of best-of-N by implicit reward, [B, E, E] (see the module docstring)."""
  logp, ref_logp = np.asarray(logp, np.float64), np.asarray(ref_logp, np.float64)
  b, e = logp.shape
  out = np.zeros((b, e, e))
  for i in range(b):
    p = np.exp(logp[i])
    h = beta * (logp[i] - ref_logp[i])
    if h.max() - h.min() < _TIE:  # All tied: the sampler keeps draws 1 and 2, a vanilla pair.
      out[i] = np.outer(p, p)
      continue
    order = np.argsort(h, kind='stable')
    rank = np.empty(e, int)
    rank[order] = np.arange(e)
    cum = np.concatenate([[0.0], np.cumsum(p[order])])
    ra, rb = rank[:, None], rank[None, :]
    m = np.where(ra > rb, cum[np.maximum(ra, rb) + 1] - cum[np.minimum(ra, rb)], 0.0)
    pa, pb = p[:, None], p[None, :]
    prob = m ** n - np.clip(m - pa, 0, None) ** n - np.clip(m - pb, 0, None) ** n \
        + np.clip(m - pa - pb, 0, None) ** n
    out[i] = np.where(ra > rb, prob, 0.0) + np.diag(p ** n)
  return out


def pair_distributions(names: Sequence[str], d: dict, beta: float, vanilla_fraction: float,
                       best_of_n: int) -> dict:
  """q [B, E, E] per sampler name, from log-probs [B, E]: 'policy', 'ref', 'plus', 'minus'
  (sequence level, normalised), 'vanilla_weight' [B], and for pilaf 'tok_plus', 'tok_minus'."""
  p = np.exp(np.asarray(d['policy'], np.float64))
  outer = lambda a, b: a[:, :, None] * b[:, None, :]
  out = {}
  for name in names:
    if name == 'vanilla':
      out[name] = outer(p, p)
    elif name == 'hybrid':
      out[name] = outer(p, np.exp(np.asarray(d['ref'], np.float64)))
    elif name in ('t_pilaf', 't_pilaf_half'):
      w = np.asarray(d['vanilla_weight'] if name == 't_pilaf' else [vanilla_fraction], np.float64)[:, None, None]
      out[name] = w * outer(p, p) + (1 - w) * outer(np.exp(np.asarray(d['plus'], np.float64)),
                                                    np.exp(np.asarray(d['minus'], np.float64)))
    elif name == 'pilaf':
      f = vanilla_fraction
      out[name] = f * outer(p, p) + (1 - f) * outer(np.exp(np.asarray(d['tok_plus'], np.float64)),
                                                    np.exp(np.asarray(d['tok_minus'], np.float64)))
    elif name == 'best_of_n':
      out[name] = best_of_n_pairs(d['policy'], d['ref'], beta, best_of_n)
    else:
      raise ValueError(f'sampler {name!r} has no exact pair distribution here; allowed: {list(LAB_SAMPLERS)}.')
  return out


# --- the model side: every response of every prompt ------------------------------------------------

def _rows(prompts: PromptBatch, tokens, mask):
  b, e = prompts.tokens.shape[0], tokens.shape[0]
  return (jnp.repeat(prompts.tokens, e, axis=0), jnp.repeat(prompts.mask, e, axis=0),
          jnp.tile(tokens, (b, 1)), jnp.tile(mask, (b, 1)))


def sequence_logprobs(ctx: SamplerContext, model, params, prompts: PromptBatch, tokens, mask) -> jax.Array:
  """log pi(y|x) of every enumerated response, [B, E] (differentiable in params)."""
  pt, pm, rt, rm = _rows(prompts, tokens, mask)
  return response_logprobs(model, params, pt, pm, rt, rm, ctx.allowed).sum(-1).reshape(prompts.tokens.shape[0], -1)


def token_logsoftmax(ctx: SamplerContext, model, params, prompts: PromptBatch, tokens, mask) -> jax.Array:
  """The full next-token log-distribution at every position of every response, [B * E, R, V]."""
  pt, pm, rt, rm = _rows(prompts, tokens, mask)
  seq, positions, valid = sequence_inputs(pt, pm, rt, rm)
  logits, _ = model.apply({'params': params}, seq, positions, valid)
  return masked_log_softmax(logits[:, pt.shape[1] - 1:-1], ctx.allowed)


def token_mixture_logprobs(ctx: SamplerContext, policy_params, ref_params, prompts, tokens, mask,
                           coef: float) -> jax.Array:
  """log of prod_t softmax(coef h_theta + (1 - coef) h_ref)[y_t] (the token-level sampler), [B, E]."""
  lp_pol = token_logsoftmax(ctx, ctx.policy, policy_params, prompts, tokens, mask)
  lp_ref = token_logsoftmax(ctx, ctx.ref, ref_params, prompts, tokens, mask)
  mixed = jax.nn.log_softmax(mix_logits(lp_pol, lp_ref, coef), axis=-1)
  _, _, rt, rm = _rows(prompts, tokens, mask)
  token_lp = jnp.take_along_axis(mixed, rt[..., None], axis=-1)[..., 0]
  return jnp.where(rm, token_lp, 0.0).sum(-1).reshape(prompts.tokens.shape[0], -1)


def gram_fn(ctx: SamplerContext, tokens, mask) -> Callable:
  """A jitted fn(params, prompt_tokens [P], prompt_mask [P]) -> G [E, E], G[a, b] = <grad log pi(a|x),
  grad log pi(b|x)> over all parameters (per-response gradients, vmapped)."""
  allowed = ctx.allowed

  def one(p, prompt_tokens, prompt_mask, y, m):
    return response_logprobs(ctx.policy, p, prompt_tokens[None], prompt_mask[None], y[None], m[None],
                             allowed).sum()

  @jax.jit
  def gram(p, prompt_tokens, prompt_mask):
    grads = jax.vmap(jax.grad(one), in_axes=(None, None, None, 0, 0))(p, prompt_tokens, prompt_mask, tokens, mask)
    flat = jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], axis=1)
    return flat @ flat.T
  return gram


def directional_derivative(f: Callable, primal, tangent):
  """J_f(primal) @ tangent with reverse mode only: the transpose of f's (linear) VJP.

  The model's matmul has a custom VJP (see model/llama.py), which forward mode (jax.jvp) cannot
  differentiate; transposing the VJP gives the same product.
  """
  out, vjp_fn = jax.vjp(f, primal)
  return jax.linear_transpose(vjp_fn, out)((tangent,))[0]


def _flat(tree) -> jax.Array:
  return jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(tree)])


@dataclasses.dataclass
class ExactLab:
  """Everything fixed across a training run: the prompts, every response, and their oracle rewards."""
  ctx: SamplerContext
  prompts: PromptBatch  # [B, P]
  rewards: np.ndarray  # [B, E] r*(x, y)
  tokens: np.ndarray  # [E, R]
  mask: np.ndarray  # [E, R]

  @classmethod
  def build(cls, ctx: SamplerContext, prompts: PromptBatch, reward_fn: Callable) -> 'ExactLab':
    """reward_fn(prompt_rows [B*E, P] PromptBatch, tokens [B*E, R], mask [B*E, R]) -> [B*E]."""
    s = ctx.settings
    tokens, mask = enumerate_responses(ctx.allowed_tokens, s.eos_id, s.pad_id, s.max_new_tokens)
    pt, pm, rt, rm = (np.asarray(x) for x in _rows(prompts, jnp.asarray(tokens), jnp.asarray(mask)))
    ids = None if prompts.ids is None else np.repeat(np.asarray(prompts.ids), tokens.shape[0])
    r = np.asarray(reward_fn(PromptBatch(pt, pm, ids), rt, rm), np.float64).reshape(prompts.tokens.shape[0], -1)
    return cls(ctx, prompts, r, tokens, mask)

  def __post_init__(self):
    ctx, beta, prompts = self.ctx, self.ctx.beta, self.prompts
    t, m = jnp.asarray(self.tokens), jnp.asarray(self.mask)
    rewards = jnp.asarray(self.rewards, jnp.float32)
    logp = lambda p: sequence_logprobs(ctx, ctx.policy, p, prompts, t, m)
    self._logp = jax.jit(logp)
    self._ref_logp = jax.jit(lambda p: sequence_logprobs(ctx, ctx.ref, p, prompts, t, m))
    self._mixture = jax.jit(lambda pp, rp, coef: token_mixture_logprobs(ctx, pp, rp, prompts, t, m, coef))
    self._j_and_grad = jax.jit(jax.value_and_grad(lambda p, ref_lp: objective(logp(p), ref_lp, rewards, beta)))
    self._loss_grad = jax.jit(jax.grad(lambda p, ref_lp, q: expected_dpo_loss(logp(p), ref_lp, rewards, q, beta)))
    self._jvp = jax.jit(lambda p, tangent: directional_derivative(logp, p, tangent))
    self._gram = gram_fn(ctx, t, m)

  def distributions(self, policy_params, ref_params, with_pilaf: bool = True) -> dict:
    """Exact log-probs [B, E] of every response under pi, pi_ref, pi_plus, pi_minus (sequence level,
    normalised), the token-level pi_plus / pi_minus ('tok_plus', 'tok_minus'), and 'vanilla_weight'."""
    beta = self.ctx.beta
    lp, lr = self._logp(policy_params), self._ref_logp(ref_params)
    plus, minus = (1 + beta) * lp - beta * lr, (1 - beta) * lp + beta * lr
    zp, zm = jax.nn.logsumexp(plus, -1), jax.nn.logsumexp(minus, -1)
    d = dict(policy=lp, ref=lr, plus=plus - zp[:, None], minus=minus - zm[:, None],
             vanilla_weight=jax.nn.sigmoid(-(zp + zm)))
    if with_pilaf:
      d['tok_plus'] = self._mixture(policy_params, ref_params, 1 + beta)
      d['tok_minus'] = self._mixture(policy_params, ref_params, 1 - beta)
    return {k: np.asarray(v, np.float64) for k, v in d.items()}

  def gram(self, policy_params) -> np.ndarray:
    """Per-prompt Gram matrices of the per-response gradients, [B, E, E]."""
    return np.stack([np.asarray(self._gram(policy_params, self.prompts.tokens[i], self.prompts.mask[i]),
                                np.float64) for i in range(self.prompts.tokens.shape[0])])

  def population_gradients(self, policy_params, ref_params, samplers: Sequence[str] = LAB_SAMPLERS) -> dict:
    """grad J and each sampler's population DPO loss gradient (pytrees), and the distributions."""
    d = self.distributions(policy_params, ref_params, with_pilaf='pilaf' in samplers)
    ref_lp = jnp.asarray(d['ref'], jnp.float32)
    j, grad_j = self._j_and_grad(policy_params, ref_lp)
    qs = pair_distributions(samplers, d, self.ctx.beta, self.ctx.vanilla_fraction, self.ctx.best_of_n)
    grads = {name: self._loss_grad(policy_params, ref_lp, jnp.asarray(qs[name], jnp.float32))
             for name in samplers}
    return dict(J=float(j), grad_J=grad_j, loss_grads=grads, q=qs, dists=d)

  def measure(self, policy_params, ref_params, samplers: Sequence[str] = LAB_SAMPLERS,
              variance: bool = True) -> dict:
    """J, J*, and per sampler: the cosine of the population DPO ascent direction with grad J, its
    norm, the per-label gradient variance (total and along grad J)."""
    beta = self.ctx.beta
    pg = self.population_gradients(policy_params, ref_params, samplers)
    d, qs = pg['dists'], pg['q']
    gj = _flat(pg['grad_J'])
    u = gj / jnp.linalg.norm(gj)
    # Component of each response's gradient along grad J: v[x, y] = <grad log pi(y|x), u>.
    v = np.asarray(self._jvp(policy_params, _unflatten(u, policy_params)), np.float64)
    gram = self.gram(policy_params) if variance else None
    p = np.exp(d['policy'])
    out = {'J': pg['J'], 'J_star': optimum(d['ref'], self.rewards, beta),
           'kl': float(np.mean(np.sum(p * (d['policy'] - d['ref']), -1))),
           'reward': float(np.mean(np.sum(p * self.rewards, -1))),
           'grad_J_norm': float(jnp.linalg.norm(gj)), 'samplers': {}}
    for name in samplers:
      ascent = -_flat(pg['loss_grads'][name])
      norm = float(jnp.linalg.norm(ascent))
      row = {'cosine': float(jnp.dot(ascent, gj) / (norm * jnp.linalg.norm(gj))),
             'grad_norm': norm, 'along_J': float(jnp.dot(ascent, u))}
      if variance:
        second = gradient_second_moment(d['policy'], d['ref'], self.rewards, qs[name], beta, gram)
        second_u = gradient_second_moment(d['policy'], d['ref'], self.rewards, qs[name], beta,
                                          v[:, :, None] * v[:, None, :])
        row['variance'] = float(second - norm ** 2)
        row['variance_along_J'] = float(second_u - row['along_J'] ** 2)
        # Labelled pairs for the J-component of the mean gradient to reach signal/noise = 1.
        row['labels_for_snr1_along_J'] = (float(row['variance_along_J'] / row['along_J'] ** 2)
                                          if row['along_J'] else float('inf'))
      out['samplers'][name] = row
    return out


def _unflatten(flat: jax.Array, like):
  leaves, treedef = jax.tree.flatten(like)
  out, i = [], 0
  for x in leaves:
    out.append(flat[i:i + x.size].reshape(x.shape).astype(x.dtype))
    i += x.size
  return jax.tree.unflatten(treedef, out)
