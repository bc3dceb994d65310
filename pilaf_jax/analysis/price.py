r"""The price of a sampler in signal per label: what a labelled pair buys along grad J.

For a sampler S with per-label stochastic DPO ascent direction m (one labelled pair, x uniform over
the prompts), u = grad J / |grad J|:
  a   = <E m, u>           the mean gain direction's component along grad J (per label),
  s^2 = Var <m, u>          its per-label variance,
  n1  = s^2 / a^2           labels for the averaged gradient's J-component to reach signal/noise 1,
  H   = -u^T (d^2 J) u      the curvature of J along u.
A step eta along the mean of n labels' directions changes J by, to second order along u,
eta |grad J| a - eta^2 H (a^2 + s^2 / n) / 2; at the best eta, per label, in the small-batch limit:
  gain per label = |grad J|^2 / (2 H n1)   (0 when a <= 0: no step size helps).
So between samplers at one policy, J gain per label is in the ratio of 1 / n1: that ratio is the
map's prediction (pilaf_jax/analysis/rare_map.py); it needs no curvature.

Also here: the state of the policy that decides where samplers can differ (log Z+ Z-, sd_pi(r_theta),
sd_pi(r* - r_theta), T-PILAF's per-prompt weight 1/(1 + Z+ Z-)), the exact token-level PILAF
distributions of any sequence-level policy given as a table (prefix masses), and the tabular softmax
policy's exact quantities (the map's model).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.analysis import theory

MAP_SAMPLERS = ('vanilla', 'pilaf', 't_pilaf', 't_pilaf_half', 'best_of_n')


def policy_state(logp, ref_logp, rewards, beta: float) -> dict:
  """Where the policy stands, per prompt [B] and averaged: log Z+ Z-, T-PILAF's vanilla weight,
  sd_pi(r_theta), sd_pi(r* - r_theta) (r_theta = beta log pi/pi_ref), KL(pi || pi_ref)."""
  logp, ref_logp, rewards = (np.asarray(x, np.float64) for x in (logp, ref_logp, rewards))
  p = np.exp(logp)
  r_theta = beta * (logp - ref_logp)
  lse = lambda z: z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
  log_zz = lse((1 + beta) * logp - beta * ref_logp) + lse((1 - beta) * logp + beta * ref_logp)
  sd = lambda f: np.sqrt(np.maximum(np.sum(p * f ** 2, -1) - np.sum(p * f, -1) ** 2, 0))
  per_prompt = dict(log_zz=log_zz, t_pilaf_weight=1 / (1 + np.exp(log_zz)), sd_r_theta=sd(r_theta),
                    sd_residual=sd(rewards - r_theta), kl=np.sum(p * (logp - ref_logp), -1))
  out = {k: float(np.mean(v)) for k, v in per_prompt.items()}
  out['per_prompt'] = {k: v.tolist() for k, v in per_prompt.items()}
  return out


def price(along_j: float, variance_along_j: float, grad_j_norm: float, curvature: Optional[float]) -> dict:
  """n1 and the J gain per label at the best step size from a, s^2, |grad J| and H (see above)."""
  n1 = variance_along_j / along_j ** 2 if along_j > 0 else float('inf')
  out = {'labels_for_snr1_along_J': n1}
  if curvature is not None:
    out['curvature_along_J'] = curvature
    out['J_gain_per_label'] = (grad_j_norm ** 2 / (2 * curvature * n1)
                               if curvature > 0 and np.isfinite(n1) else float('nan'))
  return out


# --- token-level PILAF of a policy given as a table over the enumerated responses ----------------

def _prefix_index(tokens: np.ndarray, mask: np.ndarray):
  """For each response e and position t: the id of its prefix y_<t and of y_<=t (a node id over
  every distinct prefix), and the children of every node."""
  nodes = {(): 0}
  e, r = tokens.shape
  parent, child = np.zeros((e, r), int), np.zeros((e, r), int)
  for i in range(e):
    prefix = ()
    for t in range(r):
      if not mask[i, t]:
        parent[i, t] = child[i, t] = -1
        continue
      parent[i, t] = nodes[prefix]
      prefix = prefix + (int(tokens[i, t]),)
      child[i, t] = nodes.setdefault(prefix, len(nodes))
  children = {}
  for i in range(e):
    for t in range(r):
      if mask[i, t]:
        children.setdefault(parent[i, t], set()).add(child[i, t])
  return parent, child, {k: sorted(v) for k, v in children.items()}, len(nodes)


def token_mixture_table(logp, ref_logp, tokens, mask, coef: float) -> np.ndarray:
  """log prod_t softmax(coef log pi(.|y_<t) + (1 - coef) log pi_ref(.|y_<t))[y_t], [B, E], where the
  per-token conditionals are those of the sequence-level tables logp, ref_logp [B, E] (prefix
  masses): what the token-level sampler draws when the models' sequence distributions are these."""
  logp, ref_logp = np.asarray(logp, np.float64), np.asarray(ref_logp, np.float64)
  parent, child, children, n_nodes = _prefix_index(np.asarray(tokens), np.asarray(mask))
  b, e = logp.shape

  def node_log_mass(lp):
    out = np.full((b, n_nodes), -np.inf)
    out[:, 0] = 0.0
    for i in range(e):
      for t in range(tokens.shape[1]):
        if child[i, t] >= 0:
          out[:, child[i, t]] = np.logaddexp(out[:, child[i, t]], lp[:, i])
    return out
  mp, mr = node_log_mass(logp), node_log_mass(ref_logp)
  mixed = np.zeros((b, n_nodes))  # log of the mixture's probability of each node given its parent.
  for node, kids in children.items():
    kids = np.asarray(kids)
    h = coef * (mp[:, kids] - mp[:, [node]]) + (1 - coef) * (mr[:, kids] - mr[:, [node]])
    top = h.max(-1, keepdims=True)
    mixed[:, kids] = h - top - np.log(np.exp(h - top).sum(-1, keepdims=True))
  out = np.zeros((b, e))
  for i in range(e):
    for t in range(tokens.shape[1]):
      if child[i, t] >= 0:
        out[:, i] += mixed[:, child[i, t]]
  return out


# --- the tabular softmax policy: every quantity exact, in closed form ------------------------------

def tabular_distributions(logp, ref_logp, tokens, mask, beta: float) -> dict:
  """theory.pair_distributions' inputs for a tabular policy (token-level PILAF by prefix masses)."""
  logp, ref_logp = np.asarray(logp, np.float64), np.asarray(ref_logp, np.float64)
  plus, minus = (1 + beta) * logp - beta * ref_logp, (1 - beta) * logp + beta * ref_logp
  lse = lambda z: z.max(-1, keepdims=True) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  zp, zm = lse(plus), lse(minus)
  return dict(policy=logp, ref=ref_logp, plus=plus - zp, minus=minus - zm,
              vanilla_weight=1 / (1 + np.exp(zp[:, 0] + zm[:, 0])),
              tok_plus=token_mixture_table(logp, ref_logp, tokens, mask, 1 + beta),
              tok_minus=token_mixture_table(logp, ref_logp, tokens, mask, 1 - beta))


def tabular_measure(logp, ref_logp, rewards, tokens, mask, beta: float,
                    samplers: Sequence[str] = MAP_SAMPLERS, vanilla_fraction: float = 0.5,
                    best_of_n: int = 8) -> dict:
  """Exact cosine, a, s^2, n1, curvature and J gain per label of each sampler for the tabular softmax
  policy theta[x, y] = logp (one free logit per prompt and response)."""
  with jax.enable_x64(True):
    theta = jnp.asarray(logp, jnp.float64)
    lr, r = jnp.asarray(ref_logp, jnp.float64), jnp.asarray(rewards, jnp.float64)
    obj = lambda t: theory.objective(jax.nn.log_softmax(t, -1), lr, r, beta)
    grad_j = np.asarray(jax.grad(obj)(theta))
    norm = float(np.linalg.norm(grad_j))
    u = grad_j / norm
    curvature = -float(jax.jvp(jax.grad(obj), (theta,), (jnp.asarray(u),))[1].ravel() @ u.ravel())
    d = tabular_distributions(logp, ref_logp, tokens, mask, beta)
    qs = theory.pair_distributions(samplers, d, beta, vanilla_fraction, best_of_n)
    p = np.exp(d['policy'])
    e = p.shape[1]
    # Per-response gradients of log pi(y|x) in x's block: e_y - pi.
    gram = np.eye(e)[None] - p[:, :, None] - p[:, None, :] + np.sum(p ** 2, -1)[:, None, None]
    v = u - np.sum(p * u, -1, keepdims=True)
    out = {'J': float(obj(theta)), 'grad_J_norm': norm, 'curvature_along_J': curvature,
           **policy_state(logp, ref_logp, rewards, beta), 'samplers': {}}
    for name in samplers:
      q = jnp.asarray(qs[name])
      ascent = -np.asarray(jax.grad(lambda t: theory.expected_dpo_loss(jax.nn.log_softmax(t, -1), lr, r, q,
                                                                       beta))(theta))
      along = float(np.sum(ascent * u))
      second = theory.gradient_second_moment(logp, ref_logp, rewards, qs[name], beta, gram)
      second_u = theory.gradient_second_moment(logp, ref_logp, rewards, qs[name], beta,
                                               v[:, :, None] * v[:, None, :])
      row = {'cosine': float(np.sum(ascent * grad_j) / (np.linalg.norm(ascent) * norm)), 'along_J': along,
             'variance': float(second - np.sum(ascent ** 2)), 'variance_along_J': float(second_u - along ** 2)}
      row.update(price(along, row['variance_along_J'], norm, curvature))
      out['samplers'][name] = row
  return out


def relative_gain(measured: dict, name: str, baseline: str = 'vanilla') -> float:
  """J gain per label of `name` over the baseline's at the same policy: n1(baseline) / n1(name)
  (0 when the sampler's mean direction does not ascend J)."""
  s = measured['samplers']
  n1, n1_base = s[name]['labels_for_snr1_along_J'], s[baseline]['labels_for_snr1_along_J']
  return 0.0 if not np.isfinite(n1) else n1_base / n1


# --- the network: the lab's measurement plus the price ---------------------------------------------

def curvature_along(grad_fn, params, direction, eps: float = 1e-2) -> float:
  """-u^T (d^2 J) u by a central difference of grad J (pytrees) along the unit pytree u."""
  shift = lambda s: jax.tree.map(lambda p, u: p + s * u.astype(p.dtype), params, direction)
  dot = lambda a, b: sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return -(dot(grad_fn(shift(eps)), direction) - dot(grad_fn(shift(-eps)), direction)) / (2 * eps)


def lab_price(lab, policy_params, ref_params, samplers: Sequence[str]) -> dict:
  """ExactLab.measure plus the policy state, the curvature of J along grad J, and each sampler's
  n1, J gain per label and gain relative to vanilla (when measured)."""
  out = lab.measure(policy_params, ref_params, samplers, variance=True)
  d = lab.distributions(policy_params, ref_params, with_pilaf=False)
  out.update(policy_state(d['policy'], d['ref'], lab.rewards, lab.ctx.beta))
  ref_lp = jnp.asarray(d['ref'], jnp.float32)
  grad_fn = lambda p: lab._j_and_grad(p, ref_lp)[1]  # pylint: disable=protected-access
  g = grad_fn(policy_params)
  norm = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g)))
  curvature = curvature_along(grad_fn, policy_params, jax.tree.map(lambda x: x / norm, g))
  for row in out['samplers'].values():
    row.update(price(row['along_J'], row['variance_along_J'], out['grad_J_norm'], curvature))
  if 'vanilla' in out['samplers']:
    for name in out['samplers']:
      out['samplers'][name]['relative_gain'] = relative_gain(out, name)
  return out
