"""A TFDS builder for Anthropic's HH-RLHF preference data, read from local files only.

Source layout (as published at github.com/anthropics/hh-rlhf):

  <source_dir>/<subset>/{train,test}.jsonl.gz,  subset in SUBSETS

Each line is {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: two conversations that
share everything up to the last Assistant turn. Every example written holds the shared prompt as chat
messages, the two final responses, the subset and a stable integer id (see `example_id`).

Configs: one per subset, 'all' (every subset; all four must be present), and 'flat', which reads
<source_dir>/{train,test}.jsonl.gz directly (one unnamed subset, e.g. the shipped demo prompts).

Nothing is ever downloaded: the builder reads TFDS's manual dir, which `prepare_hh_rlhf` points at
the source directory. Examples are written as array_record, read back with `tfds.data_source` or
`builder.as_data_source(split)` (no TensorFlow). Their order is TFDS's deterministic shuffle by key,
so any prefix of a split mixes subsets.

Malformed conversations are skipped, not fatal (real files have quirks): each skip is counted by
reason in `builder.info.metadata['skipped'][split]` and logged. Harmless repairs (text before the
first Human turn dropped, empty turns dropped, consecutive same-role turns merged) are counted in
`builder.info.metadata['repaired'][split]`.
"""
from __future__ import annotations

import collections
import gzip
import json
import os
import re
from collections.abc import Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SUBSETS = ('harmless-base', 'helpful-base', 'helpful-online', 'helpful-rejection-sampled')
ALL = 'all'
FLAT = 'flat'
CONFIG_NAMES = SUBSETS + (ALL, FLAT)
SPLITS = ('train', 'test')
DEMO_PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_prompts')

# Ids are subset * 1e8 + split * 1e7 + line: unique across subsets and splits, equal in a subset's
# own config and in 'all', readable by eye, and inside int32.
_SUBSET_CODES = {FLAT: 0, **{s: i + 1 for i, s in enumerate(SUBSETS)}}
_SPLIT_CODES = {s: i for i, s in enumerate(SPLITS)}
_MAX_LINES = 10_000_000

_MARKER = re.compile(r'\n\n(Human|Assistant):')
_ROLES = {'Human': 'user', 'Assistant': 'assistant'}
_LAYOUT = '<dir>/<subset>/{train,test}.jsonl.gz with <subset> in ' + ', '.join(SUBSETS)
_FLAT_LAYOUT = '<dir>/{train,test}.jsonl.gz'


class ConversationError(ValueError):
  """A conversation that cannot be split into (prompt, response); `reason` is a short key."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason


def example_id(subset: str, split: str, line: int) -> int:
  """The stable id of the example on (0-based) line `line` of <subset>/<split>.jsonl.gz."""
  if not 0 <= line < _MAX_LINES:
    raise ValueError(f'line {line} out of range [0, {_MAX_LINES}) for an HH-RLHF example id')
  return _SUBSET_CODES[subset] * 10 * _MAX_LINES + _SPLIT_CODES[split] * _MAX_LINES + line


def parse_turns(text: str) -> tuple[list[dict[str, str]], str]:
  """Splits '\\n\\nHuman: a\\n\\nAssistant: b...' into ([{'role', 'content'}, ...], preamble).

  Turns start at each '\\n\\nHuman:' / '\\n\\nAssistant:' marker (the leading '\\n\\n' of the very first
  one is optional); contents are stripped and may be empty. The preamble is whatever came before
  the first marker.
  """
  parts = _MARKER.split('\n\n' + text)  # [preamble, role, content, role, content, ...]
  turns = [{'role': _ROLES[r], 'content': c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
  return turns, parts[0][2:]


def split_conversation(text: str) -> tuple[list[dict[str, str]], str, set[str]]:
  """One HH-RLHF conversation -> (prompt messages, final assistant response, repairs made).

  The prompt is every turn before the last one, which must be an Assistant turn (possibly empty);
  empty prompt turns are dropped and consecutive same-role turns merged, so the prompt alternates
  user/assistant, starting and ending with a user turn. Raises ConversationError otherwise.
  """
  turns, preamble = parse_turns(text)
  repairs = set()
  if preamble.strip():
    repairs.add('preamble_dropped')
  if not turns or turns[-1]['role'] != 'assistant':
    raise ConversationError('no_final_assistant_turn')
  prompt = []
  for turn in turns[:-1]:
    if not turn['content']:
      repairs.add('empty_turn_dropped')
    elif prompt and prompt[-1]['role'] == turn['role']:
      repairs.add('turns_merged')
      prompt[-1] = {'role': turn['role'], 'content': prompt[-1]['content'] + '\n\n' + turn['content']}
    else:
      prompt.append(dict(turn))
  if not prompt:
    raise ConversationError('empty_prompt')
  if prompt[0]['role'] != 'user':
    raise ConversationError('prompt_starts_with_assistant')
  if prompt[-1]['role'] != 'user':
    raise ConversationError('prompt_ends_with_assistant')
  return prompt, turns[-1]['content'], repairs


def parse_pair(chosen: str, rejected: str) -> tuple[dict, set[str]]:
  """One jsonl record -> ({'prompt', 'chosen', 'rejected'}, repairs); the prompts must agree."""
  prompt, chosen_response, repairs = split_conversation(chosen)
  rejected_prompt, rejected_response, rejected_repairs = split_conversation(rejected)
  if rejected_prompt != prompt:
    raise ConversationError('prompt_mismatch', 'chosen and rejected differ before the last turn')
  return {'prompt': prompt, 'chosen': chosen_response, 'rejected': rejected_response}, (
      repairs | rejected_repairs)


def source_files(source_dir: str | os.PathLike, config: str) -> dict[str, list[tuple[str, str]]]:
  """{split: [(subset, path), ...]} for `config`; a one-line FileNotFoundError when files are missing."""
  _check_config(config)
  source_dir = os.fspath(source_dir)
  if config == FLAT:
    subsets, layout = [(FLAT, source_dir)], _FLAT_LAYOUT
  else:
    names = SUBSETS if config == ALL else (config,)
    subsets, layout = [(s, os.path.join(source_dir, s)) for s in names], _LAYOUT
  files = {split: [(s, os.path.join(d, f'{split}.jsonl.gz')) for s, d in subsets] for split in SPLITS}
  missing = [os.path.relpath(p, source_dir) for paths in files.values() for _, p in paths
             if not os.path.isfile(p)]
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f'{source_dir} is not a directory; expected HH-RLHF files laid out as '
                            f'{layout}')
  if len(missing) == sum(len(paths) for paths in files.values()):
    raise FileNotFoundError(f'{source_dir} holds no HH-RLHF files (config {config!r}); expected '
                            f'the layout {layout}')
  if missing:
    raise FileNotFoundError(f'{source_dir} lacks {", ".join(missing)} (config {config!r}); expected '
                            f'the layout {layout}')
  return files


def _check_config(config: str) -> None:
  if config not in CONFIG_NAMES:
    raise ValueError(f'unknown HH-RLHF subset {config!r}; expected one of {", ".join(CONFIG_NAMES)}')


def _read_records(path: str) -> Iterator[tuple[int, str, str]]:
  """(0-based line, chosen, rejected) for every non-blank line of a jsonl.gz file."""
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    for line_no, line in enumerate(f):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        chosen, rejected = record['chosen'], record['rejected']
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{path}:{line_no + 1}: expected a JSON object with string fields "chosen" '
                         f'and "rejected" ({type(e).__name__})') from None
      if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError(f'{path}:{line_no + 1}: "chosen" and "rejected" must be strings')
      yield line_no, chosen, rejected


class HhRlhf(tfds.core.GeneratorBasedBuilder):
  """Anthropic HH-RLHF: prompts as chat messages, with the chosen and rejected final responses."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      *(tfds.core.BuilderConfig(name=s, description=f'The {s} subset.') for s in SUBSETS),
      tfds.core.BuilderConfig(name=ALL, description='Every subset.'),
      tfds.core.BuilderConfig(name=FLAT, description=f'One subset laid out as {_FLAT_LAYOUT}.'),
  ]
  DEFAULT_CONFIG_NAME = ALL
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Nothing is downloaded. Point the manual dir at a local copy of '
      f'https://github.com/anthropics/hh-rlhf laid out as {_LAYOUT} (or {_FLAT_LAYOUT} for the '
      f"'{FLAT}' config), e.g. with pilaf_jax.data.hh_rlhf.prepare_hh_rlhf(source_dir, data_dir).")

  # TFDS finds a builder's source through importlib_resources, which it does not declare as a
  # dependency; the path is only used to look for (absent) download checksums.
  code_path = epath.Path(__file__)

  def __init__(self, **kwargs):
    # tfrecord (TFDS's default) needs TensorFlow to write and read.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description='Anthropic HH-RLHF helpfulness/harmlessness preference pairs, split into a chat '
                    'prompt and the chosen and rejected final assistant responses.',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Scalar(np.int64),
            'subset': text,
            'prompt': tfds.features.Sequence({'role': text, 'content': text}),
            'chosen': text,
            'rejected': text,
        }),
        homepage='https://github.com/anthropics/hh-rlhf',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    files = source_files(dl_manager.manual_dir, self.builder_config.name)
    return {split: self._generate_examples(split, files[split]) for split in SPLITS}

  def _generate_examples(self, split: str, files: list[tuple[str, str]]):
    skipped, repaired = collections.Counter(), collections.Counter()
    for subset, path in files:
      for line_no, chosen, rejected in _read_records(path):
        try:
          pair, repairs = parse_pair(chosen, rejected)
        except ConversationError as e:
          skipped[f'{subset}/{e.reason}'] += 1
          continue
        repaired.update(f'{subset}/{r}' for r in repairs)
        yield f'{subset}/{line_no}', {'id': example_id(subset, split, line_no), 'subset': subset,
                                      **pair}
    # Runs once the split is fully written; the metadata is saved with the dataset.
    self.info.metadata.setdefault('skipped', {})[split] = dict(sorted(skipped.items()))
    self.info.metadata.setdefault('repaired', {})[split] = dict(sorted(repaired.items()))
    if skipped:
      logging.warning('HH-RLHF %s/%s: skipped %d malformed conversations: %s',
                      self.builder_config.name, split, sum(skipped.values()), dict(skipped))


def prepare_hh_rlhf(source_dir: str | os.PathLike, data_dir: str | os.PathLike,
                    subset: str = ALL) -> HhRlhf:
  """Builds HH-RLHF config `subset` from `source_dir` into `data_dir` once; later calls reuse it.

  A finished build is never rebuilt, even from another source_dir: delete
  <data_dir>/hh_rlhf/<subset> to rebuild.
  """
  _check_config(subset)
  builder = HhRlhf(config=subset, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    source_files(source_dir, subset)  # Fail with the layout message before TFDS creates anything.
    tfds.disable_progress_bar()  # TFDS's bars go to stderr, where they would bury a run's errors.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(source_dir),
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    ))
  return builder


def load_hh_rlhf(data_dir: str | os.PathLike, subset: str = ALL) -> HhRlhf:
  """An already-built HH-RLHF config; a one-line error saying how to build it when absent."""
  _check_config(subset)
  builder = HhRlhf(config=subset, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(f'HH-RLHF {subset!r} is not built under {data_dir}; build it with '
                            f'prepare_hh_rlhf(source_dir, data_dir, {subset!r}) (source layout {_LAYOUT})')
  return builder


def decode_example(record: dict) -> dict:
  """A record from `builder.as_data_source(split)` (bytes, columns) -> python strs and messages."""
  prompt = record['prompt']
  return {
      'id': int(record['id']),
      'subset': _str(record['subset']),
      'messages': [{'role': _str(r), 'content': _str(c)}
                   for r, c in zip(prompt['role'], prompt['content'])],
      'chosen': _str(record['chosen']),
      'rejected': _str(record['rejected']),
  }


def _str(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)
