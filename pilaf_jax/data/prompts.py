"""Where prompts come from: anything indexable that returns a conversation as chat messages.

A prompt is a list of {'role': 'system'|'user'|'assistant', 'content': str} ending with a user turn;
ChatTokenizer renders it with the model's chat template. Sources are deterministic by index, so a
prompt batch is a pure function of its indices (which is what makes resume exact).
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Protocol, runtime_checkable

from pilaf_jax.data import hh_rlhf

_ROLES = ('system', 'user', 'assistant')


@runtime_checkable
class PromptSource(Protocol):
  """A fixed, indexable set of chat prompts."""

  def __len__(self) -> int:
    ...

  def messages(self, i: int) -> list[dict[str, str]]:
    """Prompt i as chat messages; the same list every call."""
    ...


class HHRLHFPrompts:
  """The prompts of one split of a built HH-RLHF config, read through grain by index.

  With source_dir, the config is built into data_dir first if it is not there yet; without, it must
  already be built. `dataset` is a grain MapDataset of decoded examples ({'id', 'subset',
  'messages', 'chosen', 'rejected'}), for pipelines that want more than the prompts.
  """

  def __init__(self, data_dir: str | os.PathLike, split: str, subset: str = hh_rlhf.ALL,
               source_dir: str | os.PathLike | None = None):
    import grain  # Deferred: it is only needed for real datasets.

    if source_dir is not None:
      self.builder = hh_rlhf.prepare_hh_rlhf(source_dir, data_dir, subset)
    else:
      self.builder = hh_rlhf.load_hh_rlhf(data_dir, subset)
    if split not in self.builder.info.splits:
      raise ValueError(f'HH-RLHF {subset!r} has no split {split!r}; it has '
                       f'{", ".join(sorted(self.builder.info.splits))}')
    self.split = split
    self.dataset = grain.MapDataset.source(self.builder.as_data_source(split)).map(
        hh_rlhf.decode_example)

  def __len__(self) -> int:
    return len(self.dataset)

  def example(self, i: int) -> dict:
    """Example i: {'id', 'subset', 'messages', 'chosen', 'rejected'}."""
    return self.dataset[self._check(i)]

  def messages(self, i: int) -> list[dict[str, str]]:
    return self.example(i)['messages']

  def _check(self, i: int) -> int:
    if not 0 <= i < len(self):
      raise IndexError(f'prompt index {i} out of range for {len(self)} {self.split} prompts')
    return i


def demo_prompts(data_dir: str | os.PathLike, split: str) -> HHRLHFPrompts:
  """The shipped demo prompts (~256 train / 64 test), built into data_dir on first use."""
  return HHRLHFPrompts(data_dir, split, subset=hh_rlhf.FLAT, source_dir=hh_rlhf.DEMO_PROMPTS_DIR)


class JsonlPrompts:
  """Prompts from a .jsonl or .jsonl.gz file: one {"messages": [...]} or {"prompt": "..."} per line.

  A bare "prompt" becomes a single user turn. Blank lines are ignored; anything else malformed is a
  one-line error naming the file and line.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    opener = gzip.open if self.path.endswith('.gz') else open
    with opener(self.path, 'rt', encoding='utf-8') as f:
      self._prompts = [_parse_line(line, f'{self.path}:{n + 1}')
                       for n, line in enumerate(f) if line.strip()]
    if not self._prompts:
      raise ValueError(f'{self.path} holds no prompts; expected one {{"messages": [...]}} or '
                       f'{{"prompt": "..."}} per line')

  def __len__(self) -> int:
    return len(self._prompts)

  def messages(self, i: int) -> list[dict[str, str]]:
    return [dict(m) for m in self._prompts[i]]  # Copies: callers may not mutate the source.


def _parse_line(line: str, where: str) -> list[dict[str, str]]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: not JSON ({e.msg})') from None
  if isinstance(record, dict) and isinstance(record.get('prompt'), str):
    return [{'role': 'user', 'content': record['prompt']}]
  messages = record.get('messages') if isinstance(record, dict) else None
  if not isinstance(messages, list) or not messages:
    raise ValueError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} or '
                     f'{{"prompt": "..."}}')
  for m in messages:
    if (not isinstance(m, dict) or m.get('role') not in _ROLES
        or not isinstance(m.get('content'), str)):
      raise ValueError(f'{where}: every message needs a role in {_ROLES} and a string content, '
                       f'got {str(m)[:80]!r}')
  if messages[-1]['role'] != 'user':
    raise ValueError(f'{where}: the last message must be a user turn, got {messages[-1]["role"]!r}')
  return [{'role': m['role'], 'content': m['content']} for m in messages]
