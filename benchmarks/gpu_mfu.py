r"""Tokens/s and model-FLOPs utilisation of the DPO step and of the PILAF sampler for a ~1B Llama
config with random weights, on one accelerator. Prepared for a GPU/TPU machine:

  python benchmarks/gpu_mfu.py [--peak_tflops=989] [--batch=16] [--prompt_len=256] [--response_len=256]

MFU = achieved model FLOP/s / peak. Model FLOPs per token: forward 2N + 4 L T d (attention), training
3x forward (DPO also runs no reference forward: reference log-probs come from the batch). Sampling
counts the forward FLOPs of every model that ran per generated token (policy and reference for a
mixed row). --peak_tflops is the chip's dense bf16 peak (H100 SXM 989, H200 989, A100 312, v5p 459).
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost
from pilaf_jax.learning.dpo import dpo_step
from pilaf_jax.learning.train_state import init_train_state, make_optimizer
from pilaf_jax.model.llama import Llama, LlamaConfig, count_params, init_params
from pilaf_jax.sampling import DecodeSettings, RowLayout, decode

CONFIG_1B = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                        num_heads=32, num_kv_heads=4, dtype='bfloat16', param_dtype='float32')


def _time(fn, repeats=5):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--peak_tflops', type=float, default=989.0)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--prompt_len', type=int, default=256)
  parser.add_argument('--response_len', type=int, default=256)
  parser.add_argument('--smoke', action='store_true', help='A tiny model, to check the script on CPU.')
  args = parser.parse_args()
  cfg = CONFIG_1B
  if args.smoke:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2)
  model = Llama(cfg)
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(0))
  n = count_params(params) - cfg.vocab_size * cfg.hidden_size  # Embedding lookups are not matmuls.
  b, p, r = args.batch, args.prompt_len, args.response_len
  t = p + r
  fwd_flops_per_token = 2 * n + 4 * cfg.num_layers * t * cfg.hidden_size
  print(f'{jax.devices()[0].device_kind}: {count_params(params) / 1e9:.2f}B params, batch {b}, '
        f'prompt {p}, response {r}')

  # DPO step on B pairs (2B sequences of T tokens).
  rs = np.random.RandomState(0)
  prompts = PromptBatch(jnp.asarray(rs.randint(3, cfg.vocab_size, (b, p)), jnp.int32), jnp.ones((b, p), bool))
  responses = jnp.asarray(rs.randint(3, cfg.vocab_size, (b, 2, r)), jnp.int32)
  pairs = PairBatch(prompts, responses, jnp.ones((b, 2, r), bool), jnp.zeros((b, 2, r)),
                    jnp.full((b, 2, r), -5.0), jnp.zeros((b, 2), jnp.int8), SamplingCost.zero())
  batch = PreferenceBatch(pairs, jnp.ones((b,), bool))
  tx = make_optimizer(1e-5, 1)
  state = init_train_state(jax.tree.map(jnp.copy, params), tx)  # The step donates its state.
  step = jax.jit(functools.partial(dpo_step, model=model, tx=tx, beta=0.1), donate_argnums=0)
  holder = {'state': state}

  def run_step():
    holder['state'], m = step(holder['state'], batch)
    return m
  seconds = _time(run_step)
  tokens = 2 * b * t
  flops = 3 * fwd_flops_per_token * tokens
  print(f'DPO step: {tokens / seconds:,.0f} tokens/s, MFU {flops / seconds / (args.peak_tflops * 1e12):.1%}')

  # PILAF sampler rows: B vanilla policy rows and B mixed rows (policy + reference).
  settings = DecodeSettings(max_new_tokens=r, eos_ids=-1)  # No EOS: every row runs r steps.
  rows = PromptBatch(jnp.tile(prompts.tokens, (2, 1)), jnp.tile(prompts.mask, (2, 1)))
  layout = RowLayout(policy_only=b, mixed=b)
  sample = jax.jit(functools.partial(decode, model, model, layout=layout, settings=settings))
  coef = jnp.concatenate([jnp.full((b // 2,), 1.1), jnp.full((b - b // 2,), 0.9)])
  seconds = _time(lambda: sample(holder['state'].params, params, rows, coef, jax.random.key(1)).tokens, 3)
  new_tokens = 2 * b * r
  model_tokens = 3 * b * (p + r)  # Policy on 2B rows, reference on B rows.
  flops = fwd_flops_per_token * model_tokens
  print(f'PILAF sampler: {new_tokens / seconds:,.0f} new tokens/s, MFU {flops / seconds / (args.peak_tflops * 1e12):.1%}')


if __name__ == '__main__':
  main()
