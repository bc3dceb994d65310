"""The stable library surface (pilaf_jax/api.py, re-exported by `import pilaf_jax`).

1. The example examples/own_optax_loop.py, run as users run it, raises the held-out reward of its
   policy by more than 3 standard errors on the synthetic task.
2. sample_pairs / make_pair_sampler: every registered sampler gives a well-formed PairBatch, the
   same pairs as the registry's own sampler, the same pairs for the same rng (also under an outer
   jit, and without recompiling), and clear errors for bad names and arguments.
3. dpo_loss and dpo_batch_loss against the DPO formula computed by hand, and against dpo_step.
4. The package: version, changelog, a cheap `import pilaf_jax`, every exported name resolves.
"""
import functools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pilaf_jax as pj
from conftest import EOS, PAD, TINY_ALLOWED, TINY_VOCAB, prompt_batch, tiny_model
from pilaf_jax import api
from pilaf_jax.batches import PI_MINUS, PI_PLUS, POLICY, REFERENCE
from pilaf_jax.learning.dpo import dpo_step
from pilaf_jax.learning.train_state import init_train_state, make_optimizer
from pilaf_jax.sampling import DecodeSettings, SamplerContext, make_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R, B, BETA = 3, 6, 0.5
SETTINGS = dict(max_new_tokens=R, eos_ids=EOS, pad_id=PAD, allowed_tokens=TINY_ALLOWED)
SOURCES = {'vanilla': {(POLICY, POLICY)}, 'best_of_n': {(POLICY, POLICY)}, 'hybrid': {(POLICY, REFERENCE)},
           'pilaf': {(POLICY, POLICY), (PI_PLUS, PI_MINUS)},
           't_pilaf': {(POLICY, POLICY), (PI_PLUS, PI_MINUS)},
           't_pilaf_half': {(POLICY, POLICY), (PI_PLUS, PI_MINUS)}}


# --- 1. the example ---------------------------------------------------------------------------------

def test_example_optax_loop_gains_more_than_3_se():
  path = os.path.join(ROOT, 'examples', 'own_optax_loop.py')
  with open(path) as f:
    assert len(f.read().splitlines()) < 60
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  print(out.stdout)
  number = r'([-+\d.]+)'
  m = re.search(rf'held-out reward: {number} ± {number} -> {number} ± {number} '
                rf'\(gain {number} = {number} SE\)', out.stdout)
  assert m, out.stdout
  before, se_before, after, se_after, gain, gain_se = map(float, m.groups())
  # The printed figure is what the numbers say (SE of the difference, independent-samples bound).
  assert abs(gain_se - (after - before) / math.hypot(se_before, se_after)) < 0.15
  assert gain_se > 3, out.stdout


# --- 2. sample_pairs ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def models():
  (policy, pp), (ref, rp) = tiny_model(0, scale=3.0), tiny_model(1, scale=3.0)
  return policy, ref, pp, rp, prompt_batch(B, length=3, left_pad=(1,))


def _sample(models, name, rng=0, **kw):
  policy, ref, pp, rp, prompts = models
  return pj.sample_pairs(policy, ref, pp, rp, prompts, jax.random.key(rng), sampler=name, beta=BETA,
                         **dict(SETTINGS, best_of_n=3, **kw))


def _assert_same_pairs(a, b, exact_logprobs=True):
  """Same tokens, masks and sources; log-probs equal (or within float rounding: another XLA program
  may fuse the same arithmetic differently)."""
  for field in ('responses', 'response_mask', 'source'):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
  for field in ('policy_logprobs', 'ref_logprobs'):
    check = np.testing.assert_array_equal if exact_logprobs else functools.partial(
        np.testing.assert_allclose, atol=1e-5)
    check(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_every_sampler_gives_a_well_formed_pair_batch(models, name):
  assert name in pj.available_samplers()
  prompts = models[-1]
  pairs = _sample(models, name)
  assert isinstance(pairs, pj.PairBatch)
  for field in ('responses', 'response_mask', 'policy_logprobs', 'ref_logprobs'):
    assert getattr(pairs, field).shape == (B, 2, R), field
  assert pairs.source.shape == (B, 2) and pairs.prompts.tokens.shape == prompts.tokens.shape
  assert {tuple(s) for s in np.asarray(pairs.source).tolist()} <= SOURCES[name]
  tokens, mask = np.asarray(pairs.responses), np.asarray(pairs.response_mask)
  assert TINY_ALLOWED[tokens[mask]].all() and (tokens[~mask] == PAD).all()
  assert mask[..., 0].all()  # Every response has at least one token.
  lengths = mask.sum(-1)
  ends = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
  assert ((ends == EOS) | (lengths == R)).all()  # A response stops at EOS or at R tokens.
  ref_lp = np.asarray(pairs.ref_logprobs)
  assert np.all(ref_lp[mask] < 0) and np.all(ref_lp[~mask] == 0)
  assert int(pairs.cost.pairs) == B and int(pairs.cost.oracle_responses) == 2 * B
  # A fixed rng gives the same pairs (from the cached, compiled sampler: no new compilation).
  before = api._cached_sampler.cache_info()
  _assert_same_pairs(_sample(models, name), pairs)
  after = api._cached_sampler.cache_info()
  assert (after.hits, after.misses) == (before.hits + 1, before.misses)


def test_pairs_are_the_registry_samplers_and_a_pure_function_of_the_rng(models):
  policy, ref, pp, rp, prompts = models
  first = _sample(models, 'pilaf', 3)
  # The API's settings reach the sampler as the project's own loops pass them.
  ctx = SamplerContext(policy=policy, ref=ref, settings=DecodeSettings(R, EOS, PAD), beta=BETA,
                       allowed_tokens=TINY_ALLOWED, best_of_n=3)
  _assert_same_pairs(make_sampler('pilaf', ctx)(pp, rp, prompts, jax.random.key(3)), first)
  _assert_same_pairs(_sample(models, 'pilaf', 3), first)
  other = _sample(models, 'pilaf', 4)
  assert not np.array_equal(np.asarray(first.responses), np.asarray(other.responses))


def test_inside_your_own_jit(models):
  policy, ref, pp, rp, prompts = models
  # make_pair_sampler(jit=False): the plain function, to jit yourself; it traces (shapes only, no compile).
  plain = pj.make_pair_sampler(policy, ref, sampler='pilaf', beta=BETA, jit=False, **SETTINGS)
  shapes = jax.eval_shape(plain, pp, rp, prompts, jax.random.key(5))
  assert shapes.responses.shape == (B, 2, R) and shapes.source.shape == (B, 2)

  # sample_pairs called while tracing an outer jit (t_pilaf: the cheapest program to compile).
  @jax.jit
  def inside_my_jit(pp, rp, prompts, rng):
    return pj.sample_pairs(policy, ref, pp, rp, prompts, rng, sampler='t_pilaf', beta=BETA, **SETTINGS)
  _assert_same_pairs(inside_my_jit(pp, rp, prompts, jax.random.key(5)), _sample(models, 't_pilaf', 5),
                     exact_logprobs=False)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(sampler='pilaff'), ValueError,
     r"sampler='pilaff' is unknown; allowed: \['best_of_n', 'hybrid', 'pilaf', 't_pilaf', 't_pilaf_half', 'vanilla'\]"),
    (dict(sampler=None), ValueError, 'sampler=None is unknown'),
    (dict(beta=0.0), ValueError, 'beta=0.0 must be a number > 0'),
    (dict(beta=-1), ValueError, 'beta=-1'),
    (dict(max_new_tokens=0), ValueError, 'max_new_tokens=0 must be an integer >= 1'),
    (dict(eos_ids=TINY_VOCAB), ValueError, r'eos_ids=5 must be one token id .* in \[0, 5\)'),
    (dict(eos_ids=()), ValueError, 'eos_ids=()'),
    (dict(pad_id=-1), ValueError, 'pad_id=-1'),
    (dict(temperature=-1.0), ValueError, r'temperature=-1.0 must be >= 0 \(0: greedy'),
    (dict(top_k=-2), ValueError, 'top_k=-2'),
    (dict(top_p=0.0), ValueError, r'top_p=0.0 must lie in \(0, 1\]'),
    (dict(allowed_tokens=np.ones(3, bool)), ValueError,
     r'allowed_tokens must be a boolean mask of shape \(5,\)'),
    (dict(allowed_tokens=np.arange(TINY_VOCAB) > EOS), ValueError, 'excludes every stop token'),
    (dict(sampler='best_of_n', best_of_n=1), ValueError, 'best_of_n=1: best-of-N needs N >= 2'),
    (dict(sampler='pilaf', vanilla_fraction=1.5), ValueError, 'vanilla_fraction=1.5 must lie in'),
    (dict(sampler='t_pilaf', allowed_tokens=None), ValueError, 't_pilaf needs the task to declare'),
    (dict(sampler='t_pilaf', max_new_tokens=12), ValueError, 't_pilaf enumerates every response'),
])
def test_bad_arguments_fail_early_and_name_the_argument(models, kwargs, error, match):
  policy, ref, pp, rp, prompts = models
  args = dict(SETTINGS, sampler='pilaf', beta=BETA)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    pj.sample_pairs(policy, ref, pp, rp, prompts, jax.random.key(0), **args)
  with pytest.raises(error, match=match):
    pj.make_pair_sampler(policy, ref, **args)


def test_bad_models_and_prompts(models):
  policy, ref, pp, rp, prompts = models
  call = functools.partial(pj.sample_pairs, sampler='vanilla', beta=BETA, **SETTINGS)
  with pytest.raises(TypeError, match='prompts must be a pilaf_jax.PromptBatch'):
    call(policy, ref, pp, rp, prompts.tokens, jax.random.key(0))
  with pytest.raises(ValueError, match=r'prompts.tokens must be \[B, P\]'):
    call(policy, ref, pp, rp, pj.PromptBatch(prompts.tokens[0], prompts.mask[0]), jax.random.key(0))
  with pytest.raises(TypeError, match='ref must be a pilaf_jax.Llama module'):
    call(policy, rp, pp, rp, prompts, jax.random.key(0))
  other, _ = tiny_model(2, vocab=7)
  with pytest.raises(ValueError, match='must share one vocabulary'):
    call(policy, other, pp, rp, prompts, jax.random.key(0))


# --- 3. the DPO loss ---------------------------------------------------------------------------------

def test_dpo_loss_is_the_formula():
  pc, pr = np.array([-3.0, -1.0, -2.5]), np.array([-5.0, -1.0, -0.5])
  rc, rr = np.array([-4.0, -1.0, -1.0]), np.array([-4.0, -3.0, -1.5])
  loss, metrics = pj.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), 0.1)
  margin = 0.1 * ((pc - rc) - (pr - rr))  # [0.2, -0.2, -0.25]
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-margin))), rtol=1e-6)
  np.testing.assert_allclose(metrics['implicit_margin'], margin.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['implicit_accuracy'], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics['chosen_reward'], np.mean(0.1 * (pc - rc)), rtol=1e-6)
  np.testing.assert_allclose(metrics['rejected_reward'], np.mean(0.1 * (pr - rr)), rtol=1e-6)


def test_dpo_batch_loss_by_hand_and_equal_to_dpo_step(models):
  policy, ref, pp, rp, prompts = models
  pairs = _sample(models, 'hybrid', 9)
  a_preferred = jnp.asarray([True, False, True, True, False, False])
  batch = pj.PreferenceBatch(pairs, a_preferred)
  # One compiled program for the loss, its metrics and its gradient (reused for the flipped labels).
  loss_fn = lambda p, batch: pj.dpo_batch_loss(policy, p, batch, beta=BETA, allowed_tokens=TINY_ALLOWED)
  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, metrics), grads = loss_and_grad(pp, batch)
  # By hand: sequence log-probs of each response under the policy and the reference (teacher-forced;
  # policy and reference share one architecture, so one compiled scorer serves both).
  score = jax.jit(lambda params, j: pj.response_logprobs(
      policy, params, pairs.prompts.tokens, pairs.prompts.mask, pairs.responses[:, j],
      pairs.response_mask[:, j], jnp.asarray(TINY_ALLOWED)).sum(-1), static_argnums=1)
  pol = np.stack([np.asarray(score(pp, j), np.float64) for j in (0, 1)], 1)
  refs = np.stack([np.asarray(score(rp, j), np.float64) for j in (0, 1)], 1)
  np.testing.assert_allclose(refs, np.asarray(pairs.ref_logprobs).sum(-1), atol=1e-5)  # From the sampler.
  w = np.where(np.asarray(a_preferred), 0, 1)
  idx = np.arange(B)
  margin = BETA * ((pol[idx, w] - refs[idx, w]) - (pol[idx, 1 - w] - refs[idx, 1 - w]))
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-margin))), rtol=1e-5)
  np.testing.assert_allclose(metrics['implicit_accuracy'], np.mean(margin > 0), rtol=1e-6)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  (flipped, _), _ = loss_and_grad(pp, pj.PreferenceBatch(pairs, ~a_preferred))
  np.testing.assert_allclose(flipped, np.mean(np.log1p(np.exp(margin))), rtol=1e-5)
  # The same loss the project's own DPO step optimises.
  tx = make_optimizer(1e-3, 1)
  step = jax.jit(functools.partial(dpo_step, model=policy, tx=tx, beta=BETA,
                                   allowed_tokens=jnp.asarray(TINY_ALLOWED)))
  _, step_metrics = step(init_train_state(pp, tx), batch)
  np.testing.assert_allclose(loss, step_metrics['dpo_loss'], rtol=1e-5)
  with pytest.raises(TypeError, match='PreferenceBatch'):
    pj.dpo_batch_loss(policy, pp, pairs)
  with pytest.raises(ValueError, match=r'a_preferred must be \[B\]'):
    pj.dpo_batch_loss(policy, pp, pj.PreferenceBatch(pairs, a_preferred[:2]))


def test_bradley_terry_labels():
  rewards = jnp.asarray([[20.0, -20.0], [-20.0, 20.0]] * 50)
  labels = np.asarray(pj.bradley_terry_labels(rewards, jax.random.key(0)))
  np.testing.assert_array_equal(labels, [True, False] * 50)
  frequency = np.asarray(pj.bradley_terry_labels(jnp.zeros((4000, 2)), jax.random.key(1))).mean()
  assert abs(frequency - 0.5) < 0.04  # sigmoid(0) = 1/2; 4.4 SE.
  with pytest.raises(ValueError, match=r'rewards must be \[B, 2\]'):
    pj.bradley_terry_labels(jnp.zeros((3,)), jax.random.key(0))


# --- 4. the package ----------------------------------------------------------------------------------

def test_version_changelog_and_exports():
  assert re.fullmatch(r'\d+\.\d+\.\d+', pj.__version__)
  with open(os.path.join(ROOT, 'CHANGELOG.md')) as f:
    releases = re.findall(r'^## \[(\d+\.\d+\.\d+)\]', f.read(), re.M)
  assert releases and releases[0] == pj.__version__  # The newest release in the changelog is this one.
  with open(os.path.join(ROOT, 'setup.py')) as f:
    assert "version='" not in f.read()  # One source of truth: setup.py reads pilaf_jax/__init__.py.
  for name in pj.__all__:
    assert getattr(pj, name) is not None, name
  assert pj.dpo_loss is api.dpo_loss and pj.PairBatch is api.PairBatch
  with pytest.raises(AttributeError, match='no attribute'):
    pj.not_a_name  # noqa: B018


def test_import_is_cheap():
  code = ('import sys, pilaf_jax; assert "jax" not in sys.modules, "import pilaf_jax imported jax"; '
          'print(pilaf_jax.__version__)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0 and out.stdout.strip() == pj.__version__, out.stderr
