r"""Compile time of the DPO step and of the two-model decode, with and without model.scan_layers.

  python benchmarks/compile_time.py                          # default, smollm2, llama3.1-8b
  python benchmarks/compile_time.py --models=default,smollm2 --programs=dpo

Every program is lowered and compiled from ShapeDtypeStructs (jax.jit(...).lower(abstract).compile()):
nothing is allocated, so the 8B program compiles on a laptop's CPU. Models: the default config's
(pilaf_jax/default_config.py), SmolLM2-135M's architecture (30 layers) and Llama-3.1-8B's (32 layers),
all fp32 params. Programs: `dpo` (dpo_step on --pairs pairs of --prompt + --response tokens, AdamW)
and `decode` (decode() with RowLayout(mixed=--rows), --response new tokens). Each figure is one
fresh compile (the persistent compilation cache is not used).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pilaf_jax import default_config  # noqa: E402
from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost  # noqa: E402
from pilaf_jax.learning.dpo import dpo_step  # noqa: E402
from pilaf_jax.learning.train_state import init_train_state, make_optimizer  # noqa: E402
from pilaf_jax.model import presets  # noqa: E402
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params  # noqa: E402
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, decode  # noqa: E402


def model_configs() -> dict:
  return {'default': LlamaConfig.from_config(default_config.get_config().model),
          'smollm2': LlamaConfig(**presets.SMOLLM2_135M),
          'llama3.1-8b': LlamaConfig(**presets.LLAMA3_1_8B)}


def compile_seconds(cfg: LlamaConfig, program: str, args) -> float:
  model = Llama(cfg)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  s = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
  p, r = args.prompt, args.response
  if program == 'dpo':
    tx = make_optimizer(1e-5, 1)
    state = jax.eval_shape(lambda x: init_train_state(x, tx), params)
    b = args.pairs
    pairs = PairBatch(PromptBatch(s((b, p)), s((b, p), bool)), s((b, 2, r)), s((b, 2, r), bool),
                      s((b, 2, r), jnp.float32), s((b, 2, r), jnp.float32), s((b, 2)),
                      jax.eval_shape(SamplingCost.zero))
    fn = jax.jit(functools.partial(dpo_step, model=model, tx=tx, beta=0.1), donate_argnums=0)
    xs = (state, PreferenceBatch(pairs, s((b,), bool)))
  else:
    n = args.rows
    fn = jax.jit(functools.partial(decode, model, model, layout=RowLayout(mixed=n),
                                   settings=DecodeSettings(max_new_tokens=r, eos_ids=2)))
    xs = (params, params, PromptBatch(s((n, p)), s((n, p), bool)), s((n,), jnp.float32),
          jax.random.key(0))
  start = time.perf_counter()
  fn.lower(*xs).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='default,smollm2,llama3.1-8b')
  parser.add_argument('--programs', default='dpo,decode')
  parser.add_argument('--pairs', type=int, default=8)
  parser.add_argument('--rows', type=int, default=8)
  parser.add_argument('--prompt', type=int, default=16)
  parser.add_argument('--response', type=int, default=48)
  args = parser.parse_args()
  jax.config.update('jax_enable_compilation_cache', False)
  configs = model_configs()
  print(f'| model | layers | program | compile s, unrolled | compile s, scan_layers | ratio |')
  print(f'|---|---|---|---|---|---|')
  for name in args.models.split(','):
    cfg = configs[name]
    for program in args.programs.split(','):
      plain = compile_seconds(cfg, program, args)
      scanned = compile_seconds(dataclasses.replace(cfg, scan_layers=True), program, args)
      print(f'| {name} | {cfg.num_layers} | {program} | {plain:.1f} | {scanned:.1f} | '
            f'{plain / scanned:.1f}x |', flush=True)


if __name__ == '__main__':
  main()
