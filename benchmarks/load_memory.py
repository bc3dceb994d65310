r"""Peak host memory while loading a sharded Hugging Face checkpoint onto an 8-device FSDP mesh.

  python benchmarks/load_memory.py [--vocab=2048] [--hidden=256] [--layers=4] [--ffn=1024] [--json]

Writes a random Llama checkpoint (safetensors, several shards plus model.safetensors.index.json),
then loads it with pilaf_jax.model.hf.load_hf_checkpoint onto a ('data', 'fsdp', 'tensor') =
(1, 8, 1) mesh of 8 forced CPU devices, with param_shardings of the loaded tree. tracemalloc traces
every numpy buffer (and safetensors' reads), but not XLA's device buffers, so its peak is the host
memory the loader itself holds. A loader that reads tensor by tensor peaks near 2 x the largest
tensor (the raw read plus its transposed, cast copy); one that materialised the whole checkpoint
would peak near its total size. The checkpoint is loaded twice and the second load is the figure:
the first also counts jax's one-time imports and compilations (reported separately). Prints both
ratios (and, with --json, one JSON line at the end).
"""
from __future__ import annotations

import os

# The device count is fixed when jax starts, so this must precede every jax import.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from pilaf_jax.model.hf import hf_name, hf_param_shapes, load_hf_checkpoint, read_hf_config  # noqa: E402
from pilaf_jax.model.llama import LlamaConfig  # noqa: E402
from pilaf_jax.parallel.mesh import make_mesh  # noqa: E402
from pilaf_jax.parallel.partitioning import param_shardings  # noqa: E402


def write_checkpoint(root: str, cfg: LlamaConfig, shard_bytes: int, seed: int = 0) -> tuple[int, int]:
  """A random float32 checkpoint in shards of about shard_bytes; returns (total, largest) bytes."""
  rs = np.random.RandomState(seed)
  shapes = hf_param_shapes(cfg)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  weight_map, shard, shard_size, files, total, largest = {}, {}, 0, [], 0, 0

  def flush():
    nonlocal shard, shard_size
    if shard:
      name = f'model-{len(files) + 1:05d}.safetensors'
      save_file(shard, os.path.join(root, name), metadata={'format': 'pt'})
      files.append(name)
      weight_map.update({k: name for k in shard})
      shard, shard_size = {}, 0

  for path, leaf in flat:
    name, transposed = hf_name(tuple(str(k.key) for k in path))
    shape = leaf.shape[::-1] if transposed else leaf.shape
    array = (1.0 + 0.1 * rs.randn(*shape) if 'norm' in name else 0.02 * rs.randn(*shape)).astype(np.float32)
    if shard_size + array.nbytes > shard_bytes:
      flush()
    shard[name] = array
    shard_size += array.nbytes
    total += array.nbytes
    largest = max(largest, array.nbytes)
  flush()
  with open(os.path.join(root, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  config = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden_size, 'intermediate_size': cfg.intermediate_size,
      'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'rms_norm_eps': cfg.rms_norm_eps,
      'rope_theta': cfg.rope_theta, 'tie_word_embeddings': False, 'hidden_act': 'silu'}
  with open(os.path.join(root, 'config.json'), 'w') as f:
    json.dump(config, f)
  return total, largest


def measure(vocab: int, hidden: int, layers: int, ffn: int, shard_bytes: int) -> dict:
  """Writes a checkpoint, loads it sharded under tracemalloc and returns the figures."""
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                    num_heads=8, num_kv_heads=4)
  with tempfile.TemporaryDirectory() as root:
    total, largest = write_checkpoint(root, cfg, shard_bytes)
    num_files = len([f for f in os.listdir(root) if f.endswith('.safetensors')])
    mesh = make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1})
    loaded_cfg, info = read_hf_config(root)
    shardings = param_shardings(hf_param_shapes(loaded_cfg, info.num_labels), mesh)
    runs = []
    # The first load also pays jax's one-time costs (imports, tracing and compiling the per-shape
    # device copies), which tracemalloc counts too; the second shows the loader's own footprint.
    for _ in ('cold', 'warm'):
      params = None
      gc.collect()
      tracemalloc.start()
      start = time.perf_counter()
      _, params = load_hf_checkpoint(root, 'float32', shardings)
      jax.block_until_ready(params)
      seconds = time.perf_counter() - start
      current, peak = tracemalloc.get_traced_memory()
      tracemalloc.stop()
      runs.append((peak, current, seconds))
    on_devices = sum(x.nbytes for x in jax.tree.leaves(params))
    shards_ok = all(len(x.addressable_shards) == 8 and x.sharding == s for x, s in
                    zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))
    # And the values are the checkpoint's (checked after the measurement, which it would spoil).
    flat = {hf_name(tuple(str(k.key) for k in path)): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    written = {}
    for f in os.listdir(root):
      if f.endswith('.safetensors'):
        written.update(load_file(os.path.join(root, f)))
    values_ok = len(written) == len(flat) and all(
        np.array_equal(x.T if transposed else x, written[name]) for (name, transposed), x in flat.items())
  (cold_peak, _, cold_seconds), (peak, current, seconds) = runs
  return dict(devices=len(jax.devices()), files=num_files, total_bytes=total, largest_tensor_bytes=largest,
              peak_bytes=peak, held_after_bytes=current, loaded_bytes=on_devices,
              peak_over_largest=peak / largest, peak_over_total=peak / total,
              cold_peak_bytes=cold_peak, cold_peak_over_largest=cold_peak / largest,
              cold_seconds=cold_seconds, shardings_ok=bool(shards_ok), values_ok=bool(values_ok), seconds=seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--vocab', type=int, default=2048)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--ffn', type=int, default=1024)
  parser.add_argument('--shard-mb', type=float, default=4.0, help='safetensors shard size')
  parser.add_argument('--json', action='store_true', help='end with the figures as one JSON line')
  args = parser.parse_args()
  r = measure(args.vocab, args.hidden, args.layers, args.ffn, int(args.shard_mb * 2**20))
  mb = lambda b: f'{b / 2**20:.2f} MB'
  print(f'checkpoint: {mb(r["total_bytes"])} in {r["files"]} safetensors files; largest tensor '
        f'{mb(r["largest_tensor_bytes"])}; loaded onto {r["devices"]} devices (fsdp=8) in '
        f'{r["seconds"]:.2f} s ({r["cold_seconds"]:.2f} s the first time, with compilation)')
  print(f'peak traced host memory during the load: {mb(r["peak_bytes"])} = '
        f'{r["peak_over_largest"]:.2f} x largest tensor = {r["peak_over_total"]:.3f} x checkpoint')
  print(f'first load in the process (jax imports and compilation included): '
        f'{mb(r["cold_peak_bytes"])} = {r["cold_peak_over_largest"]:.2f} x largest tensor')
  print(f'held after the load: {mb(r["held_after_bytes"])}; shardings as asked: {r["shardings_ok"]}; '
        f'values equal the checkpoint: {r["values_ok"]}')
  if args.json:
    print(json.dumps(r))


if __name__ == '__main__':
  main()
