"""Loading a checkpoint in bfloat16 gives a bfloat16 model: weights and activations alike.

A Hugging Face directory is written here (save_hf_checkpoint) and read back; the dtype of every
projection's output is captured from the forward pass, so the test fails if the weights are bfloat16
but the matrix products still run in float32 (or the other way round).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('safetensors')

from pilaf_jax.model.checkpoints import load_checkpoint  # noqa: E402
from pilaf_jax.model.hf import save_hf_checkpoint  # noqa: E402
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params  # noqa: E402

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1)


def _projection_dtypes(cfg, params) -> set:
  """The dtypes of every Dense output (q/k/v/o, MLP, lm_head) in one forward pass."""
  tokens = jnp.arange(6, dtype=jnp.int32)[None] % cfg.vocab_size
  logits, state = Llama(cfg).apply({'params': params}, tokens, jnp.arange(6)[None],
                                   jnp.ones((1, 6), bool), capture_intermediates=True,
                                   mutable=['intermediates'])
  assert logits[0].dtype == jnp.float32  # Logits are float32 whatever the model computes in.
  leaves = jax.tree_util.tree_leaves_with_path(state['intermediates'])
  return {leaf.dtype for path, leaf in leaves
          if any(getattr(k, 'key', '').endswith(('_proj', 'lm_head')) for k in path)}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp('hf') / 'tiny'
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda x: rs.randn(*x.shape).astype(np.float32) * 0.1,
                        jax.eval_shape(functools.partial(init_params, CFG), jax.random.key(0)))
  save_hf_checkpoint(str(path), CFG, params)
  return str(path)


def test_bfloat16_sets_weights_and_activations(checkpoint):
  cfg, params, _ = load_checkpoint(checkpoint, dtype='bfloat16')
  assert (cfg.param_dtype, cfg.dtype) == ('bfloat16', 'bfloat16')
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert _projection_dtypes(cfg, params) == {jnp.dtype(jnp.bfloat16)}


def test_activation_dtype_overrides(checkpoint):
  cfg, params, _ = load_checkpoint(checkpoint, dtype='bfloat16', activation_dtype='float32')
  assert (cfg.param_dtype, cfg.dtype) == ('bfloat16', 'float32')
  assert _projection_dtypes(cfg, params) == {jnp.dtype(jnp.float32)}
  cfg, params, _ = load_checkpoint(checkpoint)  # The default stays float32 throughout.
  assert (cfg.param_dtype, cfg.dtype) == ('float32', 'float32')
  assert _projection_dtypes(cfg, params) == {jnp.dtype(jnp.float32)}
