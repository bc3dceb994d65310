r"""Writes a run's trained policy as a Hugging Face checkpoint that transformers loads as is:

  python -m pilaf_jax.tools.export_policy --workdir=<run dir> --out=<dir> [--step=N] [--dtype=bfloat16]

Reads the run's resolved config (config.json) and its newest checkpoint (or --step), and writes
config.json, generation_config.json, model.safetensors and the tokenizer of the run's model
(copied from a Hugging Face checkpoint directory, or rebuilt from a .gguf file). Reads the run only.
--workdir and --out may be gs:// URLs (a remote --out is written locally first, then uploaded).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags


def export_policy(workdir: str, out: str, step: int = -1, dtype: str = '') -> int:
  """Exports; returns the step written. Raises ValueError with a one-line message on bad input."""
  from pilaf_jax import config_aliases, paths
  if paths.is_remote(out):
    with tempfile.TemporaryDirectory(prefix='export_policy_') as local:
      step = export_policy(workdir, local, step, dtype)
      paths.copy_tree(local, out)
    return step
  import ml_collections
  import orbax.checkpoint as ocp
  from pilaf_jax.model.checkpoints import read_checkpoint_config, resolve_path
  from pilaf_jax.model.hf import save_hf_checkpoint
  from pilaf_jax.model.llama import LlamaConfig

  path = paths.join(workdir, 'config.json')
  if not paths.exists(path):
    raise ValueError(f'{path} does not exist; pass --workdir=<a run directory>.')
  config = config_aliases.resolve(ml_collections.ConfigDict(json.loads(paths.read_text(path))['config']))
  manager = ocp.CheckpointManager(paths.as_path(paths.join(workdir, 'checkpoints')),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps())
  if not steps or (step >= 0 and step not in steps):
    raise ValueError(f'{workdir}/checkpoints holds steps {steps}; nothing to export at step '
                     f'{step if step >= 0 else "(newest)"}.')
  step = steps[-1] if step < 0 else step
  # No target: the saved tree comes back as nested dicts of arrays, on the host.
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = restored['state']['train']['params']
  cfg = LlamaConfig.from_config(config.model)
  info, tokenizer_dir = None, None
  if config.model.checkpoint:
    _, info = read_checkpoint_config(config.model.checkpoint)
    source = resolve_path(config.model.checkpoint)
    tokenizer_dir = source if os.path.isdir(source) else None
  save_hf_checkpoint(out, cfg, params, info=info, tokenizer_dir=tokenizer_dir, dtype=dtype or None)
  if config.model.checkpoint and tokenizer_dir is None:  # A .gguf: rebuild its tokenizer files.
    from pilaf_jax.data.tokenization import load_tokenizer
    load_tokenizer(resolve_path(config.task.chat.tokenizer or config.model.checkpoint)).save_pretrained(out)
  return step


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir or not f.out:
    print('error: pass --workdir=<a run directory> and --out=<a directory>.', file=sys.stderr)
    sys.exit(2)
  try:
    step = export_policy(f.workdir, f.out, f.step, f.dtype)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Exported the policy of {f.workdir} at step {step} to {f.out} (Hugging Face layout).')


if __name__ == '__main__':  # Flags are defined here only, so that importing export_policy defines none.
  flags.DEFINE_string('workdir', None, 'A run directory (config.json, checkpoints/).')
  flags.DEFINE_string('out', None, 'Directory for the Hugging Face checkpoint.')
  flags.DEFINE_integer('step', -1, 'Checkpoint step to export (default: the newest).')
  flags.DEFINE_string('dtype', '', "dtype of the written weights (default: the params' own).")
  app.run(main)
