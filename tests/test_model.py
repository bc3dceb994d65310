"""The Llama decoder: shapes, and cached decoding equal to recomputation without a cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import prompt_batch, tiny_model
from pilaf_jax.model.llama import KVCache, LlamaConfig, count_params


@pytest.mark.parametrize('overrides', [{}, {'tie_embeddings': True}, {'num_kv_heads': 2},
                                       {'attention_bias': True, 'head_dim': 4}])
def test_cached_decoding_equals_recomputation(overrides):
  model, params = tiny_model(0, vocab=11, scale=3.0, **overrides)
  prompts = prompt_batch(3, length=5, vocab=11, left_pad=(2, 0, 1))
  steps = 4
  rs = np.random.RandomState(0)
  new = jnp.asarray(rs.randint(3, 11, size=(3, steps)), jnp.int32)

  # Full recomputation over prompt + new tokens.
  tokens = jnp.concatenate([prompts.tokens, new], 1)
  valid = jnp.concatenate([prompts.mask, jnp.ones_like(new, bool)], 1)
  positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
  apply = jax.jit(model.apply)  # Compiled once per input shape: much faster than op by op.
  full, _ = apply({'params': params}, tokens, positions, valid)

  # Prefill then one token at a time through the cache.
  cache = KVCache.zeros(model.cfg, 3, 5 + steps)
  logits, cache = apply({'params': params}, prompts.tokens, positions[:, :5], prompts.mask, cache)
  cached = [logits[:, -1]]
  for t in range(steps):
    logits, cache = apply({'params': params}, new[:, t:t + 1], positions[:, 5 + t:6 + t],
                          jnp.ones((3, 1), bool), cache)
    cached.append(logits[:, -1])
  cached = jnp.stack(cached, 1)  # Predictions after the prompt and after each new token.
  np.testing.assert_allclose(cached, full[:, 4:], atol=2e-5, rtol=1e-5)
  assert int(cache.index) == 5 + steps


def test_shapes_and_padding_invariance():
  model, params = tiny_model(0, vocab=11)
  prompts = prompt_batch(2, length=6, vocab=11, left_pad=(3,))
  positions = jnp.maximum(jnp.cumsum(prompts.mask, 1) - 1, 0)
  apply = jax.jit(model.apply)
  logits, cache = apply({'params': params}, prompts.tokens, positions, prompts.mask)
  assert logits.shape == (2, 6, 11) and logits.dtype == jnp.float32 and cache is None
  # Row 0 with its padding removed gives the same last-position logits.
  unpadded, _ = apply({'params': params}, prompts.tokens[:1, 3:], positions[:1, 3:],
                      prompts.mask[:1, 3:])
  np.testing.assert_allclose(logits[0, -1], unpadded[0, -1], atol=1e-5)


def test_param_names_follow_hugging_face():
  model, params = tiny_model(0)
  names = {'/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  for expected in ('embed_tokens/embedding', 'layers_0/self_attn/q_proj/kernel',
                   'layers_1/mlp/down_proj/kernel', 'layers_0/input_layernorm/scale',
                   'layers_0/post_attention_layernorm/scale', 'norm/scale', 'lm_head/kernel'):
    assert expected in names, expected
  # [in, out] kernels: HF's weight transposed.
  assert params['layers_0']['self_attn']['k_proj']['kernel'].shape == (16, 8)


def test_llama3_8b_parameter_count():
  cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                    num_heads=32, num_kv_heads=8, rope_theta=500000.0)
  from pilaf_jax.model.llama import init_params
  import functools
  shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
  assert count_params(shapes) == 8_030_261_248  # Llama-3.1-8B.


def test_bad_head_configuration():
  with pytest.raises(ValueError, match='num_kv_heads'):
    LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2)


def test_remat_gives_the_same_gradients():
  from pilaf_jax.model.scoring import response_logprobs
  model, params = tiny_model(0, vocab=11, scale=2.0)
  remat_model, _ = tiny_model(0, vocab=11, scale=2.0, remat=True)
  prompts = prompt_batch(3, length=4, vocab=11)
  responses, mask = jnp.array([[3, 4, 5], [5, 6, 7], [8, 9, 10]]), jnp.ones((3, 3), bool)
  grad = lambda m: jax.jit(jax.grad(lambda p: response_logprobs(m, p, prompts.tokens, prompts.mask,
                                                                responses, mask).sum()))(params)
  for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(remat_model))):
    np.testing.assert_allclose(a, b, atol=1e-6)
