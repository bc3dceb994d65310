r"""Compiles a config's programs for a TPU topology on any machine, and prints what they need and cost.

  python -m pilaf_jax.tools.aot --config=configs/llama3_8b_tpu_pod.py --topology=v5p-32
  python -m pilaf_jax.main --config=configs/llama3_8b_tpu_pod.py --dry_run --topology=v5p:2x2x4

No TPU is touched: the TPU compiler (`libtpu`, `pip install -e '.[aot]'`) describes the topology's
chips (jax.experimental.topologies), the programs of a run (tools/programs.py: the DPO step, each
configured sampler, the evaluation batch, the reward model's scoring, the SFT step where used) are
lowered with the config's mesh and partition rules onto them from jax.ShapeDtypeStructs, and XLA
compiles each. Per program it prints, per chip:

  memory   argument / temporary / output bytes of the real program (memory_analysis), against
           the chip's HBM; a program above 90% of HBM is an error (exit 2).
  cost     XLA's FLOPs, HBM bytes and cost-model time (cost_analysis), and what they imply: tokens/s
           per chip, model-FLOPs utilisation (MFU: the model's own FLOPs, 6N per trained token plus
           attention, over the chip's bf16 peak) and, for decoding, the HBM bandwidth used.

XLA's cost analysis counts a while loop's (or scan's) body once, so costs never come from the real
program: they come from loop-free variants (layers unrolled, scan_layers off), compiled with 1 and
2 layers and extrapolated linearly to the config's depth; a decode loop is compiled with 1 and 2
unrolled steps and extrapolated to response_len steps. Memory comes from the real program.

GPU targets cannot be compiled on a machine without a GPU with jax 0.10.2 (see tpu_topology.GPU_UNSUPPORTED).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Optional

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Compile-only: no accelerator is used (or probed).
# libtpu takes a machine-wide lock for the TPU it drives; compiling touches none, so several
# processes (parallel tests, two plans at once) may load it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from pilaf_jax.model.llama import LlamaConfig
from pilaf_jax.tools import programs as programs_lib
from pilaf_jax.tools.tpu_topology import (Chip, PlanError, chip_of, first_line, fit_hint, make_mesh,
                                         topology_devices)

GB = 1e9
FIT_FRACTION = 0.9  # A program must leave 10% of HBM free (fragmentation, runtime buffers).

# --- Compiling and reading the compiler's figures ---


@dataclasses.dataclass
class Memory:
  argument: int
  output: int
  alias: int
  temp: int
  code: int

  @property
  def peak(self) -> int:
    """Bytes a chip holds at once: inputs, outputs not aliased to (donated) inputs, temporaries."""
    return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass
class Cost:
  flops: float
  bytes: float
  seconds: float

  def __add__(self, o): return Cost(self.flops + o.flops, self.bytes + o.bytes, self.seconds + o.seconds)
  def __sub__(self, o): return Cost(self.flops - o.flops, self.bytes - o.bytes, self.seconds - o.seconds)
  def __mul__(self, k): return Cost(self.flops * k, self.bytes * k, self.seconds * k)


def memory_of(compiled) -> Memory:
  m = compiled.memory_analysis()
  return Memory(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                m.temp_size_in_bytes, m.generated_code_size_in_bytes)


def cost_of(compiled) -> Cost:
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return Cost(float(c.get('flops', 0.0)), float(c.get('bytes accessed', 0.0)),
              float(c.get('optimal_seconds', 0.0)))


def replicated_arrays(program: programs_lib.Program, lowered, compiled, min_bytes: int) -> list[str]:
  """Inputs and outputs of at least min_bytes (whole array) that the compiled program replicates
  on every device: the paths of what should have been split."""
  found = []
  in_shardings = compiled.input_shardings[0]
  leaves = jax.tree_util.tree_flatten_with_path(program.args)[0]
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(in_shardings)):
    if leaf.size * leaf.dtype.itemsize >= min_bytes and sharding.is_fully_replicated:
      found.append('in ' + jax.tree_util.keystr(path))
  out_shapes = jax.tree_util.tree_flatten_with_path(lowered.out_info)[0]
  for (path, leaf), sharding in zip(out_shapes, jax.tree.leaves(compiled.output_shardings)):
    if math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize >= min_bytes and sharding.is_fully_replicated:
      found.append('out ' + jax.tree_util.keystr(path))
  return found


# For the loop-free cost variants only. XLA:TPU turns an FSDP all-gather (or reduce-scatter) next to
# a matmul into a 'windowed einsum': a while loop over the shards, whose body cost_analysis counts
# once. Measured on a 1-layer model over 16 v5p chips: with them 2.96x a forward pass's FLOPs are
# counted for a rematerialised forward + backward (really 3.78x, as with replicated weights); off,
# 3.78x, loop-free, and the cost-model time barely moves (3.04 -> 2.77 ms).
COST_COMPILER_OPTIONS = {'xla_tpu_enable_windowed_einsum_for_all_gather': False,
                         'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}


def compile_program(program: programs_lib.Program, compiler_options: Optional[dict] = None,
                    topology: str = ''):
  """(lowered, compiled, seconds). A program that does not fit makes the TPU compiler fail: PlanError,
  naming how many devices would hold it (the sharded state and rows scale with 1/devices)."""
  start = time.time()
  try:
    lowered = program.lower()
    compiled = lowered.compile(compiler_options=compiler_options)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text:
      hint = ''
      found = re.search(r'\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)', text)
      if found:
        devices = len(jax.tree.leaves(program.args)[0].sharding.device_set)
        need = math.ceil(devices * float(found.group(1)) / (FIT_FRACTION * float(found.group(2))))
        hint = f' {fit_hint(topology, devices, need).capitalize()}, or shrink dpo.batch_size / the task lengths.'
      raise PlanError(f'{program.name} does not fit in HBM: {first_line(e).rstrip(".")}.{hint}') from None
    raise
  return lowered, compiled, time.time() - start


def shallow(cfg: LlamaConfig, layers: int) -> LlamaConfig:
  """The loop-free (unrolled) variant of cfg with `layers` layers, for cost analysis."""
  return dataclasses.replace(cfg, num_layers=layers, scan_layers=False)


def extrapolated_costs(config, mesh, cfg: LlamaConfig, only: Optional[set[str]] = None,
                       log=print) -> dict[str, dict]:
  """Per program, XLA's cost of one full call at cfg's depth, from loop-free 1- and 2-layer (and,
  for decoding, 1- and 2-step) compiles: cost(L) = c1 + (L - 1)(c2 - c1) per step count, and
  cost(steps) = c(k=1) + (steps - 2)(c(k=2) - c(k=1)) (the loop runs response_len - 1 steps, one
  more samples after it, and unrolling k steps keeps that last one). For a decode program also the
  cost of one decode step."""
  costs: dict[tuple, Cost] = {}
  kinds: dict[str, programs_lib.Program] = {}
  for layers in (1, 2):
    for unroll in (1, 2):
      built = programs_lib.build_programs(config, mesh, shallow(cfg, layers), unroll_steps=unroll, only=only)
      for p in built:
        if unroll == 2 and p.kind != programs_lib.DECODE:
          continue
        _, compiled, seconds = compile_program(p, COST_COMPILER_OPTIONS)
        costs[(p.name, layers, unroll)] = cost_of(compiled)
        kinds[p.name] = p
        log(f'  cost: {p.name}, {layers} layer(s){f", {unroll} decode step(s)" if p.kind == programs_lib.DECODE else ""}: '
            f'compiled in {seconds:.0f} s')
  out = {}
  deeper = lambda c1, c2: c1 + (c2 - c1) * (cfg.num_layers - 1)
  for name, p in kinds.items():
    if p.kind != programs_lib.DECODE:
      out[name] = dict(total=deeper(costs[(name, 1, 1)], costs[(name, 2, 1)]))
      continue
    step = deeper(costs[(name, 1, 2)] - costs[(name, 1, 1)], costs[(name, 2, 2)] - costs[(name, 2, 1)])
    once = deeper(costs[(name, 1, 1)], costs[(name, 2, 1)])
    # One layer's share of a step: the 2- minus the 1-layer step, which cancels the output head and
    # the sampling (whose cost-model time XLA can report as negative for the two-model decode).
    layer_step = (costs[(name, 2, 2)] - costs[(name, 2, 1)]) - (costs[(name, 1, 2)] - costs[(name, 1, 1)])
    out[name] = dict(total=once + step * (p.steps - 2), step=step, layer_step=layer_step)
  return out


@dataclasses.dataclass
class Result:
  name: str
  kind: str
  compile_seconds: float = 0.0
  memory: Optional[Memory] = None
  cost: Optional[Cost] = None
  step_cost: Optional[Cost] = None
  layer_step_cost: Optional[Cost] = None  # DECODE: one layer's share of one step.
  tokens: int = 0
  model_flops: float = 0.0
  step_bytes: float = 0.0  # Arithmetic HBM bytes per decode step per device.
  replicated: tuple = ()

  def as_dict(self, chip: Chip, devices: int) -> dict:
    d = dict(name=self.name, kind=self.kind, compile_seconds=round(self.compile_seconds, 1),
             tokens=self.tokens, model_flops=self.model_flops, replicated=list(self.replicated))
    if self.step_bytes:
      d['decode_step_arithmetic_bytes'] = self.step_bytes
    if self.memory:
      d['memory'] = dict(dataclasses.asdict(self.memory), peak=self.memory.peak,
                         hbm_fraction=self.memory.peak / chip.hbm_bytes)
    if self.cost:
      d['cost'] = dict(dataclasses.asdict(self.cost), **implied(self, chip, devices))
    if self.step_cost:
      d['decode_step'] = dataclasses.asdict(self.step_cost)
    if self.layer_step_cost:
      d['decode_step_per_layer'] = dataclasses.asdict(self.layer_step_cost)
    return d


def implied(r: Result, chip: Chip, devices: int) -> dict:
  """Per chip: tokens/s, MFU, XLA FLOPs over the model's, and HBM bandwidth use, at the cost model."""
  t = r.cost.seconds
  out = dict(tokens_per_chip_per_s=r.tokens / devices / t if t > 0 else 0.0,
             mfu=r.model_flops / devices / t / chip.bf16_flops if t > 0 else 0.0,
             xla_over_model_flops=r.cost.flops * devices / r.model_flops if r.model_flops else 0.0,
             hbm_bandwidth_fraction=r.cost.bytes / t / chip.hbm_bandwidth if t > 0 else 0.0)
  if r.step_cost and r.step_cost.seconds > 0:
    out['step_hbm_bandwidth_fraction'] = r.step_cost.bytes / r.step_cost.seconds / chip.hbm_bandwidth
    out['step_arithmetic_bandwidth_fraction'] = r.step_bytes / r.step_cost.seconds / chip.hbm_bandwidth
  return out


def analyse(config, topology: str, *, layers: int = 0, only: Optional[set[str]] = None,
            memory: bool = True, cost: bool = True, min_replicated_bytes: int = 1 << 24,
            log=print) -> tuple[list[Result], Chip, int]:
  """Compiles `config`'s programs for `topology`; returns (results, per-device chip, devices).

  layers > 0 overrides the model's depth (a quick check of a config's structure)."""
  devices = topology_devices(topology)
  chip = chip_of(devices)
  mesh = make_mesh(config, devices)
  from pilaf_jax.experiment import model_config
  cfg = model_config(config.model)
  if layers:
    cfg = dataclasses.replace(cfg, num_layers=layers)
  results = {}
  if memory:
    for p in programs_lib.build_programs(config, mesh, cfg, only=only):
      lowered, compiled, seconds = compile_program(p, topology=topology)
      log(f'  memory: {p.name} compiled in {seconds:.0f} s')
      results[p.name] = Result(p.name, p.kind, seconds, memory_of(compiled), tokens=p.tokens,
                               model_flops=p.model_flops, step_bytes=p.step_bytes,
                               replicated=tuple(replicated_arrays(p, lowered, compiled, min_replicated_bytes)))
  if cost:
    full = {p.name: p for p in programs_lib.build_programs(config, mesh, cfg, only=only)} if not memory else None
    for name, c in extrapolated_costs(config, mesh, cfg, only, log).items():
      if name not in results:
        p = full[name]
        results[name] = Result(name, p.kind, tokens=p.tokens, model_flops=p.model_flops, step_bytes=p.step_bytes)
      results[name].cost, results[name].step_cost = c['total'], c.get('step')
      results[name].layer_step_cost = c.get('layer_step')
  return list(results.values()), chip, len(devices)


def format_table(results: list[Result], chip: Chip, devices: int, title: str = '') -> str:
  lines = [title] if title else []
  lines.append(f'{devices} devices, per device: {chip.hbm_bytes / GB:.0f} GB HBM, '
               f'{chip.bf16_flops / 1e12:.0f} bf16 TFLOP/s, {chip.hbm_bandwidth / GB:.0f} GB/s')
  head = (f'{"program":<22}{"args GB":>9}{"temp GB":>9}{"out GB":>8}{"peak GB":>9}{"% HBM":>7}'
          f'{"TFLOP":>10}{"xla/model":>10}{"time s":>9}{"tok/s/chip":>11}{"MFU":>7}{"HBM BW":>8}')
  lines.append(head)
  for r in results:
    m, c = r.memory, r.cost
    mem = (f'{m.argument / GB:9.2f}{m.temp / GB:9.2f}{(m.output - m.alias) / GB:8.2f}{m.peak / GB:9.2f}'
           f'{100 * m.peak / chip.hbm_bytes:6.0f}%' if m else f'{"":42}')
    if c:
      i = implied(r, chip, devices)
      bw = i.get('step_hbm_bandwidth_fraction', i['hbm_bandwidth_fraction'])
      cost_text = (f'{c.flops / 1e12:10.1f}{i["xla_over_model_flops"]:10.2f}{c.seconds:9.3f}'
                   f'{i["tokens_per_chip_per_s"]:11.0f}{100 * i["mfu"]:6.1f}%{100 * bw:7.0f}%')
    else:
      cost_text = ''
    lines.append(f'{r.name:<22}{mem}{cost_text}')
    if r.step_cost:
      s = r.step_cost
      lines.append(f'{"  one decode step":<22}{"":42}{s.flops / 1e12:10.3f}{"":10}{s.seconds:9.4f}'
                   f'{"":24}{100 * s.bytes / s.seconds / chip.hbm_bandwidth if s.seconds > 0 else 0:7.0f}%'
                   f'  ({s.bytes / GB:.2f} GB read+written at XLA\'s count, {1e3 * s.seconds:.2f} ms; '
                   f'arithmetic {r.step_bytes / GB:.2f} GB: both models\' weights + KV caches, '
                   f'{100 * r.step_bytes / s.seconds / chip.hbm_bandwidth if s.seconds > 0 else 0:.0f}% of '
                   f'{chip.hbm_bandwidth / GB:.0f} GB/s)')
    if r.layer_step_cost and r.layer_step_cost.seconds > 0:
      s = r.layer_step_cost
      lines.append(f'{"  per layer per step":<22}{"":42}{s.flops / 1e12:10.4f}{"":10}{s.seconds:9.6f}'
                   f'{"":24}{100 * s.bytes / s.seconds / chip.hbm_bandwidth:7.0f}%  ({s.bytes / GB:.3f} GB)')
    if r.replicated:
      lines.append(f'  warning: replicated on every device: {", ".join(r.replicated[:6])}')
  lines.append('Per device. Memory from the real program; cost (TFLOP, time at XLA\'s cost model) from loop-free '
               '1-/2-layer and 1-/2-step compiles extrapolated. MFU: the model\'s FLOPs (6N per trained token, '
               '2N per forward token, plus attention) over the bf16 peak. HBM BW: bytes / time / bandwidth '
               '(per decode step for decode programs).')
  return '\n'.join(lines)


def check_fits(results: list[Result], chip: Chip, devices: int, topology: str) -> None:
  """PlanError naming the first program above FIT_FRACTION of HBM and a topology that may fit."""
  for r in results:
    if r.memory and r.memory.peak > FIT_FRACTION * chip.hbm_bytes:
      need = math.ceil(devices * r.memory.peak / (FIT_FRACTION * chip.hbm_bytes))
      raise PlanError(
          f'{r.name} needs {r.memory.peak / GB:.1f} GB per device, above {FIT_FRACTION:.0%} of the '
          f'{chip.hbm_bytes / GB:.0f} GB of HBM on {topology}: {fit_hint(topology, devices, need)} '
          f'(the sharded state scales with 1/devices), or shrink dpo.batch_size / task lengths, or turn on '
          f'model.remat.')


def run(config, topology: str, *, layers: int = 0, only: Optional[set[str]] = None, memory: bool = True,
        cost: bool = True, output_format: str = 'table', title: str = '') -> int:
  """The CLI's body; returns the exit code (2 for bad input or a config that does not fit)."""
  try:
    results, chip, devices = analyse(config, topology, layers=layers, only=only, memory=memory, cost=cost,
                                     log=lambda m: print(m, file=sys.stderr, flush=True))
  except PlanError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if output_format == 'json':
    print(json.dumps(dict(topology=topology, devices=devices, chip=dataclasses.asdict(chip),
                          programs=[r.as_dict(chip, devices) for r in results]), indent=1))
  else:
    print(format_table(results, chip, devices, title or f'Compiled for {topology}'))
  try:
    check_fits(results, chip, devices, topology)
  except PlanError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def main(argv) -> int:
  from absl import flags
  from ml_collections import config_flags
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  f = flags.FLAGS
  if f.config is None:
    print('error: --config is required.', file=sys.stderr)
    return 2
  if not f.topology:
    print('error: --topology is required, e.g. --topology=v5p-32.', file=sys.stderr)
    return 2
  only = set(f.programs.split(',')) if f.programs else None
  measure = set(f.measure.split(','))
  path = config_flags.get_config_filename(f['config'])
  title = f'{path} compiled for {f.topology}' + (f' ({f.layers} layers)' if f.layers else '')
  return run(f.config, f.topology, layers=f.layers, only=only, memory='memory' in measure,
             cost='cost' in measure, output_format=f.format, title=title)


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string('topology', '', 'A TPU topology (v5p:2x2x4) or cloud accelerator type (v5p-32).')
  flags.DEFINE_integer('layers', 0, 'Override the model depth (a quick check; 0 = the config\'s).', lower_bound=0)
  flags.DEFINE_string('programs', '', 'Comma-separated program names to compile (default: all of the run\'s).')
  flags.DEFINE_string('measure', 'memory,cost', 'memory (the real programs), cost (loop-free variants), or both.')
  flags.DEFINE_enum('format', 'table', ['table', 'json'], 'Output format.')


if __name__ == '__main__':
  from absl import app
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=False)
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
