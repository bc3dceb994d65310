"""model.scan_layers: the scanned decoder computes what the unrolled one does, with the same params.

Params of the two layouts convert exactly (stack_layer_params / unstack_layer_params); logits,
cached decoding and gradients then agree up to float rounding, checkpoints load into and save from
either layout, and the partition rules shard the stacked arrays like their per-layer slices.
"""
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pilaf_jax.batches import PromptBatch  # noqa: E402
from pilaf_jax.model.llama import (KVCache, Llama, LlamaConfig, init_params, stack_layer_params,  # noqa: E402
                                   unstack_layer_params)
from pilaf_jax.model.scoring import response_logprobs  # noqa: E402
from pilaf_jax.parallel.partitioning import kv_cache_specs, param_partition_specs  # noqa: E402
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, decode  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                  num_kv_heads=2)
SCAN = dataclasses.replace(CFG, scan_layers=True)


@pytest.fixture(scope='module')
def params():
  flat = init_params(CFG, jax.random.key(0))
  return flat, stack_layer_params(flat)


def _inputs(b=2, t=7, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)
  valid = jnp.ones((b, t), bool).at[0, :2].set(False)  # Left padding in row 0.
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  return tokens, positions, valid


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_layouts_convert_exactly(params):
  flat, stacked = params
  assert jax.tree.structure(stacked) == jax.tree.structure(init_params(SCAN, jax.random.key(0)))
  assert stacked['layers']['mlp']['up_proj']['kernel'].shape == (3, 16, 32)
  back = unstack_layer_params(stacked)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), back, flat))


def test_same_logits_cached_decoding_and_gradients(params):
  flat, stacked = params
  tokens, positions, valid = _inputs()
  full = jax.jit(lambda cfg, p: Llama(cfg).apply({'params': p}, tokens, positions, valid)[0],
                 static_argnums=0)
  a, b = full(CFG, flat), full(SCAN, stacked)
  np.testing.assert_allclose(a, b, atol=1e-5)

  # Cached decoding (prefill 4, then one token at a time) equals recomputation, in both layouts.
  for cfg, p in ((CFG, flat), (SCAN, stacked)):
    cache = KVCache.zeros(cfg, 2, 7)
    out, cache = Llama(cfg).apply({'params': p}, tokens[:, :4], positions[:, :4], valid[:, :4], cache)
    steps = [out]
    for i in range(4, 7):
      out, cache = Llama(cfg).apply({'params': p}, tokens[:, i:i + 1], positions[:, i:i + 1],
                                    valid[:, i:i + 1], cache)
      steps.append(out)
    # Padding slots attend to nothing and are never read; compare the real tokens.
    np.testing.assert_allclose(jnp.concatenate(steps, 1)[valid], a[valid], atol=1e-5)

  loss = lambda cfg: lambda p: jnp.mean(Llama(cfg).apply({'params': p}, tokens, positions, valid)[0] ** 2)
  g_flat = jax.jit(jax.grad(loss(CFG)))(flat)
  g_scan = jax.jit(jax.grad(loss(SCAN)))(stacked)
  assert _max_diff(stack_layer_params(g_flat), g_scan) < 1e-6
  g_remat = jax.jit(jax.grad(loss(dataclasses.replace(SCAN, remat=True))))(stacked)
  assert _max_diff(g_remat, g_scan) < 1e-6


def test_two_model_decode_and_scoring_agree(params):
  flat, stacked = params
  prompts = PromptBatch(jax.random.randint(jax.random.key(3), (4, 5), 0, CFG.vocab_size),
                        jnp.ones((4, 5), bool))
  settings = DecodeSettings(max_new_tokens=6, eos_ids=-1)
  layout = RowLayout(policy_only=1, mixed=2, ref_only=1)
  coef = jnp.asarray([1.1, 0.9])
  ref_flat = jax.tree.map(lambda x: x * 1.5, flat)
  run = jax.jit(lambda cfg, p, r: decode(Llama(cfg), Llama(cfg), p, r, prompts, coef,
                                         jax.random.key(4), layout=layout, settings=settings),
                static_argnums=0)
  a = run(CFG, flat, ref_flat)
  b = run(SCAN, stacked, stack_layer_params(ref_flat))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.policy_logprobs, b.policy_logprobs, atol=1e-5)
  # Sampler log-probs are the teacher-forced ones, in the scanned layout too.
  lp = jax.jit(lambda p: response_logprobs(Llama(SCAN), p, prompts.tokens, prompts.mask, b.tokens,
                                           b.mask))(stacked)
  rows = slice(0, 3)
  np.testing.assert_allclose(lp[rows], b.policy_logprobs[rows], atol=1e-5)


def test_partition_rules_and_cache_specs_handle_the_layer_axis():
  shapes = jax.eval_shape(lambda: init_params(SCAN, jax.random.key(0)))
  specs = param_partition_specs(shapes, mesh={'data': 1, 'fsdp': 2, 'tensor': 2})
  assert specs['layers']['mlp']['down_proj']['kernel'] == P(None, 'tensor', 'fsdp')
  assert specs['layers']['self_attn']['q_proj']['kernel'] == P(None, 'fsdp', 'tensor')
  assert specs['layers']['input_layernorm']['scale'] == P(None)
  assert specs['embed_tokens']['embedding'] == P('tensor', 'fsdp')
  cache = jax.eval_shape(lambda: KVCache.zeros(SCAN, 4, 8))
  kv = kv_cache_specs(cache, {'data': 2, 'fsdp': 1, 'tensor': 2})
  assert kv.k == P(None, ('data', 'fsdp'), 'tensor', None, None)  # [L, B, Hkv, S, D]


def test_hf_checkpoint_round_trip_in_the_scanned_layout(params, tmp_path):
  pytest.importorskip('safetensors')
  from pilaf_jax.model.hf import load_hf_checkpoint, save_hf_checkpoint
  flat, stacked = params
  save_hf_checkpoint(str(tmp_path / 'scan'), SCAN, stacked)
  save_hf_checkpoint(str(tmp_path / 'flat'), CFG, flat)
  a = open(tmp_path / 'scan' / 'model.safetensors', 'rb').read()
  assert a == open(tmp_path / 'flat' / 'model.safetensors', 'rb').read()
  cfg, loaded = load_hf_checkpoint(str(tmp_path / 'scan'), scan_layers=True)
  assert cfg.scan_layers
  assert _max_diff(loaded, stacked) == 0.0
  cfg, loaded = load_hf_checkpoint(str(tmp_path / 'scan'))
  assert not cfg.scan_layers and _max_diff(loaded, flat) == 0.0


def test_unroll_layers_decodes_a_scanned_model_as_the_unrolled_one(params):
  """sampler.unroll_layers: a scanned model decoded over per-layer slices of its stack runs the
  unrolled program, so it gives the unrolled model's tokens and log-probs, bit for bit."""
  flat, stacked = params
  prompts = PromptBatch(jax.random.randint(jax.random.key(5), (3, 4), 0, CFG.vocab_size),
                        jnp.ones((3, 4), bool))
  layout = RowLayout(policy_only=1, mixed=1, ref_only=1)
  ref_flat = jax.tree.map(lambda x: x * 1.5, flat)
  run = jax.jit(lambda cfg, s, p, r: decode(Llama(cfg), Llama(cfg), p, r, prompts, jnp.asarray([1.1]),
                                            jax.random.key(6), layout=layout, settings=s),
                static_argnums=(0, 1))
  plain = DecodeSettings(max_new_tokens=5, eos_ids=-1)
  unrolled = run(CFG, plain, flat, ref_flat)
  per_layer = run(SCAN, dataclasses.replace(plain, unroll_layers=True), stacked, stack_layer_params(ref_flat))
  for field in ('tokens', 'mask', 'policy_logprobs', 'ref_logprobs', 'sampling_logprobs'):
    np.testing.assert_array_equal(getattr(per_layer, field), getattr(unrolled, field), err_msg=field)
  # And it does unroll: as many loops as the unrolled model's program, fewer than the scanned one's
  # (which also loops over layers in the prefill and in each step).
  loops = lambda cfg, s, *p: run.lower(cfg, s, *p).as_text().count('stablehlo.while')
  scanned_params = (stacked, stack_layer_params(ref_flat))
  assert loops(SCAN, dataclasses.replace(plain, unroll_layers=True), *scanned_params) == loops(CFG, plain, flat, ref_flat)
  assert loops(SCAN, plain, *scanned_params) > loops(CFG, plain, flat, ref_flat)
