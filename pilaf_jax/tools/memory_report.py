r"""Per-device memory of a config's training state, planned from shapes alone (nothing is allocated).

  python -m pilaf_jax.tools.memory_report --config=configs/llama3_8b_8xh100.py --devices=8

The state is built with jax.eval_shape and laid out with the partition rules on the configured
mesh; with --devices=N the mesh is resolved for N devices arithmetically, so the devices need not
exist. Exits non-zero when the mesh does not fit the devices, a rule cannot split a dim, or a batch
does not split over the data-parallel shards.

Exact rows (from shapes and specs): policy params, reference params, AdamW moments (mu, nu and
counts; optax keeps them in the param dtype), gradients (param-shaped, alive during the update), and
the two KV caches of the sampler's decode batch (2 x dpo.batch_size rows each, prompt_len +
response_len slots).

Estimated rows: activations saved for the backward pass of one DPO step over the 2 x
dpo.batch_size sequences of T = prompt_len + response_len tokens. Per token and layer, with
a = bytes of model.dtype, and head/feature counts divided by the mesh's tensor size:

  a * (2d + (H + 2 Hkv) hd + H hd + 3F)   normed inputs, q/k/v, o_proj input, gate/up/silu*up
  + 4 * (H + Hkv) hd                        rotary q, k in float32
  + 8d                                      float32 copies inside the two RMSNorms
  + (4 + a) H T                             softmax probabilities, float32 and cast

and per sequence for the output head: T (a d + 12 V) (the head's input, and over all T positions
the float32 logits, their log-softmax and their gradient, as the compiled step holds them). Without
rematerialisation every layer keeps all of it. With per-layer rematerialisation (checkpointing each
decoder layer) only each layer's input (a d per token) is kept, plus the larger of one layer's full
set (while it is recomputed) and the head (freed before the layers' backward pass); with
model.remat_policy='save_dots' each layer also keeps the projection outputs its backward pass reads,
a ((H + 2 Hkv) hd + 2F) per token: q, k, v and gate, up (o_proj's and down_proj's outputs are only
added to the residual stream, whose gradient does not need them, so XLA drops them).
program_estimates adds, for the DPO step, the FSDP gather buffers (fsdp_gather_bytes); the DPO step's estimate is held within 15% of the TPU compiler's figure
(tests/test_memory_report.py, docs/scale_out.md).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Optional

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pilaf_jax.learning.train_state import make_optimizer
from pilaf_jax.model.llama import LlamaConfig, count_params
from pilaf_jax.parallel import mesh as mesh_lib
from pilaf_jax.parallel import partitioning

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  total_bytes: int  # Summed over the whole mesh's logical arrays (one copy).
  per_device_bytes: int
  exact: bool = True


@dataclasses.dataclass(frozen=True)
class Report:
  mesh: dict[str, int]
  num_devices: int
  num_params: int
  rows: tuple[Row, ...]
  notes: tuple[str, ...]

  def row(self, name: str) -> Row:
    return next(r for r in self.rows if r.name == name)

  @property
  def state_per_device(self) -> int:
    return sum(r.per_device_bytes for r in self.rows if r.exact)

  def total_per_device(self, remat: bool) -> int:
    act = self.row('DPO activations, per-layer remat' if remat else 'DPO activations, no remat')
    return self.state_per_device + act.per_device_bytes


def activation_bytes(cfg: LlamaConfig, sequences: int, prompt_len: int, response_len: int,
                     tensor: int, remat: bool) -> int:
  """Estimated activation bytes one device keeps for the backward pass (formula: module doc;
  cfg.remat_policy decides what remat keeps)."""
  a = np.dtype(cfg.dtype).itemsize
  d, hd, t = cfg.hidden_size, cfg.resolved_head_dim, prompt_len + response_len
  # Per-device counts of what tensor parallelism splits (rounded up when it does not divide).
  h, hkv = -(-cfg.num_heads // tensor), -(-cfg.num_kv_heads // tensor)
  f, v = -(-cfg.intermediate_size // tensor), -(-cfg.vocab_size // tensor)
  per_layer_token = (a * (2 * d + (h + 2 * hkv) * hd + h * hd + 3 * f)
                     + 4 * (h + hkv) * hd + 8 * d + (4 + a) * h * t)
  # The head, as the compiled step holds it (checked against tools/aot.py compiles): the logits over
  # all T positions in float32, their log-softmax and their gradient (the response slice comes after).
  head = t * (a * d + 12 * v)
  if remat:
    kept = a * d
    if cfg.remat_policy == 'save_dots':  # q, k, v, gate, up outputs (what the backward reads).
      kept += a * ((h + 2 * hkv) * hd + 2 * f)
    # The head's buffers are freed before the layers' backward pass recomputes a layer: the peak is
    # the larger of the two, not their sum (compiled figures: docs/scale_out.md).
    per_sequence = t * cfg.num_layers * kept + max(t * per_layer_token, head)
  else:
    per_sequence = t * cfg.num_layers * per_layer_token + head
  return sequences * per_sequence


def fsdp_gather_bytes(cfg: LlamaConfig, tensor: int) -> int:
  """What the DPO step holds unsplit over fsdp at its peak: the output head's kernel (the logits are
  pinned to the batch rows, so the vocabulary-split kernel is gathered whole) and one layer's
  kernels, each with its gradient before the reduce-scatter, in the param dtype."""
  p = np.dtype(cfg.param_dtype).itemsize
  hd = cfg.resolved_head_dim
  layer = cfg.hidden_size * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * hd + 3 * cfg.hidden_size * cfg.intermediate_size
  return 2 * p * (cfg.hidden_size * cfg.vocab_size + layer) // tensor


def _oracle_rows(config, sizes) -> tuple:
  """The oracle model's params, for oracles that run a model (a reward model or a judge). Its
  architecture is read from oracle.checkpoint when that exists here, else taken to be the policy's."""
  if config.oracle.reward not in ('reward_model', 'judge'):
    return ()
  import os
  from pilaf_jax.model import checkpoints, hf
  cfg, num_labels = LlamaConfig.from_config(config.model), 1
  if os.path.exists(checkpoints.resolve_path(config.oracle.checkpoint)):
    cfg, info = checkpoints.read_checkpoint_config(config.oracle.checkpoint)
    num_labels = info.num_labels or 1
  shapes = hf.hf_param_shapes(cfg, num_labels if config.oracle.reward == 'reward_model' else 0,
                              dtype=config.oracle.dtype)
  specs = partitioning.param_partition_specs(shapes, mesh=sizes)
  return (Row(f'oracle params ({config.oracle.reward}, {config.oracle.dtype})', partitioning.total_bytes(shapes),
              partitioning.per_device_bytes(shapes, specs, sizes)),)


def build_report(config, num_devices: int) -> Report:
  """Every row of the report for `config` on `num_devices` devices. Raises ValueError on misfit."""
  sizes = dict(zip(mesh_lib.MESH_AXES, mesh_lib.resolve_mesh_shape(config.mesh, num_devices)))
  cfg = LlamaConfig.from_config(config.model)
  batch, p, r = config.dpo.batch_size, config.task.prompt_len, config.task.response_len
  params = partitioning.abstract_params(cfg)
  specs = partitioning.param_partition_specs(params, mesh=sizes)
  for what, rows in (('dpo.batch_size', batch), ('sft.batch_size', config.sft.batch_size),
                     ('eval.batch_size', config.eval.batch_size)):
    mesh_lib.check_batch_divisible(rows, sizes, what)
  param_row = lambda name: Row(name, partitioning.total_bytes(params),
                               partitioning.per_device_bytes(params, specs, sizes))

  d = config.dpo  # The DPO update's own optimizer, so that its state is counted exactly.
  tx = make_optimizer(d.learning_rate, d.warmup_steps, d.weight_decay, d.max_grad_norm)
  opt_state = jax.eval_shape(tx.init, params)
  opt_specs = partitioning.optimizer_state_specs(opt_state, specs, params)

  # The sampler decodes both responses of every prompt; each model keeps a cache for its rows.
  decode_rows, slots = 2 * batch, p + r
  cache = partitioning.abstract_kv_cache(cfg, decode_rows, slots)
  cache_specs = partitioning.kv_cache_specs(cache, sizes)

  sequences = 2 * batch  # Chosen and rejected response of every pair.
  per_device_seqs = sequences // mesh_lib.num_batch_shards(sizes)
  act = functools.partial(activation_bytes, cfg, prompt_len=p, response_len=r)
  # Whole-batch totals are for the unsplit model (tensor=1); per device, tensor splits features.
  total_act = lambda remat: act(sequences, tensor=1, remat=remat)
  device_act = lambda remat: act(per_device_seqs, tensor=sizes['tensor'], remat=remat)

  rows = (
      param_row('policy params'),
      param_row('reference params'),
      *_oracle_rows(config, sizes),
      Row('AdamW state (mu, nu)', partitioning.total_bytes(opt_state),
          partitioning.per_device_bytes(opt_state, opt_specs, sizes)),
      param_row('gradients'),
      Row(f'KV caches (2 models x {decode_rows} rows x {slots} slots)',
          2 * partitioning.total_bytes(cache), 2 * partitioning.per_device_bytes(cache, cache_specs, sizes)),
      Row('DPO activations, no remat', total_act(False), device_act(False), exact=False),
      Row('DPO activations, per-layer remat', total_act(True), device_act(True), exact=False),
  )
  notes = (
      f'model: {count_params(params):,} params, param_dtype={cfg.param_dtype}, dtype={cfg.dtype}',
      f'DPO step: {batch} pairs = {sequences} sequences x {slots} tokens (prompt {p} + response {r}), '
      f'{per_device_seqs} per device',
      f'decode: {decode_rows} rows per model, {slots} cache slots',
  )
  return Report(sizes, num_devices, count_params(params), rows, notes)


def program_estimates(config, report: Report) -> dict[str, int]:
  """Per-device bytes each compiled program (tools/programs.py) should need, from the report's rows:
  what it holds as inputs plus the estimated activations. Compared with the compiler's figures in
  docs/scale_out.md (tools/aot.py); XLA temporaries beyond activations are not in these."""
  rows = {r.name: r.per_device_bytes for r in report.rows}
  params, ref = rows['policy params'], rows['reference params']
  cache = next(v for k, v in rows.items() if k.startswith('KV caches'))
  act = rows['DPO activations, per-layer remat' if config.model.remat else 'DPO activations, no remat']
  out = {'dpo_step': params + rows['AdamW state (mu, nu)'] + rows['gradients'] + act
                     + fsdp_gather_bytes(LlamaConfig.from_config(config.model), report.mesh['tensor']),
         f'sample_{config.sampler.name}': params + ref + cache}
  # Evaluation decodes eval.batch_size rows with the policy alone: one cache of that many rows.
  out['eval_decode'] = params + ref + cache // 2 * config.eval.batch_size // (2 * config.dpo.batch_size)
  oracle = [v for k, v in rows.items() if k.startswith('oracle params')]
  if oracle:
    out['reward_model_score'] = oracle[0]
  return out


def format_table(report: Report, config_path: str = '') -> str:
  m = report.mesh
  lines = [f'Memory plan{" for " + config_path if config_path else ""}: {report.num_devices} devices, '
           f'mesh data={m["data"]} x fsdp={m["fsdp"]} x tensor={m["tensor"]}']
  lines += [f'  {n}' for n in report.notes]
  lines.append('')
  width = max(len(r.name) for r in report.rows) + 4
  lines.append(f'{"":{width}}{"total GiB":>12}{"per device GiB":>17}')

  def line(name, total, per_device):
    total_text = f'{total / GIB:12.2f}' if total is not None else f'{"":12}'
    return f'{name:{width}}{total_text}{per_device / GIB:17.2f}'

  for r in report.rows:
    if r.exact:
      lines.append(line(r.name, r.total_bytes, r.per_device_bytes))
  lines.append(line('state (exact, from shapes)', None, report.state_per_device))
  lines.append('')
  for r in report.rows:
    if not r.exact:
      lines.append(line(r.name + ' (est.)', r.total_bytes, r.per_device_bytes))
  lines.append('')
  lines.append(line('total per device, no remat', None, report.total_per_device(remat=False)))
  lines.append(line('total per device, per-layer remat', None, report.total_per_device(remat=True)))
  lines.append('(Activations are estimates, checked against the TPU compiler for the DPO step; FSDP gather '
               'buffers are not in this table: program_estimates adds them.)')
  return '\n'.join(lines)


def to_json(report: Report) -> str:
  return json.dumps(dict(
      mesh=report.mesh, num_devices=report.num_devices, num_params=report.num_params,
      rows=[dataclasses.asdict(r) for r in report.rows],
      state_per_device_bytes=report.state_per_device,
      total_per_device_bytes=dict(no_remat=report.total_per_device(False),
                                  per_layer_remat=report.total_per_device(True)),
      notes=list(report.notes)), indent=1)


def main(argv) -> Optional[int]:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required.')
  num_devices = flags.FLAGS.devices or jax.device_count()
  try:
    report = build_report(config, num_devices)
  except ValueError as e:
    print(f'memory_report: {e}', file=sys.stderr)
    return 1
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  print(format_table(report, path) if flags.FLAGS.format == 'table' else to_json(report))
  return 0


if __name__ == '__main__':  # Flags only here: main's --dry_run imports this module.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer('devices', 0, 'Plan for this many devices (default: the devices jax sees here). '
                       'They need not exist.', lower_bound=0)
  flags.DEFINE_enum('format', 'table', ['table', 'json'], 'Output format.')
  app.run(main)
