"""The faster kernels compute what their plain-jax definitions do.

token_logprobs (logsumexp minus the one-hot-picked logit) against log_softmax + take_along_axis,
with and without allowed_tokens, values and gradients; the Dense layer's custom matmul gradient
against autodiff of jnp.matmul; sample_tokens against jax.random.categorical and the decoder's
pick_tokens (the decoders' token pick) against take_along_axis, both exactly; and the decode loop, which no longer runs a
forward pass after its last token, still records exactly R tokens whose log-probs are the
teacher-forced ones.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import score_responses  # noqa: E402
from pilaf_jax.batches import PromptBatch  # noqa: E402
from pilaf_jax.model.llama import Llama, LlamaConfig, _matmul, init_params  # noqa: E402
from pilaf_jax.model.scoring import masked_log_softmax, pick_tokens, token_logprobs  # noqa: E402
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, decode  # noqa: E402
from pilaf_jax.sampling.mixing import sample_tokens  # noqa: E402


def _reference(logits, tokens, allowed):
  lp = masked_log_softmax(logits, allowed)
  return jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]


def test_token_logprobs_values_and_gradients():
  logits = 3 * jax.random.normal(jax.random.key(0), (3, 5, 11))
  tokens = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
  allowed = np.arange(11) % 3 != 0
  tokens_ok = jnp.where(allowed[tokens], tokens, 1)  # Allowed tokens only (1 % 3 != 0).
  for allow, toks in ((None, tokens), (allowed, tokens_ok)):
    np.testing.assert_allclose(token_logprobs(logits, toks, allow), _reference(logits, toks, allow),
                               atol=1e-5)
    weights = jax.random.normal(jax.random.key(2), toks.shape)
    f = lambda fn: jax.grad(lambda x: jnp.sum(weights * fn(x, toks, allow)))(logits)
    np.testing.assert_allclose(f(token_logprobs), f(_reference), atol=1e-5)
  # A disallowed token has log-prob -inf, and a masked-out one contributes no (nan) gradient.
  bad = jnp.zeros((3, 5), jnp.int32)
  assert np.all(np.isneginf(token_logprobs(logits, bad, allowed)))
  g = jax.grad(lambda x: jnp.sum(jnp.where(False, token_logprobs(x, bad, allowed), 0.0)))(logits)
  assert np.all(np.isfinite(g))


def test_matmul_gradient_is_autodiffs():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  k = jax.random.normal(jax.random.key(1), (8, 5))
  w = jax.random.normal(jax.random.key(2), (2, 3, 5))
  ours = jax.grad(lambda x, k: jnp.sum(w * jnp.tanh(_matmul(x, k))), argnums=(0, 1))(x, k)
  plain = jax.grad(lambda x, k: jnp.sum(w * jnp.tanh(x @ k)), argnums=(0, 1))(x, k)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_sample_tokens_draws_what_categorical_draws():
  """Same key, same logits: the same token in every row, including ties, -inf and all--inf rows."""
  sample, categorical = jax.jit(sample_tokens), jax.jit(lambda k, x: jax.random.categorical(k, x, axis=-1))
  for seed in range(20):
    k_logits, k_mask, k_draw = jax.random.split(jax.random.key(seed), 3)
    logits = 4 * jax.random.normal(k_logits, (2, 64, 37))
    logits = jnp.where(jax.random.uniform(k_mask, logits.shape) < 0.4, -jnp.inf, logits)
    logits = logits.at[0, 0].set(-jnp.inf).at[0, 1].set(0.0)  # All impossible; all tied.
    logits = logits.at[0, 2, 5].set(60.0)  # One certain token.
    ours = sample(k_draw, logits)
    assert ours.dtype == jnp.int32 and ours.shape == (2, 64)
    np.testing.assert_array_equal(ours, categorical(k_draw, logits))
    assert int(ours[0, 2]) == 5
  # The draws follow softmax(logits): 20,000 one-row draws against the probabilities.
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  draws = jax.vmap(lambda k: sample_tokens(k, logits))(jax.random.split(jax.random.key(0), 20_000))
  np.testing.assert_allclose(np.bincount(draws, minlength=4) / 20_000, np.exp(logits), atol=0.015)


def test_pick_tokens_is_the_gathered_entry():
  lp = jax.nn.log_softmax(3 * jax.random.normal(jax.random.key(0), (9, 23)), axis=-1)
  lp = lp.at[4, 7].set(-jnp.inf)
  tokens = jax.random.randint(jax.random.key(1), (9,), 0, 23).at[4].set(7)
  np.testing.assert_array_equal(pick_tokens(lp, tokens),
                                jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0])


def test_decode_records_every_token_without_the_trailing_forward():
  cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1)
  model = Llama(cfg)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))  # Eager init: seconds.
  prompts = PromptBatch(jax.random.randint(jax.random.key(1), (3, 4), 0, 16), jnp.ones((3, 4), bool))
  for r in (1, 5):
    out = jax.jit(lambda p: decode(model, model, p, p, prompts, jnp.zeros((0,)), jax.random.key(2),
                                   layout=RowLayout(policy_only=3),
                                   settings=DecodeSettings(max_new_tokens=r, eos_ids=-1)))(params)
    assert int(out.steps) == r and bool(out.mask.all())
    lp = score_responses(model, params, prompts.tokens, prompts.mask, out.tokens, out.mask)
    np.testing.assert_allclose(lp, out.policy_logprobs, atol=1e-5)
