"""Shared fixtures: tiny models and tiny vocabularies whose every response can be enumerated."""
import os
import sys

import tempfile

# The suite's programs are tiny: compiling them, not running them, is most of its time. So tests (and
# the runs they start, which inherit this environment) compile at LLVM optimisation level 0 (its passes
# are the bulk of XLA:CPU's compile time) and with XLA:CPU's older elemental fusion emitters instead of
# the MLIR ones (which cost more at level 0): a cold `main` run of configs/tiny.py takes 21.6 s of CPU at
# XLA's defaults, 13.9 s at level 0, 9.9 s with both. Same programs, results within float rounding.
# Benchmarks and users keep XLA's defaults. Set before jax compiles.
TEST_XLA_FLAGS = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
for _flag in TEST_XLA_FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
# One persistent compilation cache for the whole session (xdist workers and the runs tests launch
# all inherit it): the many `main` runs of configs/tiny.py compile the same programs once.
_OWN_COMPILE_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_COMPILE_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='pilaf_jax_test_compile_cache_')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pilaf_jax.batches import PromptBatch  # noqa: E402
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params  # noqa: E402
from pilaf_jax.model.scoring import response_logprobs  # noqa: E402
from pilaf_jax.sampling.samplers import enumerate_responses  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
TINY_VOCAB = 5  # PAD, BOS, EOS and two content tokens.
TINY_ALLOWED = np.arange(TINY_VOCAB) >= EOS


def tiny_model(seed: int, vocab: int = TINY_VOCAB, scale: float = 1.0, **overrides):
  """A small random Llama. scale > 1 sharpens its distributions (random init is near uniform)."""
  cfg = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
             num_kv_heads=1)
  cfg.update(overrides)
  model = Llama(LlamaConfig(**cfg))
  params = init_params(model.cfg, jax.random.key(seed))
  params = jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, params)
  return model, params


def prompt_batch(rows, length: int = 3, seed: int = 0, vocab: int = TINY_VOCAB, left_pad=()):
  """rows prompts of BOS + random content; row i gets left_pad[i] padding tokens."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(3, vocab, size=(rows, length)).astype(np.int32)
  tokens[:, 0] = BOS
  mask = np.ones((rows, length), bool)
  for i, pad in enumerate(left_pad):
    tokens[i, :pad], mask[i, :pad] = PAD, False
    tokens[i, pad] = BOS
  return PromptBatch(jnp.asarray(tokens), jnp.asarray(mask))


def enumerate_tiny(max_len: int):
  return enumerate_responses(TINY_ALLOWED, EOS, PAD, max_len)


# Teacher-forced log-probs as one compiled program (the module is static): run eagerly, flax dispatches
# every op on its own, seconds per new shape.
score_responses = jax.jit(response_logprobs, static_argnums=0)


def sequence_logprobs(model, params, prompt: PromptBatch, tokens, mask):
  """Teacher-forced log pi(y | x) of every enumerated response for a single prompt ([1, P])."""
  e = tokens.shape[0]
  lp = score_responses(model, params, jnp.repeat(prompt.tokens, e, 0), jnp.repeat(prompt.mask, e, 0),
                       jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(TINY_ALLOWED))
  return np.asarray(lp.sum(-1), np.float64)


def token_mixture_probs(policy, pp, ref, rp, prompt: PromptBatch, tokens, mask, coef: float):
  """Brute force, in numpy: P(y) = prod_t softmax(coef log p_t + (1 - coef) log r_t)[y_t]."""
  e, r = tokens.shape
  p = prompt.tokens.shape[1]

  def full_logits(model, params):
    toks = np.concatenate([np.repeat(np.asarray(prompt.tokens), e, 0), tokens], 1)
    valid = np.concatenate([np.repeat(np.asarray(prompt.mask), e, 0), mask], 1)
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    logits, _ = model.apply({'params': params}, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(valid))
    return np.asarray(logits, np.float64)[:, p - 1:-1]  # [E, R, V], position t predicts token t.

  def log_softmax(x):
    x = np.where(TINY_ALLOWED, x, -np.inf)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

  lp, lr = log_softmax(full_logits(policy, pp)), log_softmax(full_logits(ref, rp))
  mixed = np.where(TINY_ALLOWED, coef * np.where(TINY_ALLOWED, lp, 0) + (1 - coef) * np.where(TINY_ALLOWED, lr, 0), -np.inf)
  mixed = log_softmax(mixed)
  token_lp = np.take_along_axis(mixed, tokens[..., None], -1)[..., 0]
  return np.exp(np.where(mask, token_lp, 0.0).sum(-1))


def response_ids(sampled_tokens, enumerated_tokens) -> np.ndarray:
  """Index of each sampled response in the enumeration (-1 if absent)."""
  lookup = {tuple(t): i for i, t in enumerate(np.asarray(enumerated_tokens).tolist())}
  return np.asarray([lookup.get(tuple(t), -1) for t in np.asarray(sampled_tokens).tolist()])


def chi2_pvalue(ids: np.ndarray, probs: np.ndarray) -> float:
  """Goodness of fit of sampled ids to probs (categories with tiny expectation are pooled)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel  # Here: a second of every process's start.
  assert (ids >= 0).all(), 'a sampled response is outside the enumeration'
  counts = np.bincount(ids, minlength=len(probs)).astype(float)
  expected = probs / probs.sum() * len(ids)
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return float(stats.chisquare(obs, exp).pvalue)


@pytest.fixture(scope='session')
def tiny_pair():
  """A policy and a reference that differ clearly, on the tiny vocabulary."""
  policy = tiny_model(0, scale=6.0)
  ref = tiny_model(1, scale=6.0)
  return policy, ref


# With --dist=loadfile a test file is the unit of scheduling, so the file that starts last bounds
# the wall time: the longest files go first (pyproject.toml turns off xdist's reordering). Ordered by
# each file's seconds summed from --durations=0 on 2 cores; a file not listed keeps its place after these.
SLOWEST_FILES = ('test_resume.py', 'test_notebooks.py', 'test_faults.py', 'test_aot.py', 'test_sharded_equivalence.py',
                 'test_multiprocess_run.py',
                 'test_samplers.py', 'test_study.py', 'test_library_api.py', 'test_theory.py',
                 'test_object_store.py', 'test_scan_layers.py', 'test_pilaf_coin.py', 'test_gguf.py',
                 'test_cost_accounting.py', 'test_chat_task.py', 'test_sampling.py', 'test_cli.py',
                 'test_uncached_mixture.py', 'test_label_browser.py', 'test_model.py', 'test_fast_kernels.py',
                 'test_hf_checkpoints.py', 'test_partitioning.py', 'test_task.py', 'test_memory_report.py',
                 'test_label_server.py', 'test_label_queue_kill.py', 'test_dpo.py')


@pytest.hookimpl(trylast=True)  # After any plugin that shuffles the order.
def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: keeps the rest in order.


def pytest_unconfigure(config):
  """The process that made the session's compile cache removes it (workers share it until then)."""
  if _OWN_COMPILE_CACHE and 'PYTEST_XDIST_WORKER' not in os.environ:
    import shutil
    shutil.rmtree(_OWN_COMPILE_CACHE, ignore_errors=True)


def stored_query(path: str, query_id: int):
  """One row of the labelling queue's queries (batch_key, row, created, ...), read on a read-only
  connection of its own."""
  import sqlite3
  import types
  db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  db.row_factory = sqlite3.Row
  try:
    return types.SimpleNamespace(**db.execute('SELECT * FROM queue_queries WHERE query_id=?',
                                              (query_id,)).fetchone())
  finally:
    db.close()


def queue_tables(path: str) -> tuple:
  """Every row of the labelling queue's tables, read on a read-only connection of its own."""
  import sqlite3
  db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  try:
    return tuple(tuple(db.execute(f'SELECT * FROM {t} ORDER BY 1, 2').fetchall())
                 for t in ('queue_answers', 'queue_assignments', 'queue_queries', 'queue_labellers'))
  finally:
    db.close()
