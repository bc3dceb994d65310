"""The jitted programs a run of a config executes, built from shapes alone (for tools/aot.py).

Each Program is a function, its inputs as jax.ShapeDtypeStructs carrying the NamedShardings the
run gives them (params and train state from the partition rules, batch rows over data x fsdp), and
its output shardings. Nothing is allocated and no checkpoint is read: the architecture is the
config's model fields (a preset for the 8B configs). The functions are the run's own (dpo_step,
the samplers, the evaluation batch, the reward model's scoring, sft_step), so what compiles here
is what a run compiles.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from pilaf_jax.batches import PairBatch, PreferenceBatch, PromptBatch, SamplingCost
from pilaf_jax.learning.dpo import dpo_step
from pilaf_jax.learning.sft import sft_step
from pilaf_jax.learning.train_state import TrainState, make_optimizer
from pilaf_jax.model.llama import Llama, LlamaConfig
from pilaf_jax.parallel.mesh import batch_sharding
from pilaf_jax.parallel.partitioning import param_shardings
from pilaf_jax.parallel.placement import Placement
from pilaf_jax.sampling.decode import DecodeSettings
from pilaf_jax.sampling.samplers import SamplerContext, check_sampler

TRAIN, DECODE, SCORE = 'train', 'decode', 'score'


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted program with abstract, sharded inputs.

  kind: TRAIN (forward + backward + update), DECODE (prefill, then `steps` one-token steps) or
  SCORE (one forward pass). tokens: tokens processed per call over the whole mesh (for DECODE, the
  new tokens generated). model_flops: the model's own FLOPs per call over the whole mesh (6N per
  trained token plus attention, 2N per scored or decoded token plus attention), the numerator of MFU.
  """
  name: str
  fn: Callable
  args: tuple
  out_shardings: Any
  donate_argnums: tuple = ()
  kind: str = TRAIN
  tokens: int = 0
  model_flops: float = 0.0
  steps: int = 0  # DECODE: decode steps a full call runs (response_len - 1 in the loop, + 1 after).
  step_bytes: float = 0.0  # DECODE: HBM bytes one decode step must read per device (decode_step_bytes).

  def lower(self):
    return jax.jit(self.fn, out_shardings=self.out_shardings,
                   donate_argnums=self.donate_argnums).lower(*self.args)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _rows(mesh: Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  """A batch array, rows over data x fsdp (replicated when the rows do not divide, as the run does)."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  sharding = batch_sharding(mesh, len(shape)) if shape and shape[0] % shards == 0 else \
      NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def _prompts(mesh: Mesh, rows: int, prompt_len: int) -> PromptBatch:
  return PromptBatch(_rows(mesh, (rows, prompt_len), jnp.int32), _rows(mesh, (rows, prompt_len), bool),
                     _rows(mesh, (rows,), jnp.int32))


def matmul_params(cfg: LlamaConfig, lm_head: bool = True) -> int:
  """Parameters that take part in a matmul per token: every layer's projections, plus the output
  head (the input embedding is a lookup)."""
  hd = cfg.resolved_head_dim
  per_layer = (cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * cfg.hidden_size
               + 3 * cfg.hidden_size * cfg.intermediate_size)
  return cfg.num_layers * per_layer + (cfg.hidden_size * cfg.vocab_size if lm_head else 0)


def forward_flops(cfg: LlamaConfig, sequences: int, length: int, keys: Optional[int] = None,
                  lm_head: bool = True) -> float:
  """A forward pass's model FLOPs: 2N per token plus attention's two products (4 L H hd per query
  and key), every query against `keys` keys (default: the whole sequence, as computed here)."""
  keys = length if keys is None else keys
  tokens = sequences * length
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * keys
  return tokens * (2 * matmul_params(cfg, lm_head) + attention)


def eos_and_pad(config) -> tuple[tuple[int, ...], int]:
  """The task's stop and padding tokens (a chat task's come from its tokenizer; any valid ids
  compile the same program)."""
  if config.task.name == 'synthetic':
    from pilaf_jax.tasks.synthetic import EOS, PAD
    return (EOS,), PAD
  return (config.model.vocab_size - 1,), 0


def synthetic_allowed_tokens(config) -> Optional[np.ndarray]:
  if config.task.name != 'synthetic':
    return None
  from pilaf_jax.tasks.synthetic import BOS, PAD
  allowed = np.ones(config.model.vocab_size, bool)
  allowed[[PAD, BOS]] = False
  return allowed


def sampler_names(config) -> list[str]:
  names = [config.sampler.name]
  if config.loop == 'iterative' and config.iterative.first_iteration_sampler:
    names.append(config.iterative.first_iteration_sampler)
  return list(dict.fromkeys(names))


def _train_state(placement: Placement, tx) -> TrainState:
  shardings = placement.train_state(tx)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=placement.abstract_params,
                        opt_state=jax.eval_shape(tx.init, placement.abstract_params))
  return _abstract(abstract, shardings), shardings


def _preference_batch(mesh: Mesh, b: int, p: int, r: int) -> PreferenceBatch:
  scalar = lambda: jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
  cost = SamplingCost(**{name: scalar() for name in SamplingCost.__dataclass_fields__})
  pairs = PairBatch(prompts=_prompts(mesh, b, p), responses=_rows(mesh, (b, 2, r), jnp.int32),
                    response_mask=_rows(mesh, (b, 2, r), bool),
                    policy_logprobs=_rows(mesh, (b, 2, r), jnp.float32),
                    ref_logprobs=_rows(mesh, (b, 2, r), jnp.float32),
                    source=_rows(mesh, (b, 2), jnp.int8), cost=cost)
  return PreferenceBatch(pairs=pairs, a_preferred=_rows(mesh, (b,), bool))


def build_programs(config, mesh: Mesh, cfg: LlamaConfig, unroll_steps: int = 0,
                   only: Optional[set[str]] = None) -> list[Program]:
  """The programs of a run of `config` on `mesh`, for the architecture `cfg` (the config's, or a
  shallower copy for cost analysis). unroll_steps > 0 replaces each decode loop by that many
  unrolled steps (loop-free, for cost analysis). only: the program names to build (default all)."""
  c = config
  b, p, r = c.dpo.batch_size, c.task.prompt_len, c.task.response_len
  model = Llama(cfg)
  placement = Placement(mesh, cfg)
  programs = []
  want = lambda name: only is None or name in only
  replicated = placement.replicated
  allowed_np = synthetic_allowed_tokens(c)
  allowed = None if allowed_np is None else jnp.asarray(allowed_np)

  tx = make_optimizer(c.dpo.learning_rate, c.dpo.warmup_steps, c.dpo.weight_decay, c.dpo.max_grad_norm)
  if want('dpo_step'):
    state, state_sharding = _train_state(placement, tx)
    step = functools.partial(dpo_step, model=model, tx=tx, beta=c.beta, allowed_tokens=allowed,
                             constrain_rows=placement.constrain_rows)
    programs.append(Program(
        'dpo_step', step, (state, _preference_batch(mesh, b, p, r)), (state_sharding, replicated),
        donate_argnums=(0,), kind=TRAIN, tokens=2 * b * (p + r),
        model_flops=3 * forward_flops(cfg, 2 * b, p + r)))

  eos_ids, pad_id = eos_and_pad(c)
  settings = DecodeSettings.from_sampler_config(c.sampler, max_new_tokens=r, eos_ids=eos_ids, pad_id=pad_id,
                                                unroll_steps=unroll_steps)
  ctx = SamplerContext(policy=model, ref=model, settings=settings, beta=c.beta, allowed_tokens=allowed_np,
                       vanilla_fraction=c.sampler.vanilla_fraction, best_of_n=c.sampler.best_of_n,
                       max_enumerated_responses=c.sampler.max_enumerated_responses)
  params = _abstract(placement.abstract_params, placement.params)
  key = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  run_key = jax.random.key(c.seed)
  for name in sampler_names(c):
    if not want(f'sample_{name}') or name.startswith('t_pilaf'):  # These enumerate: toy tasks only.
      continue
    fn = check_sampler(name, ctx)

    def sample(policy_params, ref_params, prompts, index, fn=fn):
      pairs = fn(ctx, policy_params, ref_params, prompts, jax.random.fold_in(run_key, index))
      return placement.constrain_rows(pairs)
    programs.append(Program(
        f'sample_{name}', sample, (params, params, _prompts(mesh, b, p), key), None, kind=DECODE,
        tokens=_decoded_rows(name, c) * r, steps=r, model_flops=_sampler_flops(name, c, cfg),
        step_bytes=decode_step_bytes(cfg, mesh, _rows_per_model(name, c), p + r)))

  if want('eval_decode'):
    from pilaf_jax.evaluation.evaluate import eval_sample_batch
    eval_ctx = dataclasses.replace(ctx, settings=dataclasses.replace(settings, temperature=1.0, top_k=0, top_p=1.0))
    e = c.eval.batch_size
    programs.append(Program(
        'eval_decode', functools.partial(eval_sample_batch, eval_ctx, placement, run_key),
        (params, params, _prompts(mesh, e, p), key), None, kind=DECODE, tokens=e * r, steps=r,
        step_bytes=decode_step_bytes(cfg, mesh, (e,), p + r),
        model_flops=_decode_flops(cfg, e, p, r) + forward_flops(cfg, e, p + r)))

  if c.oracle.reward in ('reward_model', 'judge') and want('reward_model_score'):
    from pilaf_jax.labelling.text_oracles import _scores
    from pilaf_jax.model.hf import hf_param_shapes
    from pilaf_jax.model.reward_model import sequence_scores
    oracle_cfg = dataclasses.replace(cfg, dtype=c.oracle.dtype, param_dtype=c.oracle.dtype)
    shapes = hf_param_shapes(oracle_cfg, 1, dtype=c.oracle.dtype)
    oracle_params = _abstract(shapes, param_shardings(shapes, mesh))
    n, t = b, c.oracle.max_len  # The oracle scores one response of each pair per call.
    programs.append(Program(
        'reward_model_score', functools.partial(_scores, Llama(oracle_cfg), sequence_scores),
        (oracle_params, _rows(mesh, (n, t), jnp.int32), _rows(mesh, (n, t), bool)), None, kind=SCORE,
        tokens=n * t, model_flops=forward_flops(oracle_cfg, n, t, lm_head=False)))

  if c.task.name == 'synthetic' and want('sft_step'):  # Only tasks whose reference is trained here.
    sft_tx = make_optimizer(c.sft.learning_rate, c.sft.warmup_steps, c.sft.weight_decay)
    state, state_sharding = _train_state(placement, sft_tx)
    s = c.sft.batch_size
    step = functools.partial(sft_step, model=model, tx=sft_tx, allowed_tokens=allowed)
    programs.append(Program(
        'sft_step', step, (state, _prompts(mesh, s, p), _rows(mesh, (s, r), jnp.int32), _rows(mesh, (s, r), bool)),
        (state_sharding, replicated), donate_argnums=(0,), kind=TRAIN, tokens=s * (p + r),
        model_flops=3 * forward_flops(cfg, s, p + r)))
  return programs


def decode_step_bytes(cfg: LlamaConfig, mesh: Mesh, rows_per_model: tuple[int, ...], slots: int) -> float:
  """HBM bytes one decode step reads per device, arithmetically: each model's matmul weights in the
  activation dtype (whole on every device under FSDP, which all-gathers them; split by tensor) and
  its KV cache (rows split over data x fsdp, kv heads over tensor), every slot read by attention."""
  a = np.dtype(cfg.dtype).itemsize
  shards, tensor = mesh.shape['data'] * mesh.shape['fsdp'], mesh.shape['tensor']
  weights = a * matmul_params(cfg) / tensor
  kv_per_row = 2 * cfg.num_layers * slots * cfg.num_kv_heads * cfg.resolved_head_dim * a / tensor
  return sum(weights + kv_per_row * -(-rows // shards) for rows in rows_per_model if rows)


def _decoded_rows(name: str, c) -> int:
  """Rows a sampler decodes per call (each model's rows counted once per row)."""
  b = c.dpo.batch_size
  return {'best_of_n': c.sampler.best_of_n * b}.get(name, 2 * b)


def _rows_per_model(name: str, c) -> tuple[int, ...]:
  """Rows the policy and the reference each decode in a sampler call (as _sampler_flops counts them)."""
  b = c.dpo.batch_size
  if name == 'pilaf':
    nvr = int(np.ceil(b * c.sampler.vanilla_fraction - 1e-9))
    nm = b - int(np.floor(b * c.sampler.vanilla_fraction + 1e-9))
    return (2 * nvr + 2 * nm, 2 * nm)
  if name == 'hybrid':
    return (b, b)
  return (_decoded_rows(name, c),)


def _decode_flops(cfg: LlamaConfig, rows: int, p: int, r: int) -> float:
  """One model's prefill over [rows, P] and its decode steps, each new token against every slot."""
  return forward_flops(cfg, rows, p) + forward_flops(cfg, rows * r, 1, keys=p + r)


def _sampler_flops(name: str, c, cfg: LlamaConfig) -> float:
  """Model FLOPs of a sampler call: each model's decode on its rows, plus the reference's scoring."""
  b, p, r = c.dpo.batch_size, c.task.prompt_len, c.task.response_len
  if name == 'pilaf':
    nvr = int(np.ceil(b * c.sampler.vanilla_fraction - 1e-9))
    nm = b - int(np.floor(b * c.sampler.vanilla_fraction + 1e-9))
    return (_decode_flops(cfg, 2 * nvr + 2 * nm, p, r) + _decode_flops(cfg, 2 * nm, p, r)
            + forward_flops(cfg, 2 * nvr, p + r))
  if name == 'hybrid':
    return 2 * _decode_flops(cfg, b, p, r) + forward_flops(cfg, b, p + r)
  rows = _decoded_rows(name, c)
  return _decode_flops(cfg, rows, p, r) + forward_flops(cfg, rows, p + r)
