"""The exact theory lab (pilaf_jax/analysis/theory.py).

1. Finite differences, in float64 on a tabular softmax policy (jax.enable_x64, scoped): grad J and the
   population DPO gradient of every exact pair distribution agree with central differences to 1e-4;
   the per-label variance formula (Gram matrices) equals a brute-force sum over every labelled pair;
   the exact best-of-N pair distribution equals brute force over all N-tuples of draws; J* is the
   value of pi* and bounds J.
2. Monte Carlo with the REAL samplers (make_sampler) on a tiny Llama: the real DPO loss's per-pair
   gradients, averaged over many sampled and Bradley-Terry-labelled pairs, agree with the exact
   population gradient within their error bars (along the exact direction and a random one), and
   their mean squared norm agrees with the exact E||g||^2.
3. The price (analysis/price.py): the component of the per-pair gradient along grad J (mean a and
   variance s^2, hence n1) against the real samplers; log Z+ Z- and sd_pi(r_theta), sd_pi(r* - r_theta)
   against samples of the real vanilla sampler; the token-level PILAF tables built from prefix masses
   against the network's own token mixture; the tabular map model against brute force and finite
   differences.
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EOS, PAD, TINY_ALLOWED, prompt_batch, response_ids
from pilaf_jax.analysis import theory
from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch
from pilaf_jax.labelling.oracles import make_label_rule
from pilaf_jax.learning.dpo import preference_loss
from pilaf_jax.sampling import DecodeSettings, SamplerContext, make_sampler
from pilaf_jax.sampling.samplers import enumerate_responses

BETA = 0.5  # Larger than the paper's 0.1 so the samplers' distributions differ clearly.


# --- 1. exact computations against finite differences and brute force (float64, tabular) ---------

@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _tabular(seed=0, b=2, e=7):
  rs = np.random.RandomState(seed)
  theta = jnp.asarray(rs.randn(b, e) * 1.5)
  ref_logp = jax.nn.log_softmax(jnp.asarray(rs.randn(b, e)), -1)
  rewards = jnp.asarray(rs.randn(b, e) * 2.0)
  return theta, ref_logp, rewards


def _dists(theta, ref_logp):
  lp = np.asarray(jax.nn.log_softmax(theta, -1), np.float64)
  lr = np.asarray(ref_logp, np.float64)
  plus, minus = (1 + BETA) * lp - BETA * lr, (1 - BETA) * lp + BETA * lr
  lse = lambda x: np.log(np.exp(x).sum(-1))
  zp, zm = lse(plus), lse(minus)
  return dict(policy=lp, ref=lr, plus=plus - zp[:, None], minus=minus - zm[:, None],
              vanilla_weight=1 / (1 + np.exp(zp + zm)))


def _fd(f, theta, direction, eps=1e-6):
  return (f(theta + eps * direction) - f(theta - eps * direction)) / (2 * eps)


def test_gradients_match_finite_differences(x64):
  theta, ref_logp, rewards = _tabular()
  obj = lambda t: theory.objective(jax.nn.log_softmax(t, -1), ref_logp, rewards, BETA)
  qs = theory.pair_distributions(['vanilla', 'hybrid', 't_pilaf', 'best_of_n'], _dists(theta, ref_logp),
                                 BETA, 0.5, 4)
  rs = np.random.RandomState(1)
  for k in range(3):
    v = jnp.asarray(rs.randn(*theta.shape))
    exact = float(jnp.vdot(jax.grad(obj)(theta), v))
    assert abs(exact - float(_fd(obj, theta, v))) <= 1e-4 * max(1.0, abs(exact))
    # The policy-gradient form, independent of autodiff: sum_y pi v_y (r - beta log(pi/pi_ref)).
    lp = jax.nn.log_softmax(theta, -1)
    dlp = jax.jvp(lambda t: jax.nn.log_softmax(t, -1), (theta,), (v,))[1]
    pg = float(jnp.mean(jnp.sum(jnp.exp(lp) * dlp * (rewards - BETA * (lp - ref_logp)), -1)))
    assert abs(exact - pg) < 1e-10
    for name, q in qs.items():
      loss = lambda t: theory.expected_dpo_loss(jax.nn.log_softmax(t, -1), ref_logp, rewards, jnp.asarray(q), BETA)
      g = float(jnp.vdot(jax.grad(loss)(theta), v))
      assert abs(g - float(_fd(loss, theta, v))) <= 1e-4 * max(1.0, abs(g)), name


def test_variance_formula_equals_brute_force(x64):
  theta, ref_logp, rewards = _tabular(seed=2, b=2, e=5)
  d = _dists(theta, ref_logp)
  q = theory.pair_distributions(['t_pilaf'], d, BETA, 0.5, 4)['t_pilaf']
  logp = lambda t: jax.nn.log_softmax(t, -1)
  jac = jax.jacrev(logp)(theta)  # [B, E, B, E]
  b, e = theta.shape
  flat = np.asarray(jac, np.float64).reshape(b, e, -1)
  gram = np.einsum('xap,xbp->xab', flat, flat)
  formula = theory.gradient_second_moment(d['policy'], d['ref'], rewards, q, BETA, gram)

  def pair_loss(t, x, w, l):
    h = BETA * (logp(t) - ref_logp)
    return -jax.nn.log_sigmoid(h[x, w] - h[x, l])
  grad_pair = jax.jit(jax.grad(pair_loss))
  second, mean = 0.0, 0.0
  for x in range(b):
    for a_, b_ in itertools.product(range(e), repeat=2):
      p_a = 1 / (1 + np.exp(-(rewards[x, a_] - rewards[x, b_])))
      for w, l, p in ((a_, b_, p_a), (b_, a_, 1 - p_a)):
        g = np.asarray(grad_pair(theta, x, w, l), np.float64)
        weight = q[x, a_, b_] * p / b
        second += weight * np.sum(g ** 2)
        mean = mean + weight * g
  assert abs(formula - second) < 1e-10 * max(1.0, second)
  loss = lambda t: theory.expected_dpo_loss(logp(t), ref_logp, rewards, jnp.asarray(q), BETA)
  np.testing.assert_allclose(mean, np.asarray(jax.grad(loss)(theta)), atol=1e-12)


def test_best_of_n_distribution_equals_brute_force(x64):
  theta, ref_logp, _ = _tabular(seed=3, b=1, e=5)
  d = _dists(theta, ref_logp)
  n = 3
  q = theory.best_of_n_pairs(d['policy'], d['ref'], BETA, n)[0]
  p, h = np.exp(d['policy'][0]), BETA * (d['policy'][0] - d['ref'][0])
  brute = np.zeros_like(q)
  for draws in itertools.product(range(len(p)), repeat=n):
    hs = h[list(draws)]
    best = int(np.argmax(hs))
    rest = np.where(np.arange(n) == best, np.inf, hs)
    worst = int(np.argmin(rest))
    brute[draws[best], draws[worst]] += np.prod(p[list(draws)])
  np.testing.assert_allclose(q, brute, atol=1e-12)
  assert abs(q.sum() - 1) < 1e-12


def test_optimum(x64):
  theta, ref_logp, rewards = _tabular(seed=4)
  j_star = theory.optimum(ref_logp, rewards, BETA)
  pi_star = jax.nn.log_softmax(ref_logp + rewards / BETA, -1)
  assert abs(float(theory.objective(pi_star, ref_logp, rewards, BETA)) - j_star) < 1e-10
  assert float(theory.objective(jax.nn.log_softmax(theta, -1), ref_logp, rewards, BETA)) < j_star


# --- 2. against Monte-Carlo estimates from the real samplers (tiny Llama) ------------------------

R = 2
M = 2048  # Sampled pairs per sampler.
Z = 4.5  # Error-bar multiple (the comparisons are many; a false alarm at 4.5 sigma is ~1e-5 each).


@pytest.fixture(scope='module')
def lab(tiny_pair):
  (policy, pp), (ref, rp) = tiny_pair
  ctx = SamplerContext(policy=policy, ref=ref, settings=DecodeSettings(R, EOS, PAD), beta=BETA,
                       allowed_tokens=TINY_ALLOWED, best_of_n=4, vanilla_fraction=0.5)
  prompts = prompt_batch(2, length=3, seed=5)
  prompts = prompts.replace(ids=jnp.arange(2, dtype=jnp.int32))
  tokens, mask = enumerate_responses(TINY_ALLOWED, EOS, PAD, R)
  rewards = np.random.RandomState(6).randn(2, tokens.shape[0]) * 2.0
  return theory.ExactLab(ctx, prompts, rewards, tokens, mask), pp, rp


def _pair_loss(ctx, params, prompt_tokens, prompt_mask, responses, response_mask, ref_logprobs, a_preferred):
  """The real DPO loss (learning/dpo.py, as dpo_step computes it) of one labelled pair, the
  reference's log-probs taken from the sampler's pair."""
  pairs = PairBatch(prompts=PromptBatch(prompt_tokens[None], prompt_mask[None]), responses=responses[None],
                    response_mask=response_mask[None], policy_logprobs=jnp.zeros_like(ref_logprobs[None]),
                    ref_logprobs=ref_logprobs[None], source=None, cost=None)
  return preference_loss(ctx.policy, params, PreferenceBatch(pairs, a_preferred[None]), ctx.beta, ctx.allowed)[0]


@pytest.fixture(scope='module')
def per_pair(lab):
  """Jitted once for every sampler (same shapes): per-pair directional derivatives and gradients."""
  ctx = lab[0].ctx

  def batched(fn):
    def run(params, extra, pairs_args):
      return jax.vmap(lambda *a: fn(lambda p: _pair_loss(ctx, p, *a), params, extra))(*pairs_args)
    return jax.jit(run)
  return {'jvp': batched(lambda f, p, v: theory.directional_derivative(f, p, v)),
          'grad': batched(lambda f, p, _: jax.grad(f)(p))}


def _pair_args(labelled: PreferenceBatch):
  pairs = labelled.pairs
  return (pairs.prompts.tokens, pairs.prompts.mask, pairs.responses, pairs.response_mask, pairs.ref_logprobs,
          labelled.a_preferred)


@pytest.mark.parametrize('name', ['vanilla', 'pilaf', 'hybrid', 't_pilaf', 't_pilaf_half', 'best_of_n'])
def test_population_gradient_matches_the_real_sampler(lab, per_pair, name):
  lab, pp, rp = lab
  ctx = lab.ctx
  exact = lab.population_gradients(pp, rp, [name])
  g = exact['loss_grads'][name]
  second_exact = theory.gradient_second_moment(exact['dists']['policy'], exact['dists']['ref'], lab.rewards,
                                               exact['q'][name], BETA, lab.gram(pp))

  pairs = make_sampler(name, ctx)(pp, rp, lab.prompts.repeat(M // 2), jax.random.key(11))
  ids = np.asarray(pairs.prompts.ids)
  resp = [response_ids(np.asarray(pairs.responses[:, i]), lab.tokens) for i in (0, 1)]
  assert all((r >= 0).all() for r in resp)
  rewards = np.stack([lab.rewards[ids, resp[0]], lab.rewards[ids, resp[1]]], 1)
  a_preferred = make_label_rule('bradley_terry')(jnp.asarray(rewards), jax.random.key(12))
  labelled = PreferenceBatch(pairs, a_preferred)

  rs = np.random.RandomState(13)
  g_leaves, treedef = jax.tree.flatten(g)
  norm = lambda leaves: np.sqrt(sum(float(jnp.sum(x ** 2)) for x in leaves))
  unit = lambda leaves: jax.tree.unflatten(treedef, [x / norm(leaves) for x in leaves])
  directions = [unit(g_leaves), unit([jnp.asarray(rs.randn(*x.shape), x.dtype) for x in g_leaves])]
  for v in directions:
    along = np.asarray(per_pair['jvp'](pp, v, _pair_args(labelled)), np.float64)
    target = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v))))
    se = along.std(ddof=1) / np.sqrt(M)
    assert abs(along.mean() - target) < Z * se + 1e-6, (name, along.mean(), target, se)

  grads = per_pair['grad'](pp, 0, _pair_args(labelled))
  sq = sum(np.asarray(jnp.sum(x.reshape(M, -1) ** 2, 1), np.float64) for x in jax.tree.leaves(grads))
  assert abs(sq.mean() - second_exact) < Z * sq.std(ddof=1) / np.sqrt(M), (name, sq.mean(), second_exact)


def test_measure_reports_every_sampler(lab):
  lab, pp, rp = lab
  out = lab.measure(pp, rp)
  assert out['J'] < out['J_star']
  for name in theory.LAB_SAMPLERS:
    row = out['samplers'][name]
    assert -1 <= row['cosine'] <= 1 and row['variance'] >= -1e-6 and row['variance_along_J'] >= -1e-6
  # At the reference (theta = ref), pilaf and t_pilaf are exactly vanilla, and so is best-of-N (all tie).
  at_ref = lab.measure(rp, rp, variance=False)['samplers']
  for name in ('pilaf', 't_pilaf', 'best_of_n'):
    assert abs(at_ref[name]['cosine'] - at_ref['vanilla']['cosine']) < 1e-4, name


# --- 3. the price: a, s^2, n1, the policy state, the tabular model ---------------------------------

from pilaf_jax.analysis import price  # noqa: E402


def _unit(tree):
  n = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(tree)))
  return jax.tree.map(lambda x: x / n, tree)


@pytest.mark.parametrize('name', ['vanilla', 'pilaf', 't_pilaf_half'])
def test_price_along_grad_j_matches_the_real_sampler(lab, per_pair, name):
  lab, pp, rp = lab
  measured = price.lab_price(lab, pp, rp, [name])['samplers'][name]
  u = _unit(lab.population_gradients(pp, rp, [name])['grad_J'])
  pairs = make_sampler(name, lab.ctx)(pp, rp, lab.prompts.repeat(M // 2), jax.random.key(21))
  ids = np.asarray(pairs.prompts.ids)
  resp = [response_ids(np.asarray(pairs.responses[:, i]), lab.tokens) for i in (0, 1)]
  rewards = np.stack([lab.rewards[ids, resp[0]], lab.rewards[ids, resp[1]]], 1)
  labelled = PreferenceBatch(pairs, make_label_rule('bradley_terry')(jnp.asarray(rewards), jax.random.key(22)))
  # Ascent = minus the loss gradient: its component along grad J per pair.
  along = -np.asarray(per_pair['jvp'](pp, u, _pair_args(labelled)), np.float64)
  mean, var = along.mean(), along.var(ddof=1)
  se_mean = np.sqrt(var / M)
  se_var = np.sqrt(max(np.mean((along - mean) ** 4) - var ** 2, 0) / M)
  assert abs(mean - measured['along_J']) < Z * se_mean, (name, mean, measured['along_J'], se_mean)
  assert abs(var - measured['variance_along_J']) < Z * se_var, (name, var, measured['variance_along_J'], se_var)
  assert measured['labels_for_snr1_along_J'] == pytest.approx(measured['variance_along_J'] / measured['along_J'] ** 2)


def test_policy_state_matches_samples_of_the_real_sampler(lab):
  lab, pp, rp = lab
  d = lab.distributions(pp, rp, with_pilaf=False)
  state = price.policy_state(d['policy'], d['ref'], lab.rewards, BETA)
  pairs = make_sampler('vanilla', lab.ctx)(pp, rp, lab.prompts.repeat(M // 2), jax.random.key(23))
  ids = np.asarray(pairs.prompts.ids)
  idx = response_ids(np.asarray(pairs.responses[:, 0]), lab.tokens)
  r_theta = BETA * np.asarray(pairs.policy_logprobs[:, 0].sum(-1) - pairs.ref_logprobs[:, 0].sum(-1), np.float64)
  residual = lab.rewards[ids, idx] - r_theta
  z_plus, z_minus = [], []
  for x in range(lab.rewards.shape[0]):
    for f, key in ((r_theta, 'sd_r_theta'), (residual, 'sd_residual')):
      v = f[ids == x]
      n, var = len(v), v.var(ddof=1)
      se = np.sqrt(max(np.mean((v - v.mean()) ** 4) - var ** 2, 0) / n)
      assert abs(var - state['per_prompt'][key][x] ** 2) < Z * se + 1e-9, (key, x, var, se)
    # Z+ = E_pi exp(r_theta), Z- = E_pi exp(-r_theta): log Z+ Z- from samples.
    v = r_theta[ids == x]
    zp, zm = np.exp(v), np.exp(-v)
    z_plus.append((zp.mean(), zp.std(ddof=1) / np.sqrt(len(v))))
    z_minus.append((zm.mean(), zm.std(ddof=1) / np.sqrt(len(v))))
    exact = state['per_prompt']['log_zz'][x]
    lse = lambda z: np.log(np.sum(np.exp(z)))
    zp_exact = lse((1 + BETA) * d['policy'][x] - BETA * d['ref'][x])
    assert abs(z_plus[-1][0] - np.exp(zp_exact)) < Z * z_plus[-1][1], (x, z_plus[-1], np.exp(zp_exact))
    assert abs(z_minus[-1][0] - np.exp(exact - zp_exact)) < Z * z_minus[-1][1], (x, z_minus[-1])
    assert state['per_prompt']['t_pilaf_weight'][x] == pytest.approx(d['vanilla_weight'][x], rel=1e-5)


def test_token_mixture_from_prefix_masses_equals_the_network(lab):
  lab, pp, rp = lab
  d = lab.distributions(pp, rp)
  for coef, key in ((1 + BETA, 'tok_plus'), (1 - BETA, 'tok_minus')):
    table = price.token_mixture_table(d['policy'], d['ref'], lab.tokens, lab.mask, coef)
    np.testing.assert_allclose(table, d[key], atol=2e-4)
    np.testing.assert_allclose(np.exp(table).sum(-1), 1.0, atol=1e-9)


def test_tabular_price_matches_brute_force_and_finite_differences(x64):
  tokens, mask = enumerate_responses(TINY_ALLOWED, EOS, PAD, 2)
  rs = np.random.RandomState(8)
  b, e = 2, tokens.shape[0]
  lsm = lambda z: np.asarray(jax.nn.log_softmax(jnp.asarray(z), -1))
  logp, ref_logp = lsm(rs.randn(b, e) * 1.5), lsm(rs.randn(b, e))
  rewards = rs.randn(b, e) * 2.0
  out = price.tabular_measure(logp, ref_logp, rewards, tokens, mask, BETA,
                              samplers=('vanilla', 'pilaf', 't_pilaf', 't_pilaf_half'))
  obj = lambda t: float(theory.objective(jax.nn.log_softmax(jnp.asarray(t), -1), jnp.asarray(ref_logp),
                                         jnp.asarray(rewards), BETA))
  grad_j = np.asarray(jax.grad(lambda t: theory.objective(jax.nn.log_softmax(t, -1), jnp.asarray(ref_logp),
                                                          jnp.asarray(rewards), BETA))(jnp.asarray(logp)))
  u = grad_j / np.linalg.norm(grad_j)
  eps = 1e-4
  second_diff = (obj(logp + eps * u) - 2 * obj(logp) + obj(logp - eps * u)) / eps ** 2
  assert abs(out['curvature_along_J'] + second_diff) < 1e-4 * max(1.0, abs(second_diff))
  # a and s^2 by brute force over every pair and label (per-pair gradients by autodiff).
  d = price.tabular_distributions(logp, ref_logp, tokens, mask, BETA)
  qs = theory.pair_distributions(['vanilla', 'pilaf', 't_pilaf', 't_pilaf_half'], d, BETA, 0.5, 8)

  def pair_ascent(t, x, w, l):
    h = BETA * (jax.nn.log_softmax(t, -1) - jnp.asarray(ref_logp))
    return jax.nn.log_sigmoid(h[x, w] - h[x, l])
  grad_pair = jax.jit(jax.grad(pair_ascent))
  along = {}
  for x in range(b):
    for a_, b_ in itertools.product(range(e), repeat=2):
      p_a = 1 / (1 + np.exp(-(rewards[x, a_] - rewards[x, b_])))
      for w, l, p in ((a_, b_, p_a), (b_, a_, 1 - p_a)):
        along[(x, a_, b_, w)] = (float(np.sum(np.asarray(grad_pair(jnp.asarray(logp), x, w, l)) * u)), p)
  for name, q in qs.items():
    m1 = sum(q[x, a_, b_] * p * g / b for (x, a_, b_, _), (g, p) in along.items())
    m2 = sum(q[x, a_, b_] * p * g ** 2 / b for (x, a_, b_, _), (g, p) in along.items())
    row = out['samplers'][name]
    assert abs(row['along_J'] - m1) < 1e-9 and abs(row['variance_along_J'] - (m2 - m1 ** 2)) < 1e-9, name
    assert row['J_gain_per_label'] == pytest.approx(
        out['grad_J_norm'] ** 2 / (2 * out['curvature_along_J'] * row['labels_for_snr1_along_J'])) \
        if out['curvature_along_J'] > 0 else np.isnan(row['J_gain_per_label'])
  # The fixed coin: t_pilaf_half is t_pilaf with weight 1/2 on every prompt.
  np.testing.assert_allclose(qs['t_pilaf_half'], 0.5 * np.einsum('xa,xb->xab', np.exp(logp), np.exp(logp))
                             + 0.5 * np.einsum('xa,xb->xab', np.exp(d['plus']), np.exp(d['minus'])), atol=1e-12)


def test_lab_run_prices_every_measured_step(tmp_path):
  """The lab along a run (analysis/lab.py): every evaluation point carries the price and the policy
  state, and vanilla's gain relative to itself is 1."""
  import os
  import runpy
  from pilaf_jax.analysis import lab as theory_lab
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = runpy.run_path(os.path.join(root, 'configs', 'enumerable.py'))['get_config']()
  config.sft.steps = 10
  config.runtime.progress_bar = False
  config.eval.update(num_prompts=16, batch_size=16)
  samplers = ('vanilla', 't_pilaf_half')
  rows = theory_lab.run_lab(config, str(tmp_path), steps=1, every=1, num_prompts=4, train_sampler='vanilla',
                            samplers=samplers, log=lambda _: None)
  assert [r['step'] for r in rows] == [0, 1]
  for r in rows:
    assert set(r['samplers']) == set(samplers)
    assert 0 < r['t_pilaf_weight'] <= 0.5 + 1e-6  # 1/(1 + Z+ Z-), and Z+ Z- >= 1 (Jensen).
    assert len(r['per_prompt']['log_zz']) == 4 and r['sd_r_theta'] >= 0 and r['sd_residual'] > 0
    assert r['samplers']['vanilla']['relative_gain'] == pytest.approx(1.0)
    for s in samplers:
      row = r['samplers'][s]
      assert row['labels_for_snr1_along_J'] > 0 and 'J_gain_per_label' in row and 'curvature_along_J' in row
  assert rows[0]['sd_r_theta'] == pytest.approx(0.0, abs=1e-6)  # The policy starts at the reference.
  assert 'x van' in (tmp_path / 'theory.md').read_text()
