"""Chat prompts to left-padded token arrays and generated tokens back to text, with an HF tokenizer.

Tokenizers are only ever read from local files (a tokenizer directory or a .gguf file). A prompt is
rendered with the chat template and a generation prompt, then encoded without adding special tokens
(the template places BOS itself), as transformers' own apply_chat_template(tokenize=True) does.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import transformers

OVERLONG_MODES = ('truncate', 'error')


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """A tokenizer from a local directory, or from the vocabulary embedded in a .gguf file."""
  path = os.fspath(path)
  if path.endswith('.gguf'):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such GGUF file')
    # Rebuilt from the file's own tokenizer.ggml.* metadata (no torch; see gguf_tokenizer.py).
    from pilaf_jax.data.gguf_tokenizer import load_gguf_tokenizer
    return load_gguf_tokenizer(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: expected a local tokenizer directory or a .gguf file')
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


class ChatTokenizer:
  """Renders chat prompts to [n, P] left-padded tokens and decodes [n, R] responses.

  Prompts longer than P keep their end: the earliest turns are dropped first (a leading system
  message is kept, and the kept part always opens with a user turn). If the last turn alone is still
  too long, overlong='truncate' keeps the end of its text and overlong='error' raises.
  """

  def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase | str | os.PathLike, *,
               chat_template: str | None = None, overlong: str = 'truncate',
               extra_eos_ids: Sequence[int] | None = ()):
    if overlong not in OVERLONG_MODES:
      raise ValueError(f'overlong must be one of {OVERLONG_MODES}, got {overlong!r}')
    if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
      self.name = tokenizer.name_or_path or type(tokenizer).__name__
    else:
      self.name = os.fspath(tokenizer)  # The .gguf file itself, not its directory.
      tokenizer = load_tokenizer(tokenizer)
    self.tokenizer = tokenizer
    self.chat_template = chat_template or tokenizer.chat_template
    if not self.chat_template:
      raise ValueError(f'{self.name} has no chat_template; set task.chat_template or use an '
                       f'instruct tokenizer')
    self.overlong = overlong
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    self._eos_ids = tuple(dict.fromkeys(int(e) for e in [*eos, *(extra_eos_ids or ())]))
    if not self._eos_ids:
      raise ValueError(f'{self.name} has no eos token; pass extra_eos_ids')

  @property
  def vocab_size(self) -> int:
    """len(tokenizer): the base vocabulary plus added tokens."""
    return len(self.tokenizer)

  @property
  def pad_id(self) -> int:
    """The pad token, else the (first) eos token: padding is always masked out anyway."""
    pad = self.tokenizer.pad_token_id
    return int(pad) if pad is not None else self._eos_ids[0]

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's eos, then the extra ids, deduplicated."""
    return self._eos_ids

  @property
  def bos_id(self) -> int | None:
    bos = self.tokenizer.bos_token_id
    return None if bos is None else int(bos)

  def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
    """The token ids of one conversation with the generation prompt, without any truncation."""
    text = self.tokenizer.apply_chat_template(
        list(messages), chat_template=self.chat_template, tokenize=False,
        add_generation_prompt=True)
    return self.tokenizer.encode(text, add_special_tokens=False)

  def encode_prompts(self, messages_list: Sequence[Sequence[dict[str, str]]],
                     prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Conversations -> (tokens int32 [n, P], mask bool [n, P]), left-padded with pad_id."""
    tokens = np.full((len(messages_list), prompt_len), self.pad_id, np.int32)
    mask = np.zeros((len(messages_list), prompt_len), bool)
    for i, messages in enumerate(messages_list):
      ids = self._fit(i, list(messages), prompt_len)
      if ids:
        tokens[i, -len(ids):], mask[i, -len(ids):] = ids, True
    return tokens, mask

  def decode_responses(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
    """[n, R] response tokens -> n strings, each cut before its first eos, special tokens skipped."""
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    stops = set(self._eos_ids)
    texts = []
    for row, row_mask in zip(tokens, mask):
      ids = row[row_mask].tolist()
      end = next((j for j, t in enumerate(ids) if t in stops), len(ids))
      texts.append(self.tokenizer.decode(ids[:end], skip_special_tokens=True))
    return texts

  def _fit(self, index: int, messages: list[dict[str, str]], prompt_len: int) -> list[int]:
    """Prompt `index` rendered into at most prompt_len tokens, keeping its end."""
    if not messages:
      raise ValueError(f'prompt {index} has no messages')
    ids = self.render(messages)
    if len(ids) <= prompt_len:
      return ids
    full_len = len(ids)
    head = messages[:1] if messages[0]['role'] == 'system' else []
    body = messages[len(head):]
    # Drop whole turns from the front; the kept part opens with a user turn (templates may insist).
    for start in range(1, len(body)):
      if body[start]['role'] == 'user' or start == len(body) - 1:
        ids = self.render(head + body[start:])
        if len(ids) <= prompt_len:
          return ids
    last = body[-1] if body else head[0]
    head = head if body else []
    if self.overlong == 'error':
      last_len = len(self.render(head + [last]))
      raise ValueError(f'prompt {index} is {full_len} tokens ({last_len} with only its last turn), '
                       f'longer than task.prompt_len={prompt_len}')
    return self._truncate_last(index, head, last, prompt_len)

  def _truncate_last(self, index: int, head: list[dict[str, str]], last: dict[str, str],
                     prompt_len: int) -> list[int]:
    """Keeps the longest end of the last turn's text whose rendering fits (binary search)."""
    content = self.tokenizer.encode(last['content'], add_special_tokens=False)

    def render_tail(k: int) -> list[int]:
      tail = self.tokenizer.decode(content[len(content) - k:]) if k else ''
      return self.render(head + [{**last, 'content': tail}])

    best = render_tail(0)
    if len(best) > prompt_len:
      raise ValueError(f'prompt {index}: the chat template alone takes {len(best)} tokens, more than '
                       f'task.prompt_len={prompt_len}')
    lo, hi = 0, len(content)  # render_tail(lo) fits; find the largest k that does.
    while lo < hi:
      mid = (lo + hi + 1) // 2
      ids = render_tail(mid)
      if len(ids) <= prompt_len:
        lo, best = mid, ids
      else:
        hi = mid - 1
    return best
